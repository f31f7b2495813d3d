import math

import pytest

from engine.options import EngineOptions


@pytest.mark.parametrize("field, value, message", [
    ("kv_cache_gb", 0.0, "kv_cache_gb"),
    ("kv_cache_gb", math.inf, "kv_cache_gb"),
    ("kv_cache_gb", math.nan, "kv_cache_gb"),
    ("max_wait_ms", -1.0, "max_wait_ms"),
    ("max_wait_ms", math.nan, "max_wait_ms"),
    ("starvation_wait_ms", math.nan, "starvation_wait_ms"),
    ("bin_edges", (64, math.nan), "bin_edges"),
    ("bin_edges", (64, math.inf), "bin_edges"),
    ("bin_edges", (64, 32), "bin_edges"),
    ("kv_memory_fraction", 1.5, "kv_memory_fraction"),
])
def test_bad_options_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineOptions(**{field: value})


def test_unbounded_waits_are_allowed():
    options = EngineOptions(max_wait_ms=math.inf, starvation_wait_ms=math.inf, kv_cache_gb=0.5)
    assert options.max_wait_ms == math.inf and options.kv_cache_gb == 0.5
