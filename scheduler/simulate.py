"""Command line: simulate multi-bin batching for several bin counts k.

    python -m scheduler.simulate --lengths uniform:1:20 --batch-size 128 --bins 1,2,3,4,5 \\
        --requests 128000 --json

prints, per k, the simulated throughput (requests and tokens per time unit), latency
percentiles, occupancy, padding waste, KV slots and overflows, next to the closed form where
its assumptions hold (Theorem 4.2 for uniform lengths and equal-mass bins, Lemma A.1's lower
bound for exponential lengths and the bins used; both assume oracle lengths, static batches, all
requests at t = 0 and the paper's service model). With ``--step-table`` the time unit is seconds
of the measured GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from scheduler import theory
from scheduler.bins import (AdaptiveEdges, BinEdges, equal_width_edges, explicit_edges,
                            exponential_edges)
from scheduler.policy import ORDERS, MultiBinScheduler
from scheduler.predictors import bin_accuracy, predictor_from_spec
from scheduler.schemas import StepTimeTable
from scheduler.service import PAPER_SERVICE, LinearServiceModel
from scheduler.simulator import MODES, simulate
from scheduler.workload import Exponential, Uniform, make_workload, parse_lengths

EDGE_RULES = ("equal-mass", "equal-width", "exponential", "adaptive")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"bin counts must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scheduler.simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="uniform:1:20",
                   help="output lengths: uniform:LO:HI, exponential:MEAN[:CAP], "
                        "lognormal:MEDIAN:P99:CAP, fixed:N, file:PATH (default %(default)s)")
    p.add_argument("--prompt-lengths", default="fixed:0",
                   help="prompt lengths, same specs, rounded up (default %(default)s)")
    p.add_argument("--integer", action="store_true",
                   help="round output lengths up to whole tokens (implied by --step-table)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="every request's max_tokens and the last bin's bound "
                        "(default: the length distribution's upper end, rounded up)")
    p.add_argument("--batch-size", type=int, default=128, help="B (default %(default)s)")
    p.add_argument("--bins", type=_int_list, default=[1, 2, 4, 8],
                   help="comma-separated bin counts k to simulate (default 1,2,4,8)")
    p.add_argument("--edges", default="equal-mass",
                   help=f"edge rule {'|'.join(EDGE_RULES)}, or explicit inner edges "
                        f"'64,256,1024' (then k = edges + 1 and --bins is ignored)")
    p.add_argument("--predictor", default="oracle",
                   help="oracle | bin-error:P | lognormal:SIGMA | max-tokens | online[:Q] | "
                        "hint[:FALLBACK] (default %(default)s)")
    p.add_argument("--requests", type=int, default=10000, help="number of requests")
    p.add_argument("--arrival-rate", type=float, default=None,
                   help="Poisson arrivals per time unit (default: all at t=0)")
    p.add_argument("--mode", choices=MODES, default="static")
    p.add_argument("--order", choices=ORDERS, default="formation",
                   help="central-queue order (default %(default)s)")
    p.add_argument("--max-wait", type=float, default=None,
                   help="flush a bin's partial batch when its oldest request waited this long")
    p.add_argument("--starvation-wait", type=float, default=None,
                   help="serve a formed batch next once it waited this long")
    p.add_argument("--service", default="paper",
                   help="paper (one time unit per token) or linear:STEP:PER_TOKEN[:PREFILL:"
                        "PREFILL_PER_TOKEN] (ignored with --step-table)")
    p.add_argument("--step-table", default=None, help="measured step-time table (JSON)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="continuous mode's slab capacity for the KV figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", default=None, help="write a throughput/latency-vs-k PNG here")
    return p


def _service(args):
    if args.step_table:
        return StepTimeTable.load(args.step_table)
    if args.service == "paper":
        return PAPER_SERVICE
    name, _, rest = args.service.partition(":")
    try:
        values = [float(v) for v in rest.split(":")] if rest else []
    except ValueError:
        values = []
    if name != "linear" or len(values) not in (2, 4):
        raise ValueError(f"bad --service {args.service!r}; expected paper or "
                         f"linear:STEP:PER_TOKEN[:PREFILL:PREFILL_PER_TOKEN]")
    return LinearServiceModel(*values)


def _edges(rule: str, k: int, dist, max_tokens: int, batch_size: int):
    if rule == "equal-mass":
        return BinEdges(tuple(dist.quantile(i / k) for i in range(1, k)), max_tokens)
    if rule == "equal-width":
        return equal_width_edges(k, dist.quantile(0.0), max_tokens, max_tokens)
    if rule == "exponential":
        if not isinstance(dist, Exponential):
            raise ValueError("--edges exponential needs --lengths exponential:MEAN")
        return exponential_edges(k, dist.mean, batch_size, max_tokens)
    if rule == "adaptive":
        return AdaptiveEdges(k, max_tokens)
    raise ValueError(f"unknown --edges {rule!r}")


def _closed_form(args, dist, edges, integer: bool) -> tuple[float | None, str | None]:
    """The paper's closed form for this run, or (None, None) where its assumptions do not hold:
    the paper's service model, static batches, oracle lengths, every request in at t = 0 and
    real-valued lengths. Theorem 4.2 (uniform lengths) also needs equal-mass edges and no
    clamping by max_tokens; Lemma A.1's bound (exponential lengths) holds for any fixed edges,
    so it is computed for the edges this run used."""
    if (args.step_table or args.service != "paper" or args.mode != "static"
            or args.predictor != "oracle" or args.arrival_rate is not None or integer
            or not isinstance(edges, BinEdges)):
        return None, None
    if isinstance(dist, Uniform) and args.edges == "equal-mass" and edges.max_len >= dist.hi:
        return theory.uniform_throughput(edges.k, args.batch_size, dist.lo, dist.hi), "theorem-4.2"
    if isinstance(dist, Exponential) and args.batch_size >= 2:
        service = theory.exponential_service_bound(list(edges.boundaries), dist.mean,
                                                   args.batch_size)
        return args.batch_size / service, "lemma-a.1-lower-bound"
    return None, None


def run(args) -> dict:
    """Simulate every requested k; returns the JSON-ready report."""
    dist = parse_lengths(args.lengths)
    service = _service(args)
    integer = args.integer or service.integer_steps
    workload = make_workload(args.requests, dist, prompts=parse_lengths(args.prompt_lengths),
                             arrival_rate=args.arrival_rate, max_tokens=args.max_tokens,
                             integer=integer, seed=args.seed)
    true_lengths = workload.true_lengths()
    if args.edges in EDGE_RULES:
        runs = [(k, args.edges) for k in args.bins]
    else:
        try:
            explicit = explicit_edges([float(v) for v in args.edges.split(",")], workload.max_tokens)
        except ValueError as e:
            raise ValueError(f"--edges {args.edges!r}: {e}") from None
        runs = [(explicit.k, explicit)]
    results = []
    for k, rule in runs:
        edges = rule if isinstance(rule, BinEdges) else _edges(rule, k, dist, workload.max_tokens,
                                                                args.batch_size)
        predictor = predictor_from_spec(args.predictor, true_lengths=true_lengths, edges=edges,
                                        seed=args.seed)
        scheduler = MultiBinScheduler(edges, args.batch_size, predictor, order=args.order,
                                      max_wait=args.max_wait,
                                      starvation_wait=args.starvation_wait)
        result = simulate(workload, scheduler, service, args.mode, args.max_model_len)
        closed, closed_kind = _closed_form(args, dist, edges, integer)
        entry = {"k": k, "edges": list(edges.boundaries), "sim": result.to_dict(),
                 "closed_form_throughput": closed, "closed_form": closed_kind}
        if args.predictor.split(":")[0] in ("oracle", "bin-error", "lognormal", "max-tokens") \
                and isinstance(edges, BinEdges) and len(workload):
            # These predictions are keyed by (seed, request): the probe sees the run's own.
            probe = predictor_from_spec(args.predictor, true_lengths=true_lengths, edges=edges,
                                        seed=args.seed)
            accuracy = bin_accuracy(workload.output_lens,
                                    [probe.predict(workload.request(i)) for i in range(len(workload))],
                                    edges)
            entry["bin_accuracy"] = {"exact": accuracy.exact, "within_one": accuracy.within_one}
        results.append(entry)
    config = {key: value for key, value in vars(args).items() if key not in ("json", "plot")}
    return {"config": config, "results": results}


def _json_safe(value):
    """NaN (a latency with no requests) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _print_table(report: dict, out) -> None:
    header = (f"{'k':>3} {'req/t':>9} {'closed':>9} {'ratio':>7} {'tok/t':>10} {'lat p50':>9} "
              f"{'lat p99':>9} {'occup':>6} {'overfl':>7}")
    print(header, file=out)
    for r in report["results"]:
        s, closed = r["sim"], r["closed_form_throughput"]
        ratio = f"{s['throughput'] / closed:7.4f}" if closed else f"{'-':>7}"
        closed_text = f"{closed:9.4f}" if closed else f"{'-':>9}"
        print(f"{r['k']:>3} {s['throughput']:9.4f} {closed_text} {ratio} "
              f"{s['token_throughput']:10.2f} {s['latency_p50']:9.2f} {s['latency_p99']:9.2f} "
              f"{s['occupancy']:6.3f} {s['overflows']:>7}", file=out)


def plot(report: dict, path: str) -> None:
    """Throughput (simulated and closed form) and latency percentiles against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in report["results"]]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    ax_t.plot(ks, [r["sim"]["throughput"] for r in report["results"]], "o-", label="simulated")
    closed = [r["closed_form_throughput"] for r in report["results"]]
    if all(c is not None for c in closed):
        ax_t.plot(ks, closed, "s--", label=report["results"][0]["closed_form"])
    ax_t.set(xlabel="bins k", ylabel="requests per time unit", title="throughput")
    ax_t.legend()
    for key in ("latency_p50", "latency_p90", "latency_p99"):
        ax_l.plot(ks, [r["sim"][key] for r in report["results"]], "o-", label=key[8:])
    ax_l.set(xlabel="bins k", ylabel="time units", title="latency")
    ax_l.legend()
    c = report["config"]
    fig.suptitle(f"{c['lengths']}, B={c['batch_size']}, {c['mode']}, predictor {c['predictor']}, "
                 f"{c['requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_json_safe(report), indent=1))
    else:
        _print_table(report, sys.stdout)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
