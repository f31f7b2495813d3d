"""Multi-bin batching: bins, length predictors, batching policies, a simulator and the theory.

Pure Python (no torch, no numpy), so a million requests simulate on a laptop and the engine
imports only plain data. The ideas and formulas are from arXiv 2412.04504 (Guldogan et al.,
2024): requests are grouped into k bins by predicted output length, each bin forms its own
batches of B, and batches are served from one central queue.

Scheduler API (``MultiBinScheduler``; ``standard_scheduler`` is k = 1). The policy never reads
a clock: the caller passes ``now``, so the server and the simulator run the same code.

    submit(request, now)                   predict, bin and queue; QueueFull at max_queue
    next_plan(now, flush=False)            -> BatchPlan | None: the next batch to run
    refill(bin_or_None, n, now)            -> list[Request]: rows for bin-continuous (a bin)
                                              or continuous (None: any bin, oldest first)
    on_finish(request_id, true_len, now)   a request completed (feeds predictor and edges)
    on_overflow(request, now)              the SAME Request, prompt_len/generated advanced;
                                              re-queued, same id, in a higher bin
    cancel(request_id, now) -> bool        drop a queued or in-flight request
    next_deadline() -> float | None        when the next partial batch forms by max_wait
    pending(), in_flight(), queue_depths() counts
    close(now=None)                        final flush: all partial batches form now

``BatchPlan.max_new_tokens_bound = min(bin bound, max remaining max_tokens of its members)``
and ``max_prompt_len`` is its members' longest prompt; the engine sizes the slab from them.

What ``--bins K`` means: K bins with ``AdaptiveEdges``. Before any length has been seen, the
edges are a prior, equal width over [1, max_tokens]; once ``min_samples`` requests have
completed (default 512), and every ``refresh_every`` completions after that (default 256), the
edges become the equal-mass edges (the paper's optimum) of the last ``window`` completed
lengths (default 4096). A queued request keeps the bin it was given. When the length
distribution is known (benchmarks, the simulator), fixed edges are used instead:
``equal_mass_edges``, ``equal_width_edges``, ``exponential_edges`` or ``explicit_edges``.

Modules: ``types`` (Request, BatchPlan), ``bins``, ``predictors``, ``policy``, ``workload``
(length distributions, arrivals), ``service`` (analytic step-time model), ``schemas`` (the
versioned per-batch log and step-time table), ``simulator``, ``theory``; the command line is
``python -m scheduler.simulate --help``.
"""

from scheduler.bins import (AdaptiveEdges, BinEdges, equal_mass_edges, equal_width_edges,
                            explicit_edges, exponential_edges)
from scheduler.policy import MultiBinScheduler, QueueFull, standard_scheduler
from scheduler.predictors import (BinAccuracy, BinErrorPredictor, HintPredictor,
                                  LognormalErrorPredictor, MaxTokensPredictor,
                                  OnlineQuantilePredictor, OraclePredictor, Predictor,
                                  bin_accuracy, predictor_from_spec)
from scheduler.schemas import (BATCH_LOG_SCHEMA_VERSION, STEP_TABLE_SCHEMA_VERSION, BatchRecord,
                               StepTimeTable)
from scheduler.service import PAPER_SERVICE, LinearServiceModel
from scheduler.simulator import SimResult, simulate
from scheduler.types import BatchPlan, Request
from scheduler.workload import Workload, make_workload, parse_lengths

__all__ = [
    "AdaptiveEdges", "BinEdges", "equal_mass_edges", "equal_width_edges", "explicit_edges",
    "exponential_edges", "MultiBinScheduler", "QueueFull", "standard_scheduler", "BinAccuracy",
    "BinErrorPredictor", "HintPredictor", "LognormalErrorPredictor", "MaxTokensPredictor",
    "OnlineQuantilePredictor", "OraclePredictor", "Predictor", "bin_accuracy",
    "predictor_from_spec", "BATCH_LOG_SCHEMA_VERSION", "STEP_TABLE_SCHEMA_VERSION",
    "BatchRecord", "StepTimeTable", "PAPER_SERVICE", "LinearServiceModel", "SimResult",
    "simulate", "BatchPlan", "Request", "Workload", "make_workload", "parse_lengths",
]
