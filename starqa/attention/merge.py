"""Exact merge of partial attention results over disjoint key sets, by their log-sum-exp.

If part ``i`` attended to key set ``K_i`` (disjoint sets whose union is ``K``) and returned
``out_i = softmax-weighted values over K_i`` and ``lse_i = log sum_{j in K_i} exp(s_j)``, then the
attention over ``K`` is

    lse = logsumexp_i(lse_i)
    out = sum_i exp(lse_i - lse) * out_i

This one function serves single-process Phase 2 (context cache + query keys) and the
distributed path (ranks all-gather their ``(out, lse)`` and merge). It is pure: no state,
no communication, float32 accumulation.

A part whose key set was empty for a row (lse = -inf) contributes nothing to that row; a row
that is -inf in every part comes out as out = 0, lse = -inf (never NaN).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["merge_attention"]


def merge_attention(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``[(out_1, lse_1), (out_2, lse_2), ...]`` into one ``(out, lse)``.

    out_i: [..., q_len, head_dim] (any float dtype, all the same shape)
    lse_i: [..., q_len]           (any float dtype; -inf where part i saw no key)
    returns out: [..., q_len, head_dim] in the dtype of ``out_1``; lse: [..., q_len] float32.
    """
    if len(parts) == 0:
        raise ValueError("merge_attention needs at least one (out, lse) part")
    out0, lse0 = parts[0]
    for i, (out_i, lse_i) in enumerate(parts):
        if out_i.shape != out0.shape or lse_i.shape != lse0.shape:
            raise ValueError(
                f"merge_attention: part {i} has out {tuple(out_i.shape)}, lse {tuple(lse_i.shape)}; "
                f"part 0 has out {tuple(out0.shape)}, lse {tuple(lse0.shape)}"
            )
    if out0.shape[:-1] != lse0.shape:
        raise ValueError(
            f"merge_attention: out {tuple(out0.shape)} does not match lse {tuple(lse0.shape)} "
            "(expected out = lse.shape + (head_dim,))"
        )
    if len(parts) == 1:
        return out0, lse0.float()

    # m: [..., q_len] running maximum of the parts' lse; -inf only where every part is -inf.
    m = lse0.float()
    for _, lse_i in parts[1:]:
        m = torch.maximum(m, lse_i.float())
    # Shift by a finite value so that exp(lse_i - shift) is 0 (not NaN) for lse_i = -inf.
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))

    denom = torch.zeros_like(m)  # [..., q_len]          sum_i exp(lse_i - shift)
    acc = torch.zeros(out0.shape, dtype=torch.float32, device=out0.device)  # [..., q_len, d]
    for out_i, lse_i in parts:
        w = torch.exp(lse_i.float() - shift)  # [..., q_len], 0 where lse_i = -inf
        denom += w
        acc.addcmul_(out_i.float(), w.unsqueeze(-1))

    lse = shift + torch.log(denom)  # log(0) = -inf for rows no part saw
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = acc / safe.unsqueeze(-1)
    return out.to(out0.dtype), lse
