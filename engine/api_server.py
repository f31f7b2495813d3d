"""The OpenAI-compatible HTTP front end: routes, streaming, auth, limits and shutdown.

Every accepted request becomes a ``Generation``: one engine request per (prompt, choice), all
feeding one asyncio queue that the engine client fills with TokenUpdates. The HTTP process
detokenises incrementally and cuts at stop strings (then aborts the engine request, freeing
its row). Every request ends in a response, an error response or an SSE error event:

    engine refuses (queue full / invalid)  -> 429 / 400 at once
    a batch fails before the first token  -> 500; after streaming started -> SSE error event
    engine process dies                   -> pending: 500 / SSE error; new requests: 503
    client disconnects                    -> its engine requests are aborted
    shutdown (SIGTERM)                     -> new requests 503; in-flight ones finish or, after
                                             the drain timeout, end with 503 / an SSE error
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.api_protocol import (APIError, ChatCompletionRequest, ChatFormat, CompletionFormat,
                                 CompletionRequest, ModelCard, ModelList, bad_request,
                                 check_model_name, check_token_ids, new_id, now_s, parse_request,
                                 resolve_max_tokens)
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_process import EngineClient, EngineDied, EngineInfo, Rejected
from engine.metrics import ServerMetrics
from engine.request import EngineRequest, SamplingParams, TokenUpdate
from engine.seeds import derive_seed

log = logging.getLogger("engine.serve")

DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allow_target_len: bool = False
    shutdown_timeout: float = 10.0


class ClientGone(Exception):
    """The HTTP client disconnected."""


@dataclass
class _Interrupted:
    message: str


_CLIENT_GONE = object()


class ServerState:
    """Everything the routes share: config, engine handle, tokenizer, metrics, live requests."""

    def __init__(self, config: ServerConfig, engine: EngineClient, info: EngineInfo,
                 tokenizer: Any):
        self.config, self.engine, self.info, self.tokenizer = config, engine, info, tokenizer
        self.metrics = ServerMetrics()
        self.started = now_s()
        self.draining = False
        self.active: set[Generation] = set()
        engine.on_output = self._count_output

    def _count_output(self, output) -> None:
        tokens = sum(len(u.new_token_ids) for u in output.updates)
        if tokens:
            self.metrics.observe_tokens(tokens)

    def check_accepting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error",
                           code="shutting_down")
        if not self.engine.alive:
            raise APIError(503, f"the engine is not running: {self.engine.failure}",
                           type="server_error", code="engine_unavailable")

    def begin_drain(self) -> None:
        """Stop accepting requests; after most of the shutdown timeout, interrupt the rest."""
        if self.draining:
            return
        self.draining = True
        drain_s = 0.7 * self.config.shutdown_timeout  # the rest: closing connections, engine
        asyncio.get_running_loop().create_task(self._interrupt_after(drain_s))

    async def _interrupt_after(self, delay: float) -> None:
        deadline = time.monotonic() + delay
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for generation in list(self.active):
            generation.interrupt("the server is shutting down")


# ---------------------------------------------------------------- one request's generation

@dataclass
class Choice:
    index: int
    engine_id: str
    prompt_index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_time: float | None = None

    @property
    def text(self) -> str:
        return self.detokenizer.text


@dataclass
class Delta:
    """What one TokenUpdate added to a choice."""

    choice: Choice
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


def _finite(logprobs: list[float]) -> list[float]:
    """JSON has no -inf: a token of probability 0 gets -9999, as other OpenAI servers do."""
    return [lp if math.isfinite(lp) else -9999.0 for lp in map(float, logprobs)]


def _coalesce(events: list) -> list:
    """Merge the TokenUpdates of one request into one (at the first one's place); other
    events keep their order."""
    out, merged = [], {}
    for event in events:
        if isinstance(event, TokenUpdate):
            first = merged.get(event.request_id)
            if first is not None and not first.finished:
                first.new_token_ids += event.new_token_ids
                if event.new_logprobs is not None:
                    first.new_logprobs = (first.new_logprobs or []) + event.new_logprobs
                first.finished = event.finished
                first.finish_reason, first.error = event.finish_reason, event.error
                continue
            event = dataclasses.replace(event, new_token_ids=list(event.new_token_ids),
                                        new_logprobs=None if event.new_logprobs is None
                                        else list(event.new_logprobs))
            merged[event.request_id] = event
        out.append(event)
    return out


class Generation:
    """The engine requests of one HTTP request, and the text they have produced so far."""

    def __init__(self, state: ServerState, request: Request, prompts: list[list[int]],
                 params: list[SamplingParams], n: int, stop: list[str], hint: int | None,
                 target_len: int | None):
        self.state, self.http_request = state, request
        self.id = new_id("gen")
        self.arrival = time.monotonic()
        self.prompts = prompts
        self.sink: asyncio.Queue = asyncio.Queue()
        self.choices: dict[str, Choice] = {}
        self.engine_requests: list[EngineRequest] = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                index = p * n + i
                engine_id = f"{self.id}-{index}"
                self.choices[engine_id] = Choice(index, engine_id, p, IncrementalDetokenizer(
                    state.tokenizer, prompt, stop))
                self.engine_requests.append(EngineRequest(
                    engine_id, prompt, params[index], arrival_time=self.arrival, hint=hint,
                    target_len=target_len))
        self._watcher: asyncio.Task | None = None
        self._deferred: Exception | None = None
        self._closed = False

    @property
    def ordered_choices(self) -> list[Choice]:
        return sorted(self.choices.values(), key=lambda c: c.index)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices.values())

    def submit(self) -> None:
        try:
            self.state.engine.submit(self.id, self.engine_requests, self.sink)
        except RuntimeError as e:  # the engine died since check_accepting
            self._closed = True
            raise APIError(503, f"the engine is not running: {e}", type="server_error",
                           code="engine_unavailable") from None
        self.state.active.add(self)
        self.state.metrics.in_flight.inc()
        self.state.metrics.prompt_tokens.inc(sum(len(p) for p in self.prompts))
        self._watcher = asyncio.get_running_loop().create_task(self._watch_disconnect())

    async def _watch_disconnect(self) -> None:
        while (await self.http_request.receive())["type"] != "http.disconnect":
            pass
        self.sink.put_nowait(_CLIENT_GONE)
        # Close here too: a stream whose body never started would not close it itself.
        self.close()

    def interrupt(self, message: str) -> None:
        self.sink.put_nowait(_Interrupted(message))

    async def next_deltas(self) -> list[Delta] | None:
        """Wait for news; returns the deltas of every update queued by then (one per choice:
        a client that fell behind gets fewer, larger chunks), or None once all choices have
        finished. Raises APIError (engine refusal, batch failure, engine death, shutdown) or
        ClientGone, after the deltas that arrived before it."""
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        while not self.finished:
            events = [await self.sink.get()]
            while not self.sink.empty():
                events.append(self.sink.get_nowait())
            deltas = []
            for event in _coalesce(events):
                try:
                    delta = self._handle(event)
                except (APIError, ClientGone) as e:
                    self._deferred = e
                    delta = None
                if delta is not None:
                    deltas.append(delta)
                if self._deferred is not None:
                    break
            if deltas:
                return deltas  # the deferred error, if any, comes with the next call
            if self._deferred is not None:
                error, self._deferred = self._deferred, None
                raise error
        return None

    def _handle(self, event: Any) -> Delta | None:
        if isinstance(event, TokenUpdate):
            return self._apply(event)
        if event is _CLIENT_GONE:
            raise ClientGone()
        if isinstance(event, Rejected):
            self._mark_all_finished()
            if event.reason == "queue_full":
                raise APIError(429, event.message, type="rate_limit_error", code="queue_full")
            if event.reason == "invalid":
                raise bad_request(event.message)
            raise APIError(500, event.message, type="server_error")
        if isinstance(event, EngineDied):
            self._mark_all_finished()
            raise APIError(500, f"the engine failed: {event.message}", type="server_error",
                           code="engine_failed")
        if isinstance(event, _Interrupted):
            raise APIError(503, event.message, type="server_error", code="shutting_down")
        raise TypeError(f"unexpected event {event!r}")

    def _apply(self, update: TokenUpdate) -> Delta | None:
        choice = self.choices.get(update.request_id)
        if choice is None or choice.finish_reason is not None:
            return None
        now = time.monotonic()
        text, finish = "", None
        if update.new_token_ids:
            if choice.first_token_time is None:
                choice.first_token_time = now
            text = choice.detokenizer.add(update.text_token_ids)
            choice.token_ids += update.new_token_ids
            choice.logprobs += _finite(update.new_logprobs or [])
            if choice.detokenizer.stopped:
                finish = "stop"
                self.state.engine.abort([choice.engine_id])
        if update.finished and finish is None:
            if update.finish_reason == "error":
                self.state.metrics.requests_finished.labels("error").inc()
                error = APIError(500, f"generation failed: {update.error}", type="server_error",
                                 code="generation_failed")
                if not update.new_token_ids:
                    raise error
                self._deferred = error  # raised by next_deltas after these tokens
                return Delta(choice, text, list(update.new_token_ids),
                             _finite(update.new_logprobs or []), None)
            finish = update.finish_reason or "stop"
            text += choice.detokenizer.flush()
        if finish is not None:
            choice.finish_reason = finish
            self.state.metrics.observe_choice(self.arrival, choice.first_token_time, now,
                                              len(choice.token_ids), finish)
        return Delta(choice, text, list(update.new_token_ids), _finite(update.new_logprobs or []),
                     finish)

    def _mark_all_finished(self) -> None:
        for choice in self.choices.values():
            choice.finish_reason = choice.finish_reason or "error"

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def close(self) -> None:
        """Abort whatever is still generating and forget this request. Idempotent."""
        if self._closed:
            return
        self._closed = True
        unfinished = [c.engine_id for c in self.choices.values() if c.finish_reason is None]
        self.state.engine.abort(unfinished)
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        self.state.active.discard(self)
        self.state.metrics.in_flight.dec()


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _run(generation: Generation, fmt: Any, stream: bool) -> Response:
    """Submit, then answer with JSON or an SSE stream. Errors before the first token are
    ordinary HTTP errors (the stream's headers wait for it); later ones become an SSE error
    event."""
    generation.submit()
    owner: Generation | None = generation  # closed here unless the stream takes it over
    try:
        first = await generation.next_deltas()
        if stream:
            owner = None
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(_stream(generation, fmt, first), headers=headers,
                                     media_type="text/event-stream")
        while await generation.next_deltas() is not None:
            pass
        return JSONResponse(fmt.response(generation))
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the engine requests are aborted
    finally:
        if owner is not None:
            owner.close()


async def _stream(generation: Generation, fmt: Any,
                  first: list[Delta] | None) -> AsyncIterator[str]:
    try:
        out = [_sse(chunk) for chunk in fmt.stream_start(generation)]
        deltas = first
        while deltas is not None:
            out += [_sse(c) for c in (fmt.stream_delta(d) for d in deltas) if c is not None]
            if out:
                yield "".join(out)
                out = []
            try:
                deltas = await generation.next_deltas()
            except APIError as e:
                yield _sse(e.body()) + _sse("[DONE]")
                return
        if fmt.request.include_usage_in_stream:
            out.append(_sse(fmt.stream_usage(generation)))
        out.append(_sse("[DONE]"))
        yield "".join(out)
    except ClientGone:
        return
    finally:
        generation.close()


# ---------------------------------------------------------------- routes

def _state(request: Request) -> ServerState:
    return request.app.state.server


async def require_api_key(request: Request) -> None:
    """401 unless ``Authorization: Bearer <key>`` matches (when the server has a key)."""
    key = _state(request).config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes by header or by count."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid Content-Length header")
        if int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} "
                                f"bytes (--max-body-bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes "
                                f"(--max-body-bytes)", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, choice: int,
                     logprobs: bool) -> SamplingParams:
    # Choices of one prompt get distinct seeds, derived as LLM.generate derives them.
    seed = None if req.seed is None else derive_seed(req.seed, choice)
    params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=req.top_k, seed=seed,
                            ignore_eos=req.ignore_eos, logprobs=logprobs,
                            presence_penalty=req.presence_penalty,
                            frequency_penalty=req.frequency_penalty,
                            repetition_penalty=req.repetition_penalty)
    try:
        params.validate()
    except ValueError as e:
        raise bad_request(str(e)) from None
    return params


async def completions(request: Request) -> Response:
    state = _state(request)
    state.check_accepting()
    body = await read_body(request, state.config.max_body_bytes)
    req = parse_request(CompletionRequest, body)
    check_model_name(req.model, state.config.served_model_name)
    if req.target_len is not None and not state.config.allow_target_len:
        raise bad_request("target_len is a benchmark-only field; start the server with "
                          "--allow-target-len to use it", param="target_len")
    prompts = [state.tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompt]
    params = []
    for prompt in prompts:
        check_token_ids(prompt, state.info.vocab_size)
        max_tokens = resolve_max_tokens(req.max_tokens, len(prompt), state.info.max_model_len,
                                        state.info.max_output_len)
        params += [_sampling_params(req, max_tokens, i, req.logprobs is not None)
                   for i in range(req.n)]
    generation = Generation(state, request, prompts, params, req.n, req.stop, req.predicted_tokens,
                            req.target_len)
    fmt = CompletionFormat(state.config.served_model_name, state.tokenizer, req)
    return await _run(generation, fmt, req.stream)


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    state.check_accepting()
    body = await read_body(request, state.config.max_body_bytes)
    req = parse_request(ChatCompletionRequest, body)
    check_model_name(req.model, state.config.served_model_name)
    try:
        prompt = list(state.tokenizer.apply_chat_template(
            req.chat_messages(), add_generation_prompt=True, tokenize=True))
    except ValueError as e:
        raise bad_request(f"cannot apply the chat template: {e}", param="messages") from None
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(req.max_new_tokens, len(prompt), state.info.max_model_len,
                                    state.info.max_output_len, param)
    params = [_sampling_params(req, max_tokens, i, req.logprobs) for i in range(req.n)]
    generation = Generation(state, request, [prompt], params, req.n, req.stop, req.predicted_tokens,
                            None)
    fmt = ChatFormat(state.config.served_model_name, state.tokenizer, req)
    return await _run(generation, fmt, req.stream)


async def list_models(request: Request) -> dict:
    state = _state(request)
    return ModelList(data=[ModelCard(id=state.config.served_model_name, created=state.started,
                                     max_model_len=state.info.max_model_len)]).model_dump()


async def health(request: Request) -> Response:
    state = _state(request)
    if state.draining:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    if not state.engine.alive:
        return JSONResponse({"status": "engine unavailable", "reason": state.engine.failure},
                            status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state = _state(request)
    state.metrics.engine_stats = state.engine.latest_stats
    state.metrics.engine_alive.set(1.0 if state.engine.alive else 0.0)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class _CountResponses:
    """ASGI middleware counting responses by route and status for /metrics."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http_responses.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app over a started EngineClient. Its lifespan attaches the engine's output
    reader to the serving loop and stops the engine process on exit."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.attach()
        try:
            yield
        finally:
            state.engine.stop(timeout=max(1.0, 0.15 * state.config.shutdown_timeout))

    app = FastAPI(title="BinDecode", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    auth = [Depends(require_api_key)]
    app.add_api_route("/v1/completions", completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=auth)
    app.add_api_route("/metrics", metrics, methods=["GET"], dependencies=auth)
    app.add_api_route("/health", health, methods=["GET"])

    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(exc.status_code, str(exc.detail),
                                        code="not_found" if exc.status_code == 404 else None))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                        type="server_error"))

    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(_CountResponses, metrics=state.metrics)
    return app
