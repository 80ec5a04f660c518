"""Attention with log-sum-exp in plain torch: the CPU path (and the fallback on any device).

Shapes (GQA: q_heads = kv_heads * group, query head h uses kv head h // group, as HF's repeat_kv):
    q:   [batch, q_heads,  q_len, head_dim]
    k,v: [batch, kv_heads, k_len, head_dim]   (batch may be 1 or an expanded, stride-0 view)
    out: [batch, q_heads,  q_len, head_dim]   dtype of q (not necessarily contiguous)
    lse: [batch, q_heads,  q_len]             float32, log sum_j exp(scale * q.k_j); -inf if no key

Causal masking hides key j from query i when j > i + q_offset (q_offset may be negative:
the first -q_offset rows then see no key and get out = 0, lse = -inf).

Which exact path runs (measured on CPU, torch 2.13; see benchmarks/attention.py):
  * CPU, several queries: ``aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel
    behind SDPA on CPU; it returns the logsumexp too, handles GQA and top-left causal masking).
    Causal with 0 < q_offset is split into the fully visible prefix [0, q_offset) (non-causal)
    and the square causal part, merged exactly with ``merge_attention``.
  * few float32 queries over many keys (decode), or non-CPU devices: explicit float32 scores
    per key chunk with an online softmax (flash-attention style in torch), never a
    q_len x k_len matrix for long contexts; with one key chunk this is just softmax(q k^T) v
    with its logsumexp.
"""

from __future__ import annotations

import functools

import torch

from .merge import merge_attention

__all__ = ["attention_with_lse_torch", "check_attention_args", "decode_attention_with_scores"]

# float32/64 decode: with at most this many rows (group * q_len) per kv head and at least
# _FEW_QUERY_MIN_KEYS keys, explicit float32 scores beat the fused CPU kernel (1.3-1.7x at 8K
# keys); below that the fused kernel's lower fixed cost wins. For bf16/fp16 the fused kernel
# always wins (it reads half the bytes).
_FEW_QUERY_ROWS = 16
_FEW_QUERY_MIN_KEYS = 4096
# Key chunk of the online-softmax loop, and the budget of score elements per step (fp32).
_K_BLOCK = 2048
_SCORE_BUDGET = 1 << 23  # 8M elements = 32 MiB of float32 scores


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q, k, v have the shapes/dtypes/devices described in the module doc."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-D q, k, v [batch, heads, len, head_dim]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    b, hq, _, d = q.shape
    bk, hk, _, dk = k.shape
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) and k/v ({dk}) differ")
    if bk not in (b, 1):
        raise ValueError(f"k/v batch {bk} must equal q batch {b} (or be 1)")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hk})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"attention needs floating-point tensors, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")


def _empty_result(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out = 0 [b, hq, L, d] (q dtype), lse = -inf [b, hq, L] float32: rows that see no key."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def attention_with_lse_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of q over k, v; returns (out, lse). See the module docstring for shapes."""
    check_attention_args(q, k, v)
    b, hq, q_len, d = q.shape
    if scale is None:
        scale = d**-0.5
    scale = float(scale)
    q_offset = int(q_offset)
    if k.shape[0] != b:  # batch-1 k/v shared by every sequence: view it as expanded
        k = k.expand(b, -1, -1, -1)
        v = v.expand(b, -1, -1, -1)
    if causal:
        # Keys after the last query's diagonal are visible to nobody: drop them.
        k_vis = min(k.shape[2], q_len + q_offset)
        if k_vis <= 0:
            return _empty_result(q)
        k, v = k[:, :, :k_vis], v[:, :, :k_vis]
        if q_offset >= k_vis - 1:  # even query 0 sees every remaining key
            causal = False
    k_len = k.shape[2]
    if q_len == 0 or k_len == 0:
        return _empty_result(q)
    if causal and q_offset < 0:
        # Rows i < -q_offset see no key; the rest are a causal problem with q_offset = 0.
        r0 = -q_offset
        out_r, lse_r = attention_with_lse_torch(q[:, :, r0:], k, v, causal=True, scale=scale)
        out0, lse0 = _empty_result(q[:, :, :r0])
        return torch.cat([out0, out_r], dim=2), torch.cat([lse0, lse_r], dim=2)

    # From here on: q_len, k_len >= 1; causal implies 0 <= q_offset < k_len - 1.
    if not causal and b > 1 and k.stride(0) == 0 and v.stride(0) == 0:
        # One k/v shared by all sequences (stride 0): attend to it once, with the batch folded
        # into the query rows, instead of reading (or copying) it b times.
        q1 = q.transpose(0, 1).reshape(1, hq, b * q_len, d)  # [1, hq, b*L, d]
        out1, lse1 = attention_with_lse_torch(q1, k[:1], v[:1], causal=False, scale=scale)
        out = out1.reshape(hq, b, q_len, d).transpose(0, 1)  # [b, hq, L, d]
        return out, lse1.reshape(hq, b, q_len).transpose(0, 1)  # [b, hq, L]
    group = hq // k.shape[1]
    few_rows = (
        group * q_len <= _FEW_QUERY_ROWS
        and k_len >= _FEW_QUERY_MIN_KEYS
        and q.dtype in (torch.float32, torch.float64)
    )
    if q.device.type == "cpu" and not few_rows and _flash_cpu_available(group > 1):
        if not causal or q_offset == 0:
            return _flash_cpu(q, k, v, scale, causal=causal)
        # Keys [0, q_offset) are visible to every query; the rest form a top-left causal square.
        kp, vp = k[:, :, :q_offset], v[:, :, :q_offset]
        prefix = attention_with_lse_torch(q, kp, vp, causal=False, scale=scale)
        square = _flash_cpu(q, k[:, :, q_offset:], v[:, :, q_offset:], scale, causal=True)
        return merge_attention([prefix, square])
    return _chunked_attention(q, k, v, scale, causal=causal, q_offset=q_offset)


def decode_attention_with_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query row per head over every key (no mask): (out, lse, scores).

    scores: [batch, q_heads, 1, k_len] float32 (float64 for float64 q), already scaled. For a caller that needs the
    scores too (answer sources): decoding over a long stored context is bound by reading K and V, and this reads K
    once for both. An empty k gives out 0 and lse -inf, as attention_with_lse does.
    """
    check_attention_args(q, k, v)
    b, hq, q_len, d = q.shape
    if q_len != 1:
        raise ValueError(f"decode_attention_with_scores takes one query row, not {q_len}")
    hk, k_len = k.shape[1], k.shape[2]
    group = hq // hk
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d**-0.5 if scale is None else float(scale)
    scores = torch.matmul(q.reshape(b, hk, group, d).to(acc) * scale, k.to(acc).transpose(-1, -2))  # [b, hk, g, n]
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    out = torch.matmul(weights, v.to(acc))  # [b, hk, g, d]
    return (out.reshape(b, hq, 1, d).to(q.dtype), lse.reshape(b, hq, 1).float(),
            scores.reshape(b, hq, 1, k_len))


# --------------------------------------------------------------------------- fused CPU kernel


def _flash_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """aten's fused CPU flash attention; causal is top-left aligned (key j <= query i)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )
    return out, lse.float()


@functools.cache
def _flash_cpu_available(gqa: bool) -> bool:
    """Whether this torch has the fused CPU kernel with LSE (and, if asked, native GQA) and it
    agrees with explicit attention on a tiny problem (checked once per process)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        hk, group = 2, (2 if gqa else 1)
        q = torch.randn(1, hk * group, 5, 8, generator=gen)
        k = torch.randn(1, hk, 7, 8, generator=gen)
        v = torch.randn(1, hk, 7, 8, generator=gen)
        out, lse = op(q, k, v, 0.0, True, scale=0.5)
        ref_out, ref_lse = _chunked_attention(q, k, v, 0.5, causal=True, q_offset=0)
        return bool(
            torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse.float(), ref_lse, atol=1e-5)
        )
    except (RuntimeError, TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- online softmax


def _chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool,
    q_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-attention in torch: query blocks x key chunks, running max/sum/out in float32.

    Never materialises more than ~_SCORE_BUDGET score elements at once; causal query blocks
    skip the key chunks after their diagonal. Works on any device and for any q_offset.
    """
    b, hq, q_len, d = q.shape
    hk, k_len = k.shape[1], k.shape[2]
    group = hq // hk
    # Few query rows: one chunk of up to _SCORE_BUDGET scores; else _K_BLOCK keys per chunk.
    k_block = min(k_len, max(_K_BLOCK, _SCORE_BUDGET // max(1, b * hq * q_len)))
    q_block = max(1, min(q_len, _SCORE_BUDGET // max(1, b * hq * k_block)))
    if q_block < q_len and q_block >= 16:
        q_block = 1 << (q_block.bit_length() - 1)  # a power of two, for tidy blocks

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # accumulation dtype
    q5 = q.reshape(b, hk, group, q_len, d)  # [b, hk, g, L, d]
    out = torch.empty((b, hk, group, q_len, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hk, group, q_len), dtype=torch.float32, device=q.device)
    neg_inf = float("-inf")
    for qs in range(0, q_len, q_block):
        qe = min(q_len, qs + q_block)
        lq = qe - qs
        k_end = min(k_len, qe + q_offset) if causal else k_len  # keys this block may see
        if k_end <= 0:
            out[:, :, :, qs:qe] = 0
            lse[:, :, :, qs:qe] = neg_inf
            continue
        # qc: [b, hk, g*lq, d] float32, pre-scaled
        qc = (q5[:, :, :, qs:qe].to(acc) * scale).reshape(b, hk, group * lq, d)

        def scores(ks: int, ke: int) -> torch.Tensor:
            """[b, hk, g*lq, ke-ks] float32 scores of this query block vs keys [ks, ke), masked."""
            kc = k[:, :, ks:ke].to(acc)  # [b, hk, n, d]
            s = torch.matmul(qc, kc.transpose(-1, -2))
            if causal and ke - 1 > qs + q_offset:  # some key here is after some row's diagonal
                rows = torch.arange(qs, qe, device=q.device).unsqueeze(1)  # [lq, 1]
                cols = torch.arange(ks, ke, device=q.device).unsqueeze(0)  # [1, n]
                hidden = cols > rows + q_offset  # [lq, n]
                s.view(b, hk, group, lq, ke - ks).masked_fill_(hidden, neg_inf)
            return s

        if k_end <= k_block:  # one chunk: plain softmax with its logsumexp
            s = scores(0, k_end)
            m = torch.logsumexp(s, dim=-1, keepdim=True)  # [b, hk, g*lq, 1]
            p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
            o = torch.matmul(p, v[:, :, :k_end].to(acc))  # [b, hk, g*lq, d]
            lse_c = m.squeeze(-1)
        else:
            m = torch.full((b, hk, group * lq), neg_inf, dtype=acc, device=q.device)  # running max
            l = torch.zeros((b, hk, group * lq), dtype=acc, device=q.device)  # sum of exp(s - m)
            o = torch.zeros((b, hk, group * lq, d), dtype=acc, device=q.device)  # unnormalised out
            for ks in range(0, k_end, k_block):
                ke = min(k_end, ks + k_block)
                s = scores(ks, ke)
                m_new = torch.maximum(m, s.amax(dim=-1))
                m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                p = torch.exp(s - m_safe.unsqueeze(-1))  # 0 for masked keys
                alpha = torch.exp(m - m_safe)  # rescale of the old state (0 if it was empty)
                l = l * alpha + p.sum(dim=-1)
                o = o * alpha.unsqueeze(-1) + torch.matmul(p, v[:, :, ks:ke].to(acc))
                m = m_new
            seen = l > 0
            lse_c = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))), neg_inf)
            o = o / torch.where(seen, l, torch.ones_like(l)).unsqueeze(-1)
        out[:, :, :, qs:qe] = o.view(b, hk, group, lq, d).to(q.dtype)
        lse[:, :, :, qs:qe] = lse_c.view(b, hk, group, lq).float()
    return out.view(b, hq, q_len, d), lse.view(b, hq, q_len)
