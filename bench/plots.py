"""Figures (PNG, matplotlib Agg) and the results table of the end-to-end benchmarks, drawn
from their JSON payloads.

``plot_engine`` reads ``bench.engine``'s payload; the ``e2e`` functions read ``bench.e2e``'s,
with NaN already turned into None (``bench.workloads.json_safe``).
"""

from __future__ import annotations

import math
from pathlib import Path

MODE_COLORS = {"static": "C0", "bin-continuous": "C1", "continuous": "C2"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def grouped_bars(rows: list[dict], series: list[str], value, ylabel: str, title: str,
                 path: Path, baseline: float | None = None) -> None:
    """One group of bars per row (labelled by its model and B), one bar per name in ``series``
    of height ``value(row, name)``; a horizontal line at ``baseline`` if given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        ax.bar([x + i * width for x in range(len(rows))], [value(r, name) for r in rows], width,
               label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels([f"{r['model'].removeprefix('dummy:')}\nB={r['B']}" for r in rows],
                       fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15),
              ncol=min(len(series), 3))
    _save(fig, path)


def plot_engine(payload: dict, path: Path) -> None:
    """Left: roofline time / measured step time against B per model. Right: tokens/s against
    B, ours per model (whole generate solid, decode phase dashed), transformers' generate as
    single points (square: whole generate, diamond: decode phase; filled: compiled)."""
    plt = _pyplot()
    fig, (ax_roof, ax_tok) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = list(dict.fromkeys(r["model"] for r in payload["ours"]))
    for i, model in enumerate(models):
        rows = [r for r in payload["ours"] if r["model"] == model]
        color, batch = f"C{i}", [r["B"] for r in rows]
        if all("roofline_fraction" in r for r in rows):
            ax_roof.plot(batch, [100 * r["roofline_fraction"] for r in rows], "o-", color=color,
                         label=model)
        ax_tok.plot(batch, [r["generate_tok_s"] for r in rows], "o-", color=color,
                    label=f"{model} ours, generate")
        ax_tok.plot(batch, [r["decode_tok_s"] for r in rows], "o--", color=color, mfc="none",
                    label=f"{model} ours, decode")
        for hf in payload["transformers"]:
            if hf["model"] == model:
                fill = color if hf["variant"] == "compiled" else "none"
                ax_tok.plot([hf["B"]], [hf["generate_tok_s"]], "s", color=color, mfc=fill, ms=9,
                            label=f"{model} transformers {hf['variant']}, generate")
                ax_tok.plot([hf["B"]], [hf["decode_tok_s"]], "D", color=color, mfc=fill, ms=8,
                            label=f"{model} transformers {hf['variant']}, decode")
    if payload.get("ceilings") is None:
        ax_roof.text(0.5, 0.5, "no roofline: not a CUDA run", ha="center",
                     transform=ax_roof.transAxes)
    ax_roof.set(xscale="log", xlabel="batch size B", ylabel="% of roofline (roofline / step time)",
                title="decode step vs roofline", ylim=(0, 105))
    ax_roof.axhline(100, color="grey", lw=0.5)
    ax_tok.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="tokens/s",
               title="throughput")
    for ax in (ax_roof, ax_tok):
        ax.set_xticks(sorted({r["B"] for r in payload["ours"]}))
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    c = payload["config"]
    fig.suptitle(f"{c['dtype']}, prompt {c['prompt_len']}, {c['new_tokens']} new tokens, greedy")
    _save(fig, path)


def _measured(payload: dict, **match) -> list[dict]:
    return [r for r in payload.get("core", []) if "measured" in r
            and all(r.get(k) == v for k, v in match.items())]


def _grid(payload: dict, **match) -> list[dict]:
    return sorted((r for r in payload.get("sim_grid", []) if "error" not in r
                   and all(r.get(k) == v for k, v in match.items())), key=lambda r: r["k"])


def plot_throughput_vs_k(payload: dict, path: Path) -> None:
    """Requests/s against k per mode, for the big and the small B: simulated lines (steady
    state, oracle solid, bin-error dashed), measured points (filled: oracle, open: bin-error),
    and the simulator on each measured workload (x)."""
    plt = _pyplot()
    c = payload["config"]
    noisy = f"bin-error:{c['p_error']}"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, B in zip(axes, (c["big_batch"], c["small_batch"])):
        for mode, color in MODE_COLORS.items():
            for predictor, style in (("oracle", "-"), (noisy, "--")):
                rows = _grid(payload, batch_size=B, lengths=c["lengths"], mode=mode,
                             predictor=predictor)
                if mode == "continuous" and rows and predictor == "oracle":
                    ax.axhline(rows[0]["throughput"], color=color, ls=":",
                               label="continuous (sim)")
                    continue
                one = _grid(payload, batch_size=B, lengths=c["lengths"], mode=mode, k=1)
                rows = ([] if predictor != "oracle" else one) + rows
                if len(rows) > 1:
                    ax.plot([r["k"] for r in rows], [r["throughput"] for r in rows], style,
                            color=color, label=f"{mode} {predictor} (sim)")
            for r in _measured(payload, B=B, mode=mode, arrival_rate=None):
                filled = r["predictor"] == "oracle"
                ax.plot([r["k"]], [r["measured"]["throughput"]], "o", color=color, ms=7,
                        mfc=color if filled else "none")
                if "sim" in r and r["sim"].get("throughput") is not None:
                    ax.plot([r["k"]], [r["sim"]["throughput"]], "x", color=color, ms=7)
        ax.plot([], [], "ko", label="measured (open: bin-error)")
        ax.plot([], [], "kx", label="simulated, measured workload")
        ax.set(xscale="log", xlabel="bins k", ylabel="requests/s",
               title=f"B={B}, {c['lengths']}, prompts {c['prompts']}")
        ax.set_xticks(sorted(set(c["sim_bins"]) | {r["k"] for r in _measured(payload, B=B)}))
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.legend(fontsize=6)
    fig.suptitle(f"{c['model']}: throughput against the number of bins")
    _save(fig, path)


def plot_gain_vs_paper(payload: dict, path: Path) -> None:
    """Gain over k=1 (%) at B=8: closed form, the paper's A100 numbers, the simulator under the
    paper's service model and under the measured step times, and what was measured."""
    plt = _pyplot()
    gains = payload["gains_pct"]
    series = [("closed form (Thm 4.2)", gains["closed_form"]),
              ("paper, A100", gains["paper"]),
              ("sim, paper service model", gains["simulated_paper_model"]),
              ("sim, measured step times", gains["simulated_measured_table"]),
              ("measured", gains["measured"])]
    ks = sorted({int(k) for _, g in series for k in g})
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (label, g) in enumerate(series):
        g = {int(k): v for k, v in g.items()}
        xs = [j + (i - (len(series) - 1) / 2) * width for j, k in enumerate(ks) if k in g]
        ys = [g[k] for k in ks if k in g]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(range(len(ks)))
    ax.set_xticklabels([f"k={k}" for k in ks])
    ax.set_ylabel("throughput gain over k=1 (%)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(f"static batches, oracle lengths; closed form, paper and paper-model sim: B=8, "
                 f"U[1, 1024]; measured and its sim: B={gains['batch_size']}, {gains['lengths']}",
                 fontsize=8)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_sim_vs_measured(payload: dict, path: Path) -> None:
    """Left: simulated against measured requests/s per GPU-core run. Right: the simulator's
    relative error per run (throughput and p99 latency)."""
    plt = _pyplot()
    rows = [r for r in payload.get("core", []) if "measured" in r and "sim_error" in r]
    fig, (ax_xy, ax_err) = plt.subplots(1, 2, figsize=(13, max(4.5, 0.28 * len(rows) + 1)))
    for r in rows:
        ax_xy.plot(r["measured"]["throughput"], r["sim"]["throughput"], "o",
                   color=MODE_COLORS[r["mode"]])
    if rows:
        values = [v for r in rows for v in (r["measured"]["throughput"], r["sim"]["throughput"])]
        lo, hi = min(values) * 0.9, max(values) * 1.1
        ax_xy.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax_xy.set(xlim=(lo, hi), ylim=(lo, hi))
    for mode, color in MODE_COLORS.items():
        ax_xy.plot([], [], "o", color=color, label=mode)
    ax_xy.set(xlabel="measured requests/s", ylabel="simulated requests/s",
              title="simulator vs GPU")
    ax_xy.legend(fontsize=7)
    names = [r["name"] for r in rows]
    ys = range(len(rows))
    for offset, key, label in ((-0.2, "throughput", "throughput"),
                               (0.2, "latency_p99", "p99 latency")):
        ax_err.barh([y + offset for y in ys],
                    [100 * (r["sim_error"].get(key) or 0.0) for r in rows], 0.4, label=label)
    ax_err.set_yticks(list(ys))
    ax_err.set_yticklabels(names, fontsize=6)
    ax_err.invert_yaxis()
    ax_err.set(xlabel="|sim - measured| / measured (%)", title="simulator error per run")
    ax_err.legend(fontsize=7)
    _save(fig, path)


def plot_latency(payload: dict, path: Path) -> None:
    """p50 and p99 latency against the Poisson arrival rate, per k: simulated curves and
    measured points (static, B = the big batch)."""
    plt = _pyplot()
    c = payload["config"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sweeps = [("latency_sweep", f"sim, {c['poisson_requests']} req", 1.5),
              ("latency_sweep_steady", f"sim, {c['latency_steady_requests']} req", 0.6)]
    for i, k in enumerate(c["poisson_bins"]):
        color = f"C{i}"
        for key, label, width in sweeps:
            rows = sorted((r for r in payload.get(key, []) if "error" not in r and r["k"] == k),
                          key=lambda r: r["arrival_rate"])
            if rows:
                rates = [r["arrival_rate"] for r in rows]
                ax.plot(rates, [r["latency_p50"] for r in rows], "-", color=color, lw=width,
                        label=f"k={k} p50 ({label})")
                ax.plot(rates, [r["latency_p99"] for r in rows], "--", color=color, lw=width,
                        label=f"k={k} p99 ({label})")
        measured = [r for r in _measured(payload, B=c["big_batch"], k=k, mode="static")
                    if r["arrival_rate"] is not None]
        if measured:
            ax.plot([r["arrival_rate"] for r in measured],
                    [r["measured"]["latency_p50"] for r in measured], "o", color=color,
                    label=f"k={k} p50 (measured)")
            ax.plot([r["arrival_rate"] for r in measured],
                    [r["measured"]["latency_p99"] for r in measured], "^", color=color,
                    label=f"k={k} p99 (measured)")
    ax.set(xlabel="arrival rate (requests/s)", ylabel="latency (s)", yscale="log",
           title=f"Poisson arrivals, B={c['big_batch']}, static, oracle, max wait "
                 f"{c['poisson_max_wait_ms']:.0f} ms")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)


# ---- the e2e results table (markdown, pasted into bench/RESULTS.md) ------------------------


def _num(value, fmt: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else format(value, fmt)


def format_e2e_table(payload: dict, meta: dict | None = None) -> str:
    """Fixed markdown tables: the measured runs (with the simulator's error), the transformers
    baseline, the simulated grid at equal batch size and at equal KV memory. ``meta``
    (``bench.common.run_metadata()``) adds the commit, date and command."""
    c = payload["config"]
    gpu = payload.get("step_table", {}).get("device", "?")
    lines = [f"### Measured: {c['model']} on {gpu}, prompts {c['prompts']}, outputs "
             f"{c['lengths']} rounded up, max_tokens {c['max_tokens']}", ""]
    if meta:
        lines += [f"commit {meta['commit']}, {meta['date']}, `{meta['command']}`", ""]
    resim = payload.get("resimulated")
    before = any("sim_error_before" in r for r in payload.get("core", []))
    calibration = payload.get("calibration") or {}
    if not resim and (payload.get("step_table", {}).get("one_row_file") or calibration):
        lines += ["Simulator: step table"
                  + (" + rows' spread (one-row table)"
                     if payload["step_table"].get("one_row_file") else "")
                  + (" + engine overheads" if "decode_step_s" in calibration else "")
                  + "; the engine's slab capacities and refill rule.", ""]
    if resim:
        lines += [f"Simulated columns of this table recomputed on the CPU ({resim['service']}): "
                  f"commit {resim['commit']}, {resim['date']}, `{resim['command']}`"
                  + ("; last column: the saved run's own simulator error" if before else "")
                  + ". The simulated tables below are as saved.", ""]
    extra = " sim error saved |" if before else ""
    lines += ["| B | k | mode | predictor | arrivals | requests | req/s | tok/s | p50 s | p99 s "
              "| padding waste | overflows | sim req/s | sim overflows | sim error |" + extra,
              "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
              + ("---:|" if before else "")]
    percent = lambda errors: _num(None if (errors or {}).get("throughput") is None
                                  else 100 * errors["throughput"], ".1f") + "%"
    for r in payload.get("core", []):
        arrivals = "t=0" if r["arrival_rate"] is None else f"Poisson {r['arrival_rate']:.1f}/s"
        head = (f"| {r['B']} | {r['k']} | {r['mode']} | {r['predictor']} | {arrivals} | "
                f"{r['n_requests']} |")
        if "measured" not in r:
            lines.append(head + f" error: {r.get('error', '?')[:80]} |" + " |" * 8
                         + (" |" if before else ""))
            continue
        m, s = r["measured"], r.get("sim") or {}
        lines.append(head + f" {m['throughput']:.2f} | {m['token_throughput']:.0f} | "
                     f"{m['latency_p50']:.2f} | {m['latency_p99']:.2f} | "
                     f"{m['padding_waste']:.3f} | {m['overflows']} | "
                     f"{_num(s.get('throughput'))} | {_num(s.get('overflows'), 'd')} | "
                     f"{percent(r.get('sim_error'))} |"
                     + (f" {percent(r.get('sim_error_before'))} |" if before else ""))
    hf = payload.get("transformers") or {}
    if "throughput" in hf:
        lines += ["", f"transformers static-cache generate ({hf['variant']}), padded B="
                      f"{hf['batch_size']} batches in arrival order, {hf['n_requests']} requests: "
                      f"{hf['throughput']:.2f} req/s, {hf['token_throughput']:.0f} useful tok/s"
                  + (f"; ours (static k=1) on the same batches {hf['ours_throughput']:.2f} req/s, "
                     f"{hf['ours_over_transformers']:.2f}x" if "ours_throughput" in hf else "")]
    return "\n".join(lines + _grid_table(payload) + _equal_kv_table(payload)) + "\n"


def _pick(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _grid_table(payload: dict) -> list[str]:
    c = payload["config"]
    rows = [r for r in payload.get("sim_grid", []) if "error" not in r]
    if not rows:
        return []
    show = lambda r: "-" if r is None else \
        f"{r['throughput']:.2f}, {_num(r['latency_p50'], '.1f')} / {_num(r['latency_p99'], '.1f')}"
    lines = ["", f"### Simulated at equal batch size ({c['sim_requests']} requests at t=0, "
                 f"step times from step_times.json): req/s, p50 / p99 latency s", "",
             "| lengths | B | k | predictor | static | bin-continuous | continuous |",
             "|---|---:|---:|---|---|---|---|"]
    noisy = f"bin-error:{c['p_error']}"
    configs = [(1, "oracle")] + [(k, p) for k in (4, 16, 32) if k in c["sim_bins"]
                                 for p in ("oracle", noisy)]
    for lengths in (c["lengths"], c["chat_lengths"]):
        for B in c["sim_batches"]:
            cont = _pick(rows, lengths=lengths, batch_size=B, mode="continuous")
            for k, p in configs:
                cells = [show(_pick(rows, lengths=lengths, batch_size=B, k=k, predictor=p,
                                    mode=mode)) for mode in ("static", "bin-continuous")]
                lines.append(f"| {lengths} | {B} | {k} | {p} | {cells[0]} | {cells[1]} | "
                             f"{show(cont)} |")
    return lines


def _equal_kv_table(payload: dict) -> list[str]:
    c = payload["config"]
    rows = [r for r in payload.get("equal_kv", []) if "error" not in r]
    grid = [r for r in payload.get("sim_grid", []) if "error" not in r]
    if not rows:
        return []
    B = max(c["sim_batches"])
    lines = ["", f"### Simulated at equal KV memory (oracle, t=0): the token slots of one "
                 f"max-length slab of B={B} rows; each bin runs as many rows as fit "
                 f"(bin capacity: engine = its capacity buckets, exact = unrounded)", "",
             f"| lengths | k | bin capacity | rows per bin | static req/s | bin-continuous req/s "
             f"| continuous B={B} req/s | static k=1 B={B} req/s |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for lengths in (c["lengths"], c["chat_lengths"]):
        ref = {m: (_pick(grid, lengths=lengths, batch_size=B, k=1, mode=m) or {}).get("throughput")
               for m in ("continuous", "static")}
        slots = max((r["slots"] for r in rows if r["lengths"] == lengths), default=None)
        for k in (4, 16, 32):
            for rule in ("engine", "exact"):
                found = {m: _pick(rows, lengths=lengths, k=k, capacity_rule=rule, mode=m,
                                  slots=slots) for m in ("static", "bin-continuous")}
                if not any(found.values()):
                    continue
                per_bin = next(r for r in found.values() if r)["rows_per_bin"]
                lines.append(f"| {lengths} | {k} | {rule} | {min(per_bin)}-{max(per_bin)} | "
                             f"{_num((found['static'] or {}).get('throughput'))} | "
                             f"{_num((found['bin-continuous'] or {}).get('throughput'))} | "
                             f"{_num(ref['continuous'])} | {_num(ref['static'])} |")
    return lines


PROFILE_PARTS = ["matmul", "attention", "merge", "rope_kv_write", "norm", "activation", "argmax",
                 "other", "gaps"]


def plot_profile(rows: list[dict], path: Path) -> None:
    """One stacked bar per (model, B): the decode step's device time by part
    (``bench.profile_step`` rows), with a black tick at the step's roofline time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(rows) + 2), 4.5))
    labels = [f"{r['model'].removeprefix('dummy:')}\nB={r['B']}" for r in rows]
    bottoms = [0.0] * len(rows)
    for i, part in enumerate(PROFILE_PARTS):
        values = [100 * r["parts"].get(part, {}).get("us_per_step", 0.0) / r["step_us"]
                  for r in rows]
        ax.bar(labels, values, bottom=bottoms, label=part, color=f"C{i}")
        bottoms = [b + v for b, v in zip(bottoms, values)]
    roof = [100 * r["roofline_us"] / r["step_us"] for r in rows]
    ax.scatter(labels, roof, marker="_", s=900, color="black", zorder=3, label="roofline")
    ax.set_ylabel("% of measured decode-step time")
    ax.set_title("Where the decode step's time goes (torch.profiler, CUDA-graph replays)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
