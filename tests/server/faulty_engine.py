"""An EngineCore whose model fails on cue, to test how the server reports engine faults.

Run as ``python -m tests.server.faulty_engine [engine.serve flags]``. A prompt holding one of
these token ids triggers a fault inside the real EngineCore:

    FAIL_PREFILL_ID  the batch's prefill raises: the batch fails before its first token.
    FAIL_DECODE_ID   the third decode step after that prefill raises: two tokens, then failure.
    CRASH_ID         the prefill raises an error whose text marks a poisoned CUDA context, which
                     EngineCore re-raises and which ends the engine process.
    SLOW_ID          from that prefill on, every decode step takes SLOW_DECODE_S longer.
"""

from __future__ import annotations

import sys
import time

FAIL_PREFILL_ID = 501
FAIL_DECODE_ID = 502
CRASH_ID = 503
SLOW_ID = 504
SLOW_DECODE_S = 0.1


def make_faulty_core(options):
    from engine.engine_core import EngineCore

    core = EngineCore(options)
    model = core.model
    real_prefill, real_decode = model.prefill, model.decode
    decodes_until_failure: list[int] = []
    slow: list[bool] = []

    def prefill(input_ids, *args):
        ids = set(input_ids.tolist())
        if CRASH_ID in ids:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if FAIL_PREFILL_ID in ids:
            raise RuntimeError("injected prefill fault")
        if FAIL_DECODE_ID in ids:
            decodes_until_failure[:] = [2]
        if SLOW_ID in ids:
            slow.append(True)
        return real_prefill(input_ids, *args)

    def decode(*args):
        if slow:
            time.sleep(SLOW_DECODE_S)
        if decodes_until_failure:
            if decodes_until_failure[0] == 0:
                decodes_until_failure.clear()
                raise RuntimeError("injected decode fault")
            decodes_until_failure[0] -= 1
        return real_decode(*args)

    # Instance attributes shadow the methods; the runner calls model.prefill / model.decode.
    model.prefill, model.decode = prefill, decode
    return core


if __name__ == "__main__":
    from engine.serve import main

    sys.exit(main(core_factory=make_faulty_core))
