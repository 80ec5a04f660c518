"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests/test_reuse.py puts it
there for one `ingest --nproc 2`): in a torchrun rank, it records the block indices that rank asks Phase 1 to encode,
one JSON list per call, in $STARQA_TEST_RANK_TRACE/rank-<RANK>.jsonl. Nothing else changes.

starqa.engine.star_engine is patched when the rank imports it, not here: at start-up the working folder (the checkout under
test) is not on sys.path yet, and importing starqa now could pick another installed copy."""

import importlib.util
import json
import os
import sys


def _patch(engine) -> None:
    encode_blocks = engine.StarEngine.encode_blocks

    def traced(self, context_ids, block_size, anchor_size=None, *, block_indices=None, **options):
        indices = list(block_indices) if block_indices is not None else None
        path = os.path.join(os.environ["STARQA_TEST_RANK_TRACE"], f"rank-{os.environ['RANK']}.jsonl")
        with open(path, "a", encoding="utf-8") as trace:
            trace.write(json.dumps(indices) + "\n")
        return encode_blocks(self, context_ids, block_size, anchor_size, block_indices=indices, **options)

    engine.StarEngine.encode_blocks = traced


class _PatchOnImport:
    def find_spec(self, name, path, target=None):
        if name != "starqa.engine.star_engine":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("STARQA_TEST_RANK_TRACE") and os.environ.get("RANK") is not None:
    sys.meta_path.insert(0, _PatchOnImport())
