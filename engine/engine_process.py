"""The engine loop in its own process, and the HTTP process's handle on it.

The HTTP process tokenises, detokenises and streams; the engine process only runs
``EngineCore`` (scheduler, batches, GPU). Two ``multiprocessing`` queues connect them:

    commands  (HTTP -> engine): AddRequests, AbortRequests, Shutdown
    outputs   (engine -> HTTP): EngineReady once, then one EngineOutput per loop iteration that
                                has news (token updates, rejected requests, a stats snapshot), and
                                EngineFailed if the loop dies.

Updates are batched per iteration, so the cost of crossing processes does not grow with the
batch size. In the HTTP process a reader thread hands each EngineOutput to the asyncio loop,
which routes every TokenUpdate to the queue of the HTTP request that owns it.

Only our own plain dataclasses cross the queues (multiprocessing pickles them between our two
processes); nothing from clients or disk is unpickled.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.request import EngineRequest, TokenUpdate
from scheduler.policy import QueueFull

STATS_INTERVAL_S = 0.25      # how often the engine attaches a stats snapshot to its outputs
IDLE_POLL_S = 0.5            # how long an idle engine blocks on its command queue
BUSY_POLL_S = 0.002          # shortest wait for commands while requests wait for a deadline
PARENT_CHECK_S = 1.0         # how often the engine checks that the HTTP process still exists


# ---------------------------------------------------------------- messages

@dataclass
class AddRequests:
    """Admit all of ``requests`` or none: on the first refusal the ones already added are
    aborted and the whole group is rejected."""

    group_id: str
    requests: list[EngineRequest]


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class Shutdown:
    pass


@dataclass
class Rejected:
    """reason: "queue_full" (answer 429), "invalid" (400) or "error" (500)."""

    group_id: str
    request_ids: list[str]
    reason: str
    message: str


@dataclass
class EngineInfo:
    """What the HTTP process needs to know about the engine it talks to."""

    model: str
    max_model_len: int
    max_output_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    backend: str


@dataclass
class EngineReady:
    info: EngineInfo


@dataclass
class EngineOutput:
    updates: list[TokenUpdate] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    stats: dict | None = None


@dataclass
class EngineFailed:
    message: str


# ---------------------------------------------------------------- engine process

def _default_core_factory(options):
    from engine.engine_core import EngineCore

    return EngineCore(options)


def engine_info(core: Any, options: Any) -> EngineInfo:
    """Describe a built EngineCore for the HTTP process."""
    config = core.model_config
    return EngineInfo(model=options.model, max_model_len=core.max_model_len,
                      max_output_len=core.max_output_len, vocab_size=config.vocab_size,
                      eos_token_ids=tuple(config.eos_token_ids), device=str(core.device),
                      backend=str(core.backend))


def run_engine(options: Any, core_factory: Callable[[Any], Any], commands: mp.Queue,
               outputs: mp.Queue) -> None:
    """Entry point of the engine process: build the core, announce it, loop until Shutdown.

    ``core_factory(options)`` returns an ``EngineCore`` (or anything with its methods and its
    ``model_config``, ``max_model_len``, ``max_output_len``, ``device``, ``backend``).
    An exception escaping ``core.step`` (one that poisons the device, e.g. a CUDA fault; a
    failure inside one batch is reported by the core as error updates instead) ends the
    process with exit code 1 after sending EngineFailed.
    """
    # Ctrl-C reaches the whole process group; the HTTP process decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        core = core_factory(options)
        info = engine_info(core, options)
    except BaseException as e:  # noqa: BLE001 - any start-up failure must reach the parent
        # A ValueError (ModelLoadError included) is the user's input and its message says what
        # is wrong; anything else is a bug, and its traceback helps.
        where = "" if isinstance(e, ValueError) else f"\n{traceback.format_exc()}"
        outputs.put(EngineFailed(f"engine failed to start: {type(e).__name__}: {e}{where}"))
        return
    outputs.put(EngineReady(info))
    try:
        _EngineLoop(core, commands, outputs).run()
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        outputs.put(EngineFailed(f"engine loop failed: {type(e).__name__}: {e}"))
        # Deliver the message, then leave at once: after a device fault, teardown can hang.
        outputs.close()
        outputs.join_thread()
        os._exit(1)
    core.close()


class _EngineLoop:
    def __init__(self, core: Any, commands: mp.Queue, outputs: mp.Queue):
        self.core, self.commands, self.outputs = core, commands, outputs
        self.rejected: list[Rejected] = []
        self.last_stats = 0.0
        self.parent_checked_at = 0.0
        self.parent = mp.parent_process()

    def run(self) -> None:
        wait_s = IDLE_POLL_S
        while True:
            if not self._read_commands(wait_s):
                return
            now = time.monotonic()
            updates = self.core.step(now)
            self._emit(updates, now)
            deadline = self.core.next_deadline()
            if updates or self.core.is_running():
                wait_s = 0.0
            elif deadline is not None:
                # A partial batch falls due at `deadline`; never spin faster than BUSY_POLL_S.
                wait_s = min(max(deadline - now, BUSY_POLL_S), IDLE_POLL_S)
            else:
                wait_s = IDLE_POLL_S
            if now - self.parent_checked_at >= PARENT_CHECK_S:
                self.parent_checked_at = now
                if self.parent is not None and not self.parent.is_alive():
                    return  # the HTTP process is gone; nobody reads our outputs

    def _read_commands(self, wait_s: float) -> bool:
        """Apply every queued command, blocking up to ``wait_s`` for the first one.
        Returns False on Shutdown."""
        try:
            command = (self.commands.get(timeout=wait_s) if wait_s > 0
                       else self.commands.get_nowait())
        except queue.Empty:
            return True
        while True:
            if isinstance(command, Shutdown):
                return False
            if isinstance(command, AddRequests):
                self._add(command)
            elif isinstance(command, AbortRequests):
                for request_id in command.request_ids:
                    self._abort(request_id)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, command: AddRequests) -> None:
        max_queue = getattr(getattr(self.core, "options", None), "max_queue", None)
        if max_queue is not None and len(command.requests) > max_queue:
            # Not a full queue to retry later (429): this group could never be queued.
            self.rejected.append(Rejected(
                command.group_id, [r.request_id for r in command.requests], "invalid",
                f"{len(command.requests)} completions in one request exceed the server's "
                f"--max-queue {max_queue}"))
            return
        added: list[str] = []
        for request in command.requests:
            try:
                self.core.add_request(request)
            except Exception as e:  # noqa: BLE001 - every refusal goes back to the client
                reason = ("queue_full" if isinstance(e, QueueFull)
                          else "invalid" if isinstance(e, ValueError) else "error")
                for request_id in added:
                    self._abort(request_id)
                group = [r.request_id for r in command.requests]
                self.rejected.append(Rejected(command.group_id, group, reason, str(e)))
                return
            added.append(request.request_id)

    def _abort(self, request_id: str) -> None:
        try:
            self.core.abort_request(request_id)
        except (KeyError, ValueError):
            pass  # already finished: its final update is on the way

    def _emit(self, updates: list[TokenUpdate], now: float) -> None:
        stats = None
        if now - self.last_stats >= STATS_INTERVAL_S:
            stats, self.last_stats = self.core.stats(), now
        if updates or self.rejected or stats is not None:
            self.outputs.put(EngineOutput(updates, self.rejected, stats))
            self.rejected = []


# ---------------------------------------------------------------- HTTP-process handle

@dataclass
class EngineDied:
    """Put in every pending request's queue when the engine process is gone."""

    message: str


class EngineClient:
    """Starts the engine process and routes its outputs to per-request asyncio queues.

    Use from the HTTP process: ``start()``, ``wait_ready()`` (returns EngineInfo), then
    ``attach()`` inside the running event loop, then ``submit``/``abort`` from request handlers, and
    ``stop()`` at shutdown.
    """

    def __init__(self, options: Any, core_factory: Callable[[Any], Any] = _default_core_factory):
        context = mp.get_context("spawn")
        self._commands = context.Queue()
        self._outputs = context.Queue()
        self._process = context.Process(target=run_engine, name="bindecode-engine", daemon=True,
                                        args=(options, core_factory, self._commands, self._outputs))
        self._sinks: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._monitor: asyncio.Task | None = None
        self.failure: str | None = None
        self.info: EngineInfo | None = None
        self.latest_stats: dict = {}
        self.on_output: Callable[[EngineOutput], None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self.failure is None and self._process.is_alive()

    def start(self) -> None:
        """Start the engine process (returns at once; see ``wait_ready``)."""
        self._process.start()

    def wait_ready(self, should_stop: Callable[[], bool] = lambda: False) -> EngineInfo:
        """Block until the engine is built. Raises RuntimeError with the engine's message if it
        fails to start, or if ``should_stop()`` turns true meanwhile."""
        while True:
            if should_stop():
                raise RuntimeError("interrupted while the engine was starting")
            try:
                message = self._outputs.get(timeout=0.2)
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(f"engine process exited with code {self._process.exitcode} "
                                       f"while starting") from None
                continue
            if isinstance(message, EngineFailed):
                self._process.join(5)
                raise RuntimeError(message.message)
            if isinstance(message, EngineReady):
                self.info = message.info
                return message.info

    def attach(self) -> None:
        """Start routing outputs into the running event loop (call from inside it)."""
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read_outputs, name="engine-output-reader",
                                        daemon=True)
        self._reader.start()
        self._monitor = self._loop.create_task(self._watch_process())

    def submit(self, group_id: str, requests: list[EngineRequest], sink: asyncio.Queue) -> None:
        """Send a group of requests; their TokenUpdates (or one Rejected, or EngineDied) will
        arrive in ``sink``."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        for request in requests:
            self._sinks[request.request_id] = sink
        self._commands.put(AddRequests(group_id, requests))

    def abort(self, request_ids: list[str]) -> None:
        """Stop generating for these requests; their later updates are dropped."""
        for request_id in request_ids:
            self._sinks.pop(request_id, None)
        if request_ids and self.failure is None:
            self._commands.put(AbortRequests(list(request_ids)))

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the engine to exit; terminate, then kill it if it does not within ``timeout``."""
        if self._process.is_alive():
            try:
                self._commands.put(Shutdown())
            except (ValueError, OSError):
                pass
            self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(2.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(2.0)
        if self.failure is None:
            self.failure = "the engine process was stopped"
        if self._monitor is not None:
            self._monitor.cancel()
        # The queues' feeder threads must not block interpreter exit on a dead reader.
        self._commands.cancel_join_thread()
        self._outputs.cancel_join_thread()

    # -- output routing (reader thread -> event loop)

    def _read_outputs(self) -> None:
        while True:
            try:
                message = self._outputs.get(timeout=0.2)
            except queue.Empty:
                if not self._process.is_alive():
                    self._call_in_loop(self._engine_died, f"the engine process exited with code "
                                                          f"{self._process.exitcode}")
                    return
                continue
            except (EOFError, OSError, ValueError):
                self._call_in_loop(self._engine_died, "lost the connection to the engine process")
                return
            if isinstance(message, EngineFailed):
                self._call_in_loop(self._engine_died, message.message)
                return
            if isinstance(message, EngineOutput):
                self._call_in_loop(self._dispatch, message)

    def _call_in_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: the server is exiting

    async def _watch_process(self) -> None:
        """Backstop for a reader stuck on a half-written message from a killed process."""
        while self.failure is None:
            await asyncio.sleep(0.5)
            if not self._process.is_alive():
                await asyncio.sleep(2.0)  # let the reader deliver what was sent before the exit
                self._engine_died(f"the engine process exited with code {self._process.exitcode}")

    def _dispatch(self, output: EngineOutput) -> None:
        if output.stats is not None:
            self.latest_stats = output.stats
        for update in output.updates:
            sink = self._sinks.get(update.request_id)
            if sink is None:
                continue  # aborted by us, or unknown
            sink.put_nowait(update)
            if update.finished:
                del self._sinks[update.request_id]
        for rejected in output.rejected:
            sinks = [self._sinks.pop(i, None) for i in rejected.request_ids]
            sink = next((s for s in sinks if s is not None), None)
            if sink is not None:
                sink.put_nowait(rejected)
        if self.on_output is not None:
            self.on_output(output)

    def _engine_died(self, message: str) -> None:
        if self.failure is not None and not self._sinks:
            return
        self.failure = self.failure or message
        for sink in {id(s): s for s in self._sinks.values()}.values():
            sink.put_nowait(EngineDied(self.failure))
        self._sinks.clear()
