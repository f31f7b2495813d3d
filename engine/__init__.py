"""BinDecode's engine: model, KV slabs, batch runner, engine loop and the offline ``LLM`` API.

``from engine import LLM, SamplingParams`` is all offline generation needs; the names are
imported lazily so that ``import engine.request`` (the HTTP process) does not load the model
code or torch's CUDA state.
"""

__all__ = ["LLM", "SamplingParams", "EngineOptions", "RequestOutput"]


def __getattr__(name: str):
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name in ("SamplingParams", "RequestOutput"):
        from engine import request

        return getattr(request, name)
    if name == "EngineOptions":
        from engine.options import EngineOptions

        return EngineOptions
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
