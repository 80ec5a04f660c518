"""Attention that also returns the log-sum-exp of its scores, and the exact merge of such parts.

    out, lse = attention_with_lse(q, k, v, causal=..., scale=None, q_offset=0, backend="auto")
    out, lse = merge_attention([(out_1, lse_1), (out_2, lse_2), ...])

q: [batch, q_heads, q_len, head_dim]; k, v: [batch, kv_heads, k_len, head_dim] with q_heads a
multiple of kv_heads (GQA, K/V never repeated in memory; a batch-1 or stride-0 expanded k/v
batch is fine). out: like q (same dtype); lse: [batch, q_heads, q_len] float32, natural log of
sum_j exp(scale * q.k_j) over the visible keys (-inf, with out = 0, where a row sees no key).
causal=True hides key j from query i when j > i + q_offset (q_offset = keys before the first
query, e.g. k_len - q_len for queries over a cache; negative values hide whole rows).

backend: "torch" (any device; the CPU path), "triton" (CUDA, or CPU under TRITON_INTERPRET=1),
"auto" (triton for CUDA tensors when triton imports, torch otherwise).
"""

from __future__ import annotations

import functools
import os

import torch

from .merge import merge_attention
from .torch_backend import attention_with_lse_torch, check_attention_args, decode_attention_with_scores

__all__ = ["attention_with_lse", "backend_problem", "decode_attention_with_scores", "merge_attention",
           "triton_available"]

_BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels can be imported here (triton installed and importable)."""
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def backend_problem(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` (None if it can): checked when the engine loads, not mid-Phase 1."""
    if backend != "triton":
        return None
    if not triton_available():
        return "attention backend 'triton' needs the triton package, which does not import here; use auto or torch"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"attention backend 'triton' runs on CUDA (or on the CPU under TRITON_INTERPRET=1, for tests), not "
                f"on {device.type}; use auto or torch")
    return None


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    q_offset: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (out, lse) of q attending to k, v; see the package docstring for the contract."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {_BACKENDS}")
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_available() else "torch"
    if backend == "torch":
        return attention_with_lse_torch(q, k, v, causal=causal, scale=scale, q_offset=q_offset)
    check_attention_args(q, k, v)
    if not triton_available():
        raise RuntimeError("attention backend 'triton' needs the triton package, which does not import here")
    from .triton_kernels import attention_with_lse_triton

    return attention_with_lse_triton(q, k, v, causal=causal, scale=scale, q_offset=q_offset)
