"""Versioned files shared between packages: the per-batch JSONL log and the step-time table.

The engine and the GPU benchmarks write them; the simulator and the plotting scripts read them.
A reader refuses a version it does not know rather than guess at changed fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.interpolate import CurvesByBatchSize

BATCH_LOG_SCHEMA_VERSION = 1
STEP_TABLE_SCHEMA_VERSION = 1


@dataclass
class BatchRecord:
    """One line of the per-batch JSONL log.

    Attributes:
        bin: the plan's bin. batch_size: B, rows in the slab. capacity: C, token slots per row.
        n_requests: rows that held a request (refilled rows count once per request).
        prompt_lens, output_lens: per request, tokens prefilled and new tokens generated in
            this batch (an overflowed request: tokens up to its eviction).
        steps: decode steps the slab ran. idle_row_steps: row-steps with no live request
            (padding waste = idle_row_steps / (batch_size * steps)). With one step in flight
            the engine computes a finishing row once more before it reads its last token;
            that step counts as live, not idle.
        overflows: requests evicted at the bound and re-queued; in the refilling modes
            also a re-queued request turned away at a refill because its prompt (with
            the tokens made before its eviction) no longer fits this slab: it goes up a bin.
        prefill_s, decode_s, wall_s: seconds in prefill, in decode steps, and in all.
        tokens_per_s: new tokens over wall_s. mode: static | bin-continuous | continuous.
        request_ids, max_new_tokens_bound, formed_at, started_at: from the plan and the clock.
        extra: free-form labels of the run (k, predictor, seed ...), not interpreted here.
    """

    bin: int
    batch_size: int
    capacity: int
    n_requests: int
    prompt_lens: list[int]
    output_lens: list[int]
    steps: int
    idle_row_steps: int
    overflows: int
    prefill_s: float
    decode_s: float
    wall_s: float
    tokens_per_s: float
    mode: str
    request_ids: list[str] = field(default_factory=list)
    max_new_tokens_bound: int = 0
    formed_at: float = 0.0
    started_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = BATCH_LOG_SCHEMA_VERSION

    def __post_init__(self):
        if self.schema_version != BATCH_LOG_SCHEMA_VERSION:
            raise ValueError(f"BatchRecord schema_version {self.schema_version!r} is not the "
                             f"supported {BATCH_LOG_SCHEMA_VERSION}")
        if not len(self.prompt_lens) == len(self.output_lens) == self.n_requests:
            raise ValueError(f"BatchRecord: n_requests={self.n_requests} but "
                             f"{len(self.prompt_lens)} prompt_lens and {len(self.output_lens)} "
                             f"output_lens")
        if self.mode not in ("static", "bin-continuous", "continuous"):
            raise ValueError(f"BatchRecord: unknown mode {self.mode!r}")

    def to_json_line(self) -> str:
        """One JSON object, no newline inside, ``schema_version`` first."""
        record = dataclasses.asdict(self)
        record = {"schema_version": record.pop("schema_version"), **record}
        return json.dumps(record, separators=(",", ":"))

    @classmethod
    def from_json_line(cls, line: str) -> "BatchRecord":
        """Parse a line written by ``to_json_line``; unknown versions and fields are errors."""
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError(f"batch log line is not a JSON object: {line[:80]!r}")
        version = record.get("schema_version")
        if version != BATCH_LOG_SCHEMA_VERSION:
            raise ValueError(f"batch log record has schema_version {version!r}; this reader "
                             f"understands version {BATCH_LOG_SCHEMA_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"batch log record has unknown fields {unknown} for schema_version "
                             f"{version}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in record
                         and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ValueError(f"batch log record lacks required fields {missing}")
        return cls(**record)


@dataclass
class StepTimeTable:
    """Measured step times of one model on one device.

    Attributes:
        device, model: what was measured (e.g. "NVIDIA H100 80GB HBM3", "dummy:llama-3.2-1b").
        decode: rows (B, live_tokens, seconds): one decode step of a B-row slab whose live rows
            hold ``live_tokens`` KV tokens in all (dead rows hold none).
        prefill: rows (B, prompt_tokens, seconds): prefilling B rows whose prompts sum to
            ``prompt_tokens`` (padding included if the engine pads prompts).
        meta: commit, date, dtype, command ... (free-form).

    Lookups interpolate piecewise-linearly in tokens and linearly in B; below the smallest
    measurement they clamp, above the largest they extend the last segment (interpolate.py).
    """

    device: str
    model: str
    decode: list[tuple[int, int, float]]
    prefill: list[tuple[int, int, float]]
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = STEP_TABLE_SCHEMA_VERSION

    integer_steps = True  # a measured step is one whole token (class attribute, not a field)

    def __post_init__(self):
        if self.version != STEP_TABLE_SCHEMA_VERSION:
            raise ValueError(f"step-time table version {self.version!r} is not the supported "
                             f"{STEP_TABLE_SCHEMA_VERSION}")
        self.decode = [tuple(row) for row in self.decode]
        self.prefill = [tuple(row) for row in self.prefill]
        for name, rows in (("decode", self.decode), ("prefill", self.prefill)):
            if any(len(row) != 3 for row in rows):
                raise ValueError(f"step-time table {name} rows must be (B, tokens, seconds)")
        self._decode = CurvesByBatchSize(self.decode, "step-time table decode")
        self._prefill = CurvesByBatchSize(self.prefill, "step-time table prefill")

    def decode_time(self, batch_size: int, live_tokens: float) -> float:
        """Seconds for one decode step of B rows holding ``live_tokens`` KV tokens."""
        return self._decode.value(batch_size, live_tokens)

    def decode_sum(self, batch_size: int, live_start: float, live_step: float,
                   n_steps: float) -> float:
        """Seconds for ``n_steps`` (a whole number) steps whose live tokens start at
        ``live_start`` and grow by ``live_step`` per step."""
        n = int(n_steps)
        if n != n_steps:
            raise ValueError(f"a measured step table needs whole steps, got {n_steps}")
        return self._decode.sum_arithmetic(batch_size, live_start, live_step, n)

    def steps_in(self, batch_size: int, live_start: float, live_step: float,
                 duration: float) -> int:
        """The fewest whole steps whose time reaches ``duration``."""
        if duration <= 0:
            return 0
        hi = 1
        while self.decode_sum(batch_size, live_start, live_step, hi) < duration:
            hi *= 2
        lo = hi // 2  # decode_sum(lo) < duration <= decode_sum(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.decode_sum(batch_size, live_start, live_step, mid) < duration:
                lo = mid
            else:
                hi = mid
        return hi

    def prefill_time(self, batch_size: int, prompt_tokens: float) -> float:
        """Seconds to prefill B rows whose prompts sum to ``prompt_tokens``."""
        if batch_size == 0:
            return 0.0
        return self._prefill.value(batch_size, prompt_tokens)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": self.version, "device": self.device, "model": self.model,
                   "meta": self.meta, "decode": [list(r) for r in self.decode],
                   "prefill": [list(r) for r in self.prefill]}
        path.write_text(json.dumps(payload, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "StepTimeTable":
        """Read a table written by ``save``; an unknown version is an error."""
        payload = json.loads(Path(path).read_text())
        version = payload.get("version")
        if version != STEP_TABLE_SCHEMA_VERSION:
            raise ValueError(f"{path}: step-time table version {version!r}; this reader "
                             f"understands version {STEP_TABLE_SCHEMA_VERSION}")
        unknown = sorted(set(payload) - {"version", "device", "model", "meta", "decode", "prefill"})
        if unknown:
            raise ValueError(f"{path}: unknown step-time table fields {unknown}")
        try:
            return cls(device=payload["device"], model=payload["model"], decode=payload["decode"],
                       prefill=payload["prefill"], meta=payload.get("meta", {}), version=version)
        except KeyError as missing:
            raise ValueError(f"{path}: step-time table lacks field {missing}") from None
