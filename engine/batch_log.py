"""Per-batch accounting: what one batch did, turned into a ``scheduler.schemas.BatchRecord``.

The engine keeps one ``BatchStats`` per running batch and, when the batch ends, writes its
record as one JSON line (``EngineOptions.log_batches``). The schema lives in ``scheduler`` so the
simulator and the plotting scripts read exactly what the engine writes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.schemas import BatchRecord


@dataclass
class _Member:
    request_id: str
    prompt_len: int
    output_at_join: int
    output_at_leave: int | None = None


@dataclass
class BatchStats:
    """Counters of one batch (a static batch, or one period of a refilled slab).

    Times: ``started`` is a ``time.perf_counter()`` reading; prefill seconds are measured on
    the device (``runner.Stopwatch``) and summed when the batch ends.
    """

    bin: int
    batch_size: int
    capacity: int
    mode: str
    max_new_tokens_bound: int
    formed_at: float
    started_at: float
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    idle_row_steps: int = 0
    overflows: int = 0
    refills: int = 0            # prefills of new rows while other rows were live
    refill_stalled_rows: int = 0  # live rows that waited for those prefills, summed
    prefill_watches: list = field(default_factory=list)
    refill_watches: list = field(default_factory=list)
    members: dict[str, _Member] = field(default_factory=dict)
    _order: list[_Member] = field(default_factory=list)

    def join(self, request_id: str, prompt_len: int, output_len: int) -> None:
        member = _Member(request_id, prompt_len, output_len)
        self.members[request_id] = member
        self._order.append(member)

    def leave(self, request_id: str, output_len: int) -> None:
        member = self.members.pop(request_id, None)
        if member is not None:
            member.output_at_leave = output_len

    def record(self, extra: dict) -> BatchRecord:
        """The batch's log record; call once every member has left."""
        wall = time.perf_counter() - self.started
        prefill = sum(w.seconds() for w in self.prefill_watches)
        refill = sum(w.seconds() for w in self.refill_watches)
        outputs = [(m.output_at_join if m.output_at_leave is None else m.output_at_leave)
                   - m.output_at_join for m in self._order]
        return BatchRecord(
            bin=self.bin, batch_size=self.batch_size, capacity=self.capacity,
            n_requests=len(self._order), prompt_lens=[m.prompt_len for m in self._order],
            output_lens=outputs, steps=self.steps, idle_row_steps=self.idle_row_steps,
            overflows=self.overflows, prefill_s=prefill, decode_s=max(wall - prefill, 0.0),
            wall_s=wall, tokens_per_s=sum(outputs) / wall if wall > 0 else 0.0, mode=self.mode,
            request_ids=[m.request_id for m in self._order],
            max_new_tokens_bound=self.max_new_tokens_bound, formed_at=self.formed_at,
            started_at=self.started_at,
            extra={**extra, "refills": self.refills, "refill_prefill_s": refill,
                   "refill_stalled_rows": self.refill_stalled_rows})


class BatchLog:
    """Appends records to a JSONL file (if a path is given) and keeps the latest in memory."""

    def __init__(self, path: str | Path | None, keep: int = 4096):
        self.records: deque[BatchRecord] = deque(maxlen=keep)
        self._file = None
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", buffering=1)

    def write(self, record: BatchRecord) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(record.to_json_line() + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
