"""Block reuse on re-ingest: each block is keyed by what its KV is a pure function of, and a new version of a
document takes over every block the version it replaces already holds, instead of encoding it again.

Block i is encoded at global positions after the first min(anchor_size, start_i) tokens (starqa.engine.star_engine):
block 0 alone, a later block as [anchor, block i]; with an anchor larger than the block, the blocks that start inside
the anchor see every token before them. So a block's KV depends only on the model, the tokenizer, the compute dtype, the
KV precision (and int8's key group), the anchor's token ids (which hold every token a head block saw before its
own), its own token ids and its start; `block_keys` hashes exactly these, with the prompt layout version and the
block file format. An edit changes the key of the block it falls in, of every later block whose tokens shift, and,
in the first anchor_size tokens, of every block (they all attended to the anchor, or lie in it: a head block before
the edit is encoded again too, which is more than needed but never stale).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from starqa.store.kv_quant import KEY_GROUP

# Bump when a block file's layout (tensor names, scales) or Phase 1's arithmetic changes: keys made before then
# must no longer match, so old blocks are encoded again rather than mixed with new ones.
BLOCK_KEY_FORMAT = 1


def block_keys(context_ids: Sequence[int], spans: Sequence[tuple[int, int]], anchor_size: int,
               signature: dict) -> list[str]:
    """SHA-256 keys of the blocks `spans` of `context_ids`; `signature` is starqa.engine.ingest.settings_signature's
    (only its model, tokenizer, prompt layout, dtype and KV dtype enter a key: block and anchor size act through
    the ids and starts)."""
    anchor_ids = list(context_ids[:min(anchor_size, len(context_ids))])
    kv_dtype = signature["kv_dtype"]
    common = {
        "format": BLOCK_KEY_FORMAT,
        "prompt_layout_version": signature["prompt_layout_version"],
        "model_fingerprint": signature["model_fingerprint"],
        "tokenizer_fingerprint": signature["tokenizer_fingerprint"],
        "dtype": signature["dtype"],
        "kv_dtype": kv_dtype,
        "kv_key_group": KEY_GROUP if kv_dtype == "int8" else None,
        "anchor": hashlib.sha256(json.dumps(anchor_ids).encode()).hexdigest(),
    }
    return [hashlib.sha256(json.dumps(dict(common, start=start, ids=list(context_ids[start:end])),
                                      sort_keys=True).encode()).hexdigest()
            for start, end in spans]


def reusable_blocks(previous_blocks: Sequence[dict], keys: Sequence[str]) -> dict[int, dict]:
    """New block index -> the previous version's block with the same key (a key holds the start, so the index is
    the same too). Blocks stored before keys were recorded have none and are never taken over."""
    by_key = {block["key"]: block for block in previous_blocks if block.get("key")}
    return {index: by_key[key] for index, key in enumerate(keys) if key in by_key}


def anchor_from_block_files(paths: Sequence[Path], anchor_len: int, device):
    """The anchor's KV as the head of the head blocks' stored KV (stored in the compute dtype, in block order):
    exactly the anchor a fresh ingest takes from their own pass. A ContextKV of [1, kv_heads, anchor_len, head_dim]
    per layer."""
    import torch

    from starqa.store.context_kv import ContextKV
    from starqa.store.document_store import read_block_file

    parts = []
    for path in paths:
        keys, values, key_scales, _ = read_block_file(path, device)
        if not keys or key_scales:
            raise ValueError(f"{path} holds no KV in the compute dtype")
        parts.append((keys, values))
    keys = [torch.cat([part[0][layer] for part in parts], dim=1) for layer in range(len(parts[0][0]))]
    values = [torch.cat([part[1][layer] for part in parts], dim=1) for layer in range(len(parts[0][1]))]
    if keys[0].shape[1] < anchor_len:
        raise ValueError(f"the head blocks hold {keys[0].shape[1]} tokens, not the anchor's {anchor_len}")
    return ContextKV(n_tokens=anchor_len, spans=[(0, anchor_len)],
                     keys=[k[None, :, :anchor_len] for k in keys], values=[v[None, :, :anchor_len] for v in values])
