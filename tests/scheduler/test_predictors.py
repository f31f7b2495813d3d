import math
import random
import statistics

import pytest

from scheduler.bins import equal_width_edges
from scheduler.predictors import (BinErrorPredictor, HintPredictor, LognormalErrorPredictor,
                                  MaxTokensPredictor, OnlineQuantilePredictor, OraclePredictor,
                                  bin_accuracy, keyed_uniform, predictor_from_spec)
from scheduler.types import Request


def _requests(lengths, max_tokens=1000, prompt_len=10):
    reqs = [Request(f"q{i}", prompt_len, max_tokens) for i in range(len(lengths))]
    return reqs, {r.request_id: length for r, length in zip(reqs, lengths)}


def test_oracle_is_exact_and_names_missing_ids():
    reqs, truth = _requests([3.5, 17, 900])
    oracle = OraclePredictor(truth)
    assert [oracle.predict(r) for r in reqs] == [3.5, 17, 900]
    with pytest.raises(ValueError, match="no true length for request 'x'"):
        oracle.predict(Request("x", 1, 10))


@pytest.mark.parametrize("p_error", [0.05, 0.2])
def test_bin_error_flip_rates(p_error):
    k, n = 5, 100_000
    edges = equal_width_edges(k, 0, 1000)
    rng = random.Random(11)
    reqs, truth = _requests([rng.uniform(0, 1000) for _ in range(n)])
    predictor = BinErrorPredictor(truth, edges, p_error, seed=3)
    moves = {b: {-1: 0, 0: 0, 1: 0} for b in range(k)}
    totals = [0] * k
    for r in reqs:
        true_bin = edges.bin_of(truth[r.request_id])
        predicted = predictor.predict(r)
        gap = edges.bin_of(predicted) - true_bin
        assert gap in (-1, 0, 1)
        if gap == 0:
            assert predicted == truth[r.request_id]
        moves[true_bin][gap] += 1
        totals[true_bin] += 1
    tol = 4 * math.sqrt(p_error * (1 - p_error) / (n / k))  # 4 standard errors
    for b in range(1, k - 1):
        assert moves[b][-1] / totals[b] == pytest.approx(p_error, abs=tol)
        assert moves[b][1] / totals[b] == pytest.approx(p_error, abs=tol)
    assert moves[0][-1] == 0 and moves[k - 1][1] == 0
    assert moves[0][1] / totals[0] == pytest.approx(p_error, abs=tol)
    assert moves[k - 1][-1] / totals[k - 1] == pytest.approx(p_error, abs=tol)


def test_bin_error_is_seeded_and_single_bin_never_flips():
    edges = equal_width_edges(4, 0, 100)
    reqs, truth = _requests([float(i % 100) for i in range(500)])
    first, second = (BinErrorPredictor(truth, edges, 0.3, seed=5) for _ in range(2))
    predictions = [first.predict(r) for r in reqs]
    assert predictions == [second.predict(r) for r in reqs]
    assert predictions != [truth[r.request_id] for r in reqs]
    one_bin = BinErrorPredictor(truth, equal_width_edges(1, 0, 100), 0.5, seed=1)
    assert all(one_bin.predict(r) == truth[r.request_id] for r in reqs)
    with pytest.raises(ValueError, match="bin-error probability"):
        BinErrorPredictor(truth, edges, 0.6)


def test_lognormal_error_is_median_unbiased_with_the_given_spread():
    rng = random.Random(2)
    reqs, truth = _requests([rng.uniform(10, 500) for _ in range(40000)])
    predictor = LognormalErrorPredictor(truth, 0.5, seed=9)
    logs = [math.log(predictor.predict(r) / truth[r.request_id]) for r in reqs]
    assert statistics.median(logs) == pytest.approx(0.0, abs=0.02)
    assert statistics.pstdev(logs) == pytest.approx(0.5, rel=0.03)


def test_max_tokens_and_hint():
    with_hint = Request("a", 5, 300, hint=42)
    without = Request("b", 5, 300)
    assert MaxTokensPredictor().predict(without) == 300
    hint = HintPredictor(OraclePredictor({"b": 7}))
    assert hint.predict(with_hint) == 42
    assert hint.predict(without) == 7
    assert HintPredictor().predict(without) == 300


def test_online_predictor_learns_quantiles_per_prompt_bucket():
    predictor = OnlineQuantilePredictor(q=0.5, window=200, min_samples=20, refresh_every=1)
    short_prompt, long_prompt = Request("s", 10, 5000), Request("l", 3000, 5000)
    assert predictor.predict(short_prompt) == 5000  # nothing seen: max_tokens
    rng = random.Random(4)
    for i in range(100):
        predictor.observe(Request(f"s{i}", rng.randint(8, 15), 5000), rng.uniform(90, 110))
    # The long-prompt bucket has no samples of its own: it uses all recent completions.
    assert predictor.predict(long_prompt) == pytest.approx(100, abs=5)
    for i in range(100):
        predictor.observe(Request(f"l{i}", rng.randint(2048, 4000), 5000), rng.uniform(900, 1100))
    assert predictor.predict(short_prompt) == pytest.approx(100, abs=5)
    assert predictor.predict(long_prompt) == pytest.approx(1000, abs=50)
    assert predictor.predict(Request("cap", 3000, 400)) == 400
    # A re-queued overflow is bucketed on its original prompt.
    assert predictor.predict(Request("o", 10 + 2500, 5000, generated=2500)) == \
        pytest.approx(100, abs=5)


def test_online_predictor_quantile_choice():
    predictor = OnlineQuantilePredictor(q=0.9, window=1000, min_samples=10, refresh_every=1)
    for i in range(1, 1001):
        predictor.observe(Request(f"x{i}", 100, 5000), float(i))
    assert predictor.predict(Request("y", 100, 5000)) == pytest.approx(900, abs=1)


def test_bin_accuracy_by_hand():
    edges = equal_width_edges(4, 0, 40)  # edges 10, 20, 30
    truth = [5, 15, 25, 35, 5]
    predicted = [5, 25, 25, 5, 12]  # right, one off, right, three off, one off
    acc = bin_accuracy(truth, predicted, edges)
    assert (acc.n, acc.exact, acc.within_one) == (5, 2 / 5, 4 / 5)
    with pytest.raises(ValueError, match="2 true lengths but 1"):
        bin_accuracy([1, 2], [1], edges)


def test_bin_accuracy_of_the_bin_error_model():
    k, p, n = 4, 0.2, 40000
    edges = equal_width_edges(k, 0, 400)
    rng = random.Random(8)
    reqs, truth = _requests([rng.uniform(0, 400) for _ in range(n)])
    predictor = BinErrorPredictor(truth, edges, p, seed=1)
    acc = bin_accuracy([truth[r.request_id] for r in reqs], [predictor.predict(r) for r in reqs],
                       edges)
    expected_exact = 1 - (2 * p + 2 * p * (k - 2)) / k  # edge bins flip with p, inner with 2p
    assert acc.exact == pytest.approx(expected_exact, abs=0.01)
    assert acc.within_one == 1.0


def test_predictor_from_spec():
    edges = equal_width_edges(3, 0, 30)
    truth = {"a": 4.0}
    assert isinstance(predictor_from_spec("oracle", true_lengths=truth), OraclePredictor)
    bin_error = predictor_from_spec("bin-error:0.2", true_lengths=truth, edges=edges)
    assert isinstance(bin_error, BinErrorPredictor) and bin_error.p_error == 0.2
    assert predictor_from_spec("lognormal:0.7", true_lengths=truth).sigma == 0.7
    assert isinstance(predictor_from_spec("max-tokens"), MaxTokensPredictor)
    assert predictor_from_spec("online:0.8").q == 0.8
    hint = predictor_from_spec("hint:oracle", true_lengths=truth)
    assert isinstance(hint.fallback, OraclePredictor)
    with pytest.raises(ValueError, match="needs the benchmark's true lengths"):
        predictor_from_spec("oracle")
    with pytest.raises(ValueError, match="unknown predictor"):
        predictor_from_spec("psychic")
    with pytest.raises(ValueError, match="not a number"):
        predictor_from_spec("lognormal:wide", true_lengths=truth)


def test_error_draws_are_keyed_by_request_not_by_call_order():
    # The engine also predicts for its warm-up requests and re-predicts overflows: a request's
    # prediction must not depend on what was predicted before it.
    edges = equal_width_edges(4, 0, 100)
    reqs, truth = _requests([float(7 * i % 100) for i in range(400)])
    forward = BinErrorPredictor(truth, edges, 0.3, seed=5)
    backward = BinErrorPredictor(truth, edges, 0.3, seed=5)
    ahead = [forward.predict(r) for r in reqs]
    assert [backward.predict(r) for r in reversed(reqs)][::-1] == ahead
    assert [forward.predict(r) for r in reqs] == ahead  # re-predicting changes nothing
    other_seed = BinErrorPredictor(truth, edges, 0.3, seed=6)
    assert [other_seed.predict(r) for r in reqs] != ahead
    sigma = LognormalErrorPredictor(truth, 0.5, seed=9)
    first = [sigma.predict(r) for r in reqs[1:]]
    assert [sigma.predict(r) for r in reversed(reqs[1:])][::-1] == first


def test_keyed_uniform_is_uniform_and_stable():
    draws = [keyed_uniform(3, f"r{i}") for i in range(20000)]
    assert all(0 < u < 1 for u in draws)
    assert keyed_uniform(3, "r17") == draws[17] and keyed_uniform(4, "r17") != draws[17]
    # Deciles each hold a tenth of the draws, within 4 standard errors.
    tol = 4 * math.sqrt(0.1 * 0.9 / len(draws))
    for d in range(10):
        share = sum(d / 10 <= u < (d + 1) / 10 for u in draws) / len(draws)
        assert share == pytest.approx(0.1, abs=tol)
