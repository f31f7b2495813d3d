import json
import subprocess
import sys

import pytest

from scheduler import theory
from scheduler.schemas import StepTimeTable
from scheduler.simulate import main


def _run_json(capsys, *args):
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_uniform_sweep_reports_simulated_and_closed_form(capsys):
    report = _run_json(capsys, "--lengths", "uniform:1:20", "--batch-size", "16", "--bins", "1,2,3",
                       "--requests", "6000")
    assert [r["k"] for r in report["results"]] == [1, 2, 3]
    for r in report["results"]:
        closed = theory.uniform_throughput(r["k"], 16, 1, 20)
        assert r["closed_form_throughput"] == pytest.approx(closed)
        assert r["closed_form"] == "theorem-4.2"
        assert r["sim"]["throughput"] == pytest.approx(closed, rel=0.03)
        assert r["sim"]["n_requests"] == 6000
        assert r["bin_accuracy"] == {"exact": 1.0, "within_one": 1.0}
        assert len(r["edges"]) == r["k"] - 1
    assert report["config"]["batch_size"] == 16


def test_predictor_mode_arrivals_and_explicit_edges(capsys):
    report = _run_json(capsys, "--lengths", "lognormal:200:1500:2048", "--integer",
                       "--batch-size", "8", "--edges", "100,400,1000", "--predictor",
                       "bin-error:0.2", "--mode", "bin-continuous", "--arrival-rate", "0.05",
                       "--requests", "300", "--max-wait", "50", "--order", "shortest")
    (result,) = report["results"]
    assert result["k"] == 4 and result["edges"] == [100, 400, 1000]
    assert result["closed_form_throughput"] is None
    assert result["sim"]["overflows"] > 0
    assert result["bin_accuracy"]["within_one"] == 1.0 and result["bin_accuracy"]["exact"] < 1


def test_exponential_with_optimal_edges_and_step_table(tmp_path, capsys):
    table = StepTimeTable("dev", "model", [(8, 0, 1e-3), (8, 10_000, 3e-3)],
                          [(8, 0, 1e-4), (8, 4096, 2e-3)])
    path = table.save(tmp_path / "steps.json")
    report = _run_json(capsys, "--lengths", "exponential:50", "--edges", "exponential",
                       "--bins", "1,4", "--batch-size", "8", "--requests", "500",
                       "--prompt-lengths", "uniform:64:512", "--step-table", str(path),
                       "--mode", "continuous")
    # Seconds of a GPU, continuous batches: the paper's closed form does not apply.
    assert [r["closed_form"] for r in report["results"]] == [None, None]
    sim = report["results"][1]["sim"]
    assert sim["prefill_time"] > 0 and sim["decode_time"] > 0 and sim["overflows"] == 0


@pytest.mark.parametrize("edges", ["equal-mass", "exponential"])
def test_exponential_bound_is_for_the_edges_used_and_holds(capsys, edges):
    report = _run_json(capsys, "--lengths", "exponential:100", "--batch-size", "8",
                       "--bins", "1,4,8", "--edges", edges, "--requests", "20000")
    for r in report["results"]:
        bound = 8 / theory.exponential_service_bound(r["edges"], 100, 8)
        assert r["closed_form"] == "lemma-a.1-lower-bound"
        assert r["closed_form_throughput"] == pytest.approx(bound)
        assert r["sim"]["throughput"] >= bound
    if edges == "exponential":  # the optimal edges: the bound is Lemma A.1's B / (L_k mean)
        for r in report["results"]:
            assert r["closed_form_throughput"] == pytest.approx(
                theory.exponential_throughput_bound(r["k"], 100, 8))


def test_empty_workload_reports_no_requests(capsys):
    report = _run_json(capsys, "--requests", "0", "--bins", "1,2")
    assert [r["sim"]["n_requests"] for r in report["results"]] == [0, 0]
    assert all("bin_accuracy" not in r for r in report["results"])


def test_file_lengths_table_and_plot(tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("\n".join(str(v) for v in range(1, 101)))
    png = tmp_path / "plot.png"
    assert main(["--lengths", f"file:{lengths}", "--bins", "1,2", "--batch-size", "4",
                 "--requests", "400", "--predictor", "online", "--edges", "adaptive",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["k", "req/t", "closed"]
    assert len(out.splitlines()) == 3
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--lengths", "gamma:1:2"], "bad length spec"),
    (["--predictor", "psychic"], "unknown predictor"),
    (["--edges", "exponential"], "needs --lengths exponential"),
    (["--edges", "5,3"], "non-decreasing"),
    (["--service", "quadratic"], "bad --service"),
])
def test_bad_arguments_exit_with_a_message(args, message, capsys):
    assert main([*args, "--requests", "10"]) == 2
    assert message in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "scheduler.simulate", "--bins", "2",
                          "--requests", "300", "--batch-size", "8", "--json"],
                         check=True, capture_output=True, text=True).stdout
    assert json.loads(out)["results"][0]["k"] == 2
