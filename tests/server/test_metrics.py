"""The Prometheus exposition: latency histograms and the engine's batching counters."""

from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import ServerMetrics


def samples(metrics: ServerMetrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_latency_histograms_and_counters():
    m = ServerMetrics()
    m.observe_choice(arrival=10.0, first_token=10.25, finish=11.25, num_tokens=5, finish_reason="length")
    m.observe_choice(arrival=10.0, first_token=None, finish=10.5, num_tokens=0, finish_reason="abort")
    got = samples(m)
    assert got[("bindecode_time_to_first_token_seconds_count", ())] == 1
    assert got[("bindecode_time_to_first_token_seconds_sum", ())] == 0.25
    assert got[("bindecode_e2e_request_latency_seconds_sum", ())] == 1.25
    assert got[("bindecode_time_per_output_token_seconds_sum", ())] == 0.25  # 1.0 s over 4 gaps
    assert got[("bindecode_request_choices_finished_total", (("finish_reason", "length"),))] == 1
    assert got[("bindecode_request_choices_finished_total", (("finish_reason", "abort"),))] == 1


def test_engine_stats_per_bin_and_scalar():
    m = ServerMetrics()
    m.engine_stats = {"queue_depth": [3, 0, 7], "batches_formed": [1, 2, 5], "occupancy": 0.75,
                      "padding_waste": 0.4, "overflows": 2, "tokens_generated": 1234, "unknown": 9}
    got = samples(m)
    assert [got[("bindecode_queue_depth", (("bin", str(b)),))] for b in range(3)] == [3, 0, 7]
    assert got[("bindecode_batches_formed_total", (("bin", "2"),))] == 5
    assert got[("bindecode_batch_occupancy", ())] == 0.75
    assert got[("bindecode_padding_waste", ())] == 0.4
    assert got[("bindecode_overflows_total", ())] == 2
    assert got[("bindecode_engine_generated_tokens_total", ())] == 1234


def test_tokens_per_second_window():
    m = ServerMetrics()
    m.observe_tokens(50, now=100.0)
    m.observe_tokens(50, now=105.0)
    assert m.tokens_per_second(now=106.0) == 10.0   # 100 tokens over the 10 s window
    assert m.tokens_per_second(now=112.0) == 5.0    # the first 50 left the window
    assert samples(m)[("bindecode_generation_tokens_total", ())] == 100
