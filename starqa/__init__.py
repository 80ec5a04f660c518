"""starqa: question answering over long documents with a local LLM, using Star Attention.

    from starqa import StarEngine
    engine = StarEngine.load("smollm2-135m", device="cpu", dtype="float32")
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `starqa list` and `--help` should not pay for importing torch and transformers.
    if name == "StarEngine":
        from starqa.engine.star_engine import StarEngine

        return StarEngine
    raise AttributeError(name)


__all__ = ["StarEngine", "__version__"]
