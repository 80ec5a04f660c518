"""Attention scores of the row that predicts the next answer token over the held context: the one computation the
observer (starqa.evidence.observer) and the retrieval-head calibration (starqa.evidence.heads) share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def prefix_scores(query: torch.Tensor, prefix_keys: torch.Tensor, scale: float,
                  heads: Sequence[int] | None = None) -> torch.Tensor:
    """Scaled scores [len(heads) or q_heads, held_tokens] (float32) of the query's last row against the prefix keys.

    query [1, q_heads, q_len, d], prefix_keys [1, kv_heads, held_tokens, d]. Only the key heads the wanted query
    heads read are touched, in the keys' own dtype: on a GPU the product accumulates in float32 and is returned in
    float32 where torch can (`out_dtype`), never through a float32 copy of the keys.
    """
    q_heads, kv_heads = query.shape[1], prefix_keys.shape[1]
    group = q_heads // kv_heads
    wanted = list(range(q_heads)) if heads is None else list(heads)
    last = query[0, wanted, -1]  # [n, d]
    kv_index = torch.tensor([h // group for h in wanted], device=prefix_keys.device)
    keys = prefix_keys[0].index_select(0, kv_index)  # [n, held, d] (a gather of the wanted heads only)
    if keys.device.type == "cpu" and keys.dtype == torch.float32:
        return torch.bmm(keys, last.float()[:, :, None])[:, :, 0] * scale
    return scores_in_key_dtype(keys, last, scale)


def scores_in_key_dtype(keys: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """keys [n, held, d] . rows [n, d] * scale -> [n, held] float32, without a float32 copy of the keys: the
    product runs in the keys' dtype with float32 accumulation, and comes back in float32 where this torch and device
    can return it so (`out_dtype`), else rounded to the keys' dtype first."""
    row = (rows * scale).to(keys.dtype)[:, :, None]  # [n, d, 1]
    if keys.dtype != torch.float32:
        try:
            return torch.bmm(keys, row, out_dtype=torch.float32)[:, :, 0]
        except (RuntimeError, TypeError, NotImplementedError):  # no out_dtype for this device or torch
            pass
    return torch.bmm(keys, row)[:, :, 0].float()
