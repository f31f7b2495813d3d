"""Generation: how the HTTP process folds engine events into choices (no engine, no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from engine.api_protocol import APIError
from engine.api_server import ServerConfig, ServerState, Generation
from engine.engine_process import EngineDied, EngineInfo, Rejected
from engine.request import SamplingParams, TokenUpdate
from engine.tokenizer import ByteTokenizer


class FakeEngine:
    """Records what the server sends; the test plays the engine's part by filling the sink."""

    alive, failure, on_output = True, None, None

    def __init__(self):
        self.submitted, self.aborted = [], []

    def submit(self, group_id, requests, sink):
        self.submitted += requests

    def abort(self, request_ids):
        self.aborted += request_ids


class NeverDisconnects:
    async def receive(self):
        await asyncio.Event().wait()


def make_generation(n: int = 1, stop: list[str] | None = None) -> tuple[Generation, FakeEngine]:
    engine = FakeEngine()
    info = EngineInfo("dummy:tiny", 256, 256, 512, (257,), "cpu", "reference")
    state = ServerState(ServerConfig("dummy:tiny"), engine, info, ByteTokenizer(512))
    params = [SamplingParams(max_tokens=8, seed=i) for i in range(n)]
    gen = Generation(state, NeverDisconnects(), [[1, 2, 3]], params, n, stop or [], None, None)
    gen.submit()
    return gen, engine


def run(coro):
    return asyncio.run(coro)


def test_tokens_then_error_are_delivered_before_the_error():
    async def main():
        gen, engine = make_generation()
        rid = engine.submitted[0].request_id
        gen.sink.put_nowait(TokenUpdate(rid, [104, 105], None))
        gen.sink.put_nowait(TokenUpdate(rid, [33], None))
        gen.sink.put_nowait(TokenUpdate(rid, [], None, finished=True, finish_reason="error",
                                        error="boom"))
        deltas = await gen.next_deltas()
        assert [(d.text, d.token_ids) for d in deltas] == [("hi!", [104, 105, 33])]  # coalesced
        with pytest.raises(APIError, match="boom") as info:
            await gen.next_deltas()
        assert info.value.status == 500
        gen.close()
        assert engine.aborted == [rid]  # the unfinished choice is released

    run(main())


def test_error_before_any_token_raises_at_once():
    async def main():
        gen, engine = make_generation()
        rid = engine.submitted[0].request_id
        gen.sink.put_nowait(TokenUpdate(rid, [], None, finished=True, finish_reason="error",
                                        error="bad"))
        with pytest.raises(APIError, match="bad"):
            await gen.next_deltas()

    run(main())


def test_stop_string_aborts_the_engine_request():
    async def main():
        gen, engine = make_generation(stop=["lo"])
        rid = engine.submitted[0].request_id
        gen.sink.put_nowait(TokenUpdate(rid, list(b"hel"), None))
        gen.sink.put_nowait(TokenUpdate(rid, list(b"lo world"), None))
        deltas = await gen.next_deltas()
        assert deltas[-1].finish_reason == "stop" and gen.finished
        assert gen.choices[rid].text == "hel" and engine.aborted == [rid]
        assert await gen.next_deltas() is None

    run(main())


def test_n_choices_finish_independently_and_usage_counts_prompt_once():
    async def main():
        gen, engine = make_generation(n=2)
        a, b = (r.request_id for r in engine.submitted)
        assert engine.submitted[0].params.seed != engine.submitted[1].params.seed
        gen.sink.put_nowait(TokenUpdate(a, [97], None, finished=True, finish_reason="length"))
        await gen.next_deltas()
        assert not gen.finished
        gen.sink.put_nowait(TokenUpdate(b, [98, 99], None, finished=True, finish_reason="stop"))
        await gen.next_deltas()
        # 99 ended b as a stop token: it counts as a token but adds no text.
        assert gen.finished and [c.text for c in gen.ordered_choices] == ["a", "b"]
        assert gen.usage() == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}

    run(main())


@pytest.mark.parametrize("event, status", [
    (Rejected("g", [], "queue_full", "queue full"), 429),
    (Rejected("g", [], "invalid", "bad request"), 400),
    (EngineDied("segfault"), 500),
])
def test_engine_refusal_and_death(event, status):
    async def main():
        gen, _ = make_generation()
        gen.sink.put_nowait(event)
        with pytest.raises(APIError) as info:
            await gen.next_deltas()
        assert info.value.status == status and gen.finished

    run(main())
