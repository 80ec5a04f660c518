"""Shared by the decoding benchmarks: one loaded engine, its decoding switched between precisions without reloading.

A precision is a `--weights` mode, optionally with `+int8` for `--activations int8` ("auto", "auto+int8", "int4",
...). `attach_all` packs (or reads the cached) weights of each once and keeps what each projection then reads;
`use` puts one precision's back, so that one encoded context is decoded with each in turn (the same KV bytes).
"""

from __future__ import annotations


def parse(name: str) -> tuple[str, str]:
    """"auto+int8" -> ("auto", "int8"); "int4" -> ("int4", "bfloat16")."""
    mode, _, activations = name.partition("+")
    return mode, activations or "bfloat16"


def attach_all(engine, names, store_root, on_status=None) -> tuple[dict[str, str], dict[str, dict]]:
    """(summary per precision, state per precision) for `use`; the engine is left with the last one attached."""
    from starqa.engine.star_engine import _attach_weights

    summaries, states = {}, {}
    for name in names:
        mode, activations = parse(name)
        summaries[name] = _attach_weights(engine.model, mode, engine.model_dir, store_root, on_status, activations)
        states[name] = {key: (linear.packed, linear.activations, linear.weight)  # weight None: auto dropped it
                        for key, linear in engine.model.projections()}
    return summaries, states


def use(engine, state: dict) -> None:
    for key, linear in engine.model.projections():
        linear.packed, linear.activations, linear.weight = state[key]
