"""Triton kernels for attention with log-sum-exp: flash-attention forward and split-KV decoding.

Shapes (GQA: query head h reads kv head h // group; K/V are never repeated in memory):
    q:   [batch, q_heads,  q_len, head_dim]      any strides (stride-0 batch in k/v is fine)
    k,v: [batch, kv_heads, k_len, head_dim]
    out: [batch, q_heads,  q_len, head_dim]      dtype of q
    lse: [batch, q_heads,  q_len]                float32, natural log; -inf (out 0) if no key
Causal masking hides key j from query i when j > i + q_offset.

Kernels
  * ``_attn_fwd``: one program per (BLOCK_M queries, batch x q_head[, key split]). Key tiles
    wholly visible to every row of the block run without masks; the k_len edge and the causal
    diagonal run masked. Scores are kept in base 2 (exp2) with float32 running max/sum/out.
  * ``_attn_decode``: flash-decoding for few queries (group * q_len <= 64 rows, 32 in float32): one program per
    (batch x kv_head, key split) holds every query row that shares the kv head, so K/V are read
    once per kv head, and the keys are split across programs so one token over 128K keys still
    fills the GPU.
  * ``_attn_combine``: merges the per-split partial (out, lse) into the final result (the same
    formula as merge.merge_attention, fused into one launch).

Triton is imported when this module is imported; ``starqa.attention`` imports it lazily. CUDA
tensors run compiled kernels; CPU tensors run the same kernels in Triton's interpreter, which
needs TRITON_INTERPRET=1 set before triton is imported (see ``interpreter_ready``). The
interpreter is slow: tiny shapes only.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

__all__ = ["attention_with_lse_triton", "interpreter_ready"]

_LOG2E = 1.4426950408889634
_DECODE_MAX_ROWS = 64  # group * q_len up to this uses the split-KV decode kernel (float32: _DECODE_MAX_ROWS_FP32)
_MAX_SPLITS = 128  # key splits per query row (the combine kernel loads their lse at once)


# --------------------------------------------------------------------------- kernels


def _attn_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,  # os: key-split (0 if unsplit)
    stride_ls, stride_lb, stride_lh, stride_lm,
    n_q_heads, group, q_len, k_len, q_offset, keys_per_split, qk_scale_log2,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    off_b = (pid_bh // n_q_heads).to(tl.int64)
    off_h = (pid_bh % n_q_heads).to(tl.int64)
    off_kh = off_h // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this block
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < q_len

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh
              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:  # the interpreter holds bf16 as raw uint16 and cannot tl.dot it: use float32
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_kh * stride_kh
    v_base = V + off_b * stride_vb + off_kh * stride_vh

    # Keys of this split: [lo, hi); lo is a multiple of BLOCK_N.
    lo = pid_s * keys_per_split
    hi = tl.minimum(k_len, lo + keys_per_split)
    if CAUSAL:
        first_row = pid_m * BLOCK_M
        hi = tl.minimum(hi, first_row + BLOCK_M + q_offset)  # nothing after the last diagonal
        full_hi = tl.minimum(hi, first_row + q_offset + 1)  # visible to every row of the block
    else:
        full_hi = hi
    hi = tl.maximum(hi, lo)
    full_hi = tl.maximum(lo + (full_hi - lo) // BLOCK_N * BLOCK_N, lo)  # whole tiles only

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 scores)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running unnormalised output

    # Tiles every row sees completely: no masks (except head_dim padding).
    for start_n in range(lo, full_hi, BLOCK_N):
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N]
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BLOCK_N, BLOCK_D]
        if BLOCK_D == HEAD_DIM:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:  # head_dim padded to a power of two
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # The k_len edge and the causal diagonal: masked tiles (rows may see no key at all).
    for start_n in range(full_hi, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + q_offset)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = (Out + pid_s.to(tl.int64) * stride_os + off_b * stride_ob + off_h * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    l_ptrs = Lse + pid_s.to(tl.int64) * stride_ls + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm
    tl.store(l_ptrs, lse, mask=m_ok)


def _attn_decode(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lm,
    n_kv_heads, group, q_len, k_len, q_offset, keys_per_split, qk_scale_log2,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    off_b = (pid_bh // n_kv_heads).to(tl.int64)
    off_kh = (pid_bh % n_kv_heads).to(tl.int64)

    # Row r of the tile is query i = r % q_len of q head kv_head * group + r // q_len.
    rows = tl.arange(0, BLOCK_R)
    r_ok = rows < group * q_len
    qi = rows % q_len
    qh = off_kh * group + rows // q_len
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (Q + off_b * stride_qb + qh[:, None] * stride_qh
              + qi[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_kh * stride_kh
    v_base = V + off_b * stride_vb + off_kh * stride_vh

    lo = pid_s * keys_per_split
    hi = tl.minimum(k_len, lo + keys_per_split)
    if CAUSAL:
        hi = tl.minimum(hi, q_len + q_offset)  # the last query's diagonal
    hi = tl.maximum(hi, lo)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_R, BLOCK_N]
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= qi[:, None] + q_offset)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = (Out + pid_s.to(tl.int64) * stride_os + off_b * stride_ob + qh[:, None] * stride_oh
              + qi[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
    l_ptrs = Lse + pid_s.to(tl.int64) * stride_ls + off_b * stride_lb + qh * stride_lh + qi * stride_lm
    tl.store(l_ptrs, lse, mask=r_ok)


def _attn_combine(
    PartOut, PartLse, Out, Lse,
    stride_ps, stride_pb, stride_ph, stride_pm, stride_pd,  # partial out [S, b, hq, L, d]
    stride_qs, stride_qb, stride_qh, stride_qm,  # partial lse [S, b, hq, L]
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    n_q_heads, q_len, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)  # one query row
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_q_heads).to(tl.int64)
    off_h = (pid_bh % n_q_heads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    d_ok = offs_d < HEAD_DIM

    # Pass 1: the largest partial lse and the softmax mass of every split (vectorised).
    lse_parts = tl.load(PartLse + offs_s * stride_qs + off_b * stride_qb + off_h * stride_qh
                        + pid_m * stride_qm, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse_parts, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp(lse_parts - m_safe), 0)  # 0 where every split was empty
    # Pass 2: weighted sum of the partial outputs, one [BLOCK_D] row per split.
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    p_base = PartOut + off_b * stride_pb + off_h * stride_ph + pid_m * stride_pm + offs_d * stride_pd
    l_base = PartLse + off_b * stride_qb + off_h * stride_qh + pid_m * stride_qm
    for split in range(0, n_splits):
        w = tl.exp(tl.load(l_base + split * stride_qs) - m_safe)
        acc = acc + w * tl.load(p_base + split * stride_ps, mask=d_ok, other=0.0)
    seen = denom > 0.0
    denom_safe = tl.where(seen, denom, 1.0)
    out = acc / denom_safe
    lse = tl.where(seen, m_safe + tl.log(denom_safe), float("-inf"))
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + pid_m * stride_om + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + off_b * stride_lb + off_h * stride_lh + pid_m * stride_lm, lse)


@functools.cache
def _kernel(name: str, interpret: bool):
    """The kernel `name`, compiled by triton.jit, or wrapped for Triton's CPU interpreter."""
    fn = {"fwd": _attn_fwd, "decode": _attn_decode, "combine": _attn_combine}[name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.jit(fn)


# --------------------------------------------------------------------------- launch


def interpreter_ready() -> bool:
    """Whether Triton runs in interpreter mode in this process, which kernels on CPU tensors need.

    Triton's own library functions (tl.max, tl.sum, ...) are wrapped for the interpreter only
    when TRITON_INTERPRET=1 is in the environment at ``import triton``; setting it later is too
    late for them.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


# Tile configurations of the compiled kernels, chosen so that ptxas spills no register on sm_90 (`ptxas -v` with
# Triton 3.6, the GPU image's, and 3.9; tests/test_attention.py compiles them ahead of time and fails on a float32
# spill, tests/test_gpu.py on any spill). A float32 dot is an FMA loop that holds both operand tiles in registers:
# the former float32 tiles (64 x 32 on 4 warps) spilled 3-14 KB per thread at head_dim 64-128 (Triton 3.6; 1.3-37 KB
# with 3.9), and decode (32 keys, 4 warps) up to 16 KB with 64 query rows. Now 32 x 32 tiles on 8 warps at head_dim
# 64 (92-100 registers), 32 x 16 above it (128-164); decode 16 keys on 8 warps (64-188), for at most 32 float32 rows:
# at head_dim 128 no 64-row tile tried (16 or 32 keys, 4, 8 or 16 warps) was free of spills under both Triton
# versions, so 33-64 float32 rows go to the forward kernel. Head dims above 128 (no supported model has them) take
# the small tiles too: 142-172 registers at 256, where 64 x 32 spilled 0.9-6 KB. bf16/fp16 decode at head_dim 128
# takes 8 warps: 4 spilled 56-160 B with 32-64 rows.
_DECODE_MAX_ROWS_FP32 = 32


def _fwd_config(head_dim_p2: int, dtype: torch.dtype, interpret: bool) -> dict:
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16}
    if dtype == torch.float32 or head_dim_p2 > 128:
        return {"BLOCK_M": 32, "BLOCK_N": 32 if head_dim_p2 <= 64 else 16, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8 if head_dim_p2 >= 128 else 4, "num_stages": 3}


def _decode_config(head_dim_p2: int, dtype: torch.dtype, interpret: bool) -> dict:
    if interpret:
        return {"BLOCK_N": 16}
    if dtype == torch.float32 or head_dim_p2 > 128:
        return {"BLOCK_N": 16, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_N": 64, "num_warps": 8 if head_dim_p2 >= 128 else 4, "num_stages": 3}


def _pick_splits(programs: int, k_len: int, block_n: int, device: torch.device, min_keys: int) -> int:
    """Key splits so that programs x splits fills the device (about 2 waves), each split having
    at least `min_keys` keys."""
    target = 2 * _num_sms(device)
    if programs >= target or k_len <= min_keys:
        return 1
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(k_len, min_keys), _MAX_SPLITS))


def attention_with_lse_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    q_offset: int = 0,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    decode: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of q over k, v with the Triton kernels; see the module docstring.

    num_splits, block_m, block_n and decode (force/forbid the split-KV decode kernel) override
    the heuristics; tests use them to cover several tiles and splits on tiny shapes.
    """
    b, hq, q_len, d = q.shape
    bk, hk, k_len, _ = k.shape
    if bk != b:
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    group = hq // hk
    scale = d**-0.5 if scale is None else float(scale)
    q_offset = int(q_offset)
    interpret = q.device.type != "cuda"
    if interpret and not interpreter_ready():
        raise RuntimeError(
            f"the Triton kernels run on {q.device.type} tensors only in Triton's interpreter, which "
            "needs TRITON_INTERPRET=1 in the environment before triton is imported"
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, q_len), dtype=torch.float32, device=q.device)
    if q_len == 0:
        return out, lse
    if k_len == 0 or (causal and q_len - 1 + q_offset < 0):  # no query sees any key
        return out.zero_(), lse.fill_(float("-inf"))

    block_d = _pow2_at_least(d)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    rows = group * q_len
    max_rows = _DECODE_MAX_ROWS_FP32 if q.dtype == torch.float32 else _DECODE_MAX_ROWS
    use_decode = rows <= max_rows if decode is None else decode
    if use_decode:
        cfg = _decode_config(block_d, q.dtype, interpret)
        if block_n is not None:
            cfg["BLOCK_N"] = block_n
        programs = b * hk
        grid_m = None
    else:
        cfg = _fwd_config(block_d, q.dtype, interpret)
        if block_m is not None:
            cfg["BLOCK_M"] = block_m
        if block_n is not None:
            cfg["BLOCK_N"] = block_n
        grid_m = triton.cdiv(q_len, cfg["BLOCK_M"])
        programs = grid_m * b * hq
    bn = cfg["BLOCK_N"]
    k_vis = min(k_len, q_len + q_offset) if causal else k_len  # keys anyone can see
    if num_splits is None:
        num_splits = _pick_splits(programs, k_vis, bn, q.device, min_keys=4 * bn if use_decode else 8 * bn)
    keys_per_split = triton.cdiv(triton.cdiv(k_vis, max(1, num_splits)), bn) * bn
    num_splits = max(1, triton.cdiv(k_vis, keys_per_split))

    if num_splits == 1:
        o_buf, l_buf = out, lse
        o_strides, l_strides = (0, *out.stride()), (0, *lse.stride())
    else:  # partial results per split, combined below
        o_buf = torch.empty((num_splits, b, hq, q_len, d), dtype=torch.float32, device=q.device)
        l_buf = torch.empty((num_splits, b, hq, q_len), dtype=torch.float32, device=q.device)
        o_strides, l_strides = o_buf.stride(), l_buf.stride()

    common = (
        *q.stride(), *k.stride(), *v.stride(), *o_strides, *l_strides,
    )  # fmt: skip
    upcast = interpret and q.dtype != torch.float32
    consts = dict(
        CAUSAL=bool(causal), HEAD_DIM=d, BLOCK_D=block_d, DOT_PRECISION=dot_precision, UPCAST=upcast, **cfg
    )
    qk_scale_log2 = scale * _LOG2E
    # Triton launches on the current CUDA device: make it the tensors' (q on cuda:1 while cuda:0 is current).
    with contextlib.nullcontext() if interpret else torch.cuda.device(q.device):
        if use_decode:
            consts["BLOCK_R"] = _pow2_at_least(rows)
            _kernel("decode", interpret)[(b * hk, num_splits)](
                q, k, v, o_buf, l_buf, *common,
                hk, group, q_len, k_len, q_offset, keys_per_split, qk_scale_log2, **consts,
            )  # fmt: skip
        else:
            _kernel("fwd", interpret)[(grid_m, b * hq, num_splits)](
                q, k, v, o_buf, l_buf, *common,
                hq, group, q_len, k_len, q_offset, keys_per_split, qk_scale_log2, **consts,
            )  # fmt: skip
        if num_splits > 1:
            _kernel("combine", interpret)[(q_len, b * hq)](
                o_buf, l_buf, out, lse, *o_buf.stride(), *l_buf.stride(), *out.stride(), *lse.stride(),
                hq, q_len, num_splits,
                HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=_pow2_at_least(num_splits, floor=2),
                **({} if interpret else {"num_warps": 4}),
            )  # fmt: skip
    return out, lse
