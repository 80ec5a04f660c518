"""The stored KV's precision (`--kv-dtype`): plain casts, or int8 as in KIVI / llama.cpp q8_0.

int8 keeps keys per channel and values per token, symmetric around zero (scale = max|x| / 127):
    keys   [kv_heads, n, head_dim] -> int8 + float32 scales [kv_heads, groups, head_dim], one per channel for each
                                      group of KEY_GROUP consecutive tokens (outliers live in a few key channels)
    values [kv_heads, n, head_dim] -> int8 + float32 scales [kv_heads, n], one per token
A block is quantized on its own (groups start at the block's first token), so each block file is complete by
itself; the decode kernel (starqa/kernels) folds the key scales into the query and the value scales into the
attention weights, so the int8 bytes are read as they are.
"""

from __future__ import annotations

import torch

KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
KEY_GROUP = 128  # tokens per key-scale group: see docs/performance.md, "Precision", for how this was chosen
_INT8_MAX = 127.0
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


def resolve_kv_dtype(kv_dtype: str, compute_dtype: torch.dtype) -> str:
    """`auto` stores the compute dtype."""
    if kv_dtype == "auto":
        return str(compute_dtype).removeprefix("torch.")
    if kv_dtype not in _TORCH_DTYPES:
        raise ValueError(f"unknown KV dtype {kv_dtype!r}; expected one of {', '.join(KV_DTYPES)}")
    return kv_dtype


def storage_dtype(kv_dtype: str) -> torch.dtype:
    return _TORCH_DTYPES[kv_dtype]


def group_starts(n_tokens: int, group: int = KEY_GROUP) -> list[int]:
    """Offsets of the key groups of one block, and its length: [0, group, 2*group, ..., n_tokens]."""
    return list(range(0, n_tokens, group)) + [n_tokens]


def _scale(absmax: torch.Tensor) -> torch.Tensor:
    # An all-zero group keeps scale 0 (its values dequantize to exactly 0); no division by zero below.
    return absmax / _INT8_MAX


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x / safe), -_INT8_MAX, _INT8_MAX).to(torch.int8)


def quantize_keys(keys: torch.Tensor, group: int = KEY_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [kv_heads, n, d] -> (int8 [kv_heads, n, d], float32 scales [kv_heads, ceil(n / group), d])."""
    heads, n, dim = keys.shape
    x = keys.float()
    groups = -(-n // group)
    padded = torch.zeros((heads, groups * group, dim), dtype=torch.float32, device=keys.device)
    padded[:, :n] = x
    absmax = padded.view(heads, groups, group, dim).abs().amax(dim=2)  # [heads, groups, d]
    scales = _scale(absmax)
    per_token = scales.repeat_interleave(group, dim=1)[:, :n]
    return _quantize(x, per_token), scales


def quantize_values(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [kv_heads, n, d] -> (int8 [kv_heads, n, d], float32 scales [kv_heads, n])."""
    x = values.float()
    scales = _scale(x.abs().amax(dim=-1))
    return _quantize(x, scales[..., None]), scales


def dequantize_keys(quantized: torch.Tensor, scales: torch.Tensor, starts: torch.Tensor | list[int],
                    dtype: torch.dtype) -> torch.Tensor:
    """int8 keys [..., n, d] with scales [..., groups, d] over the groups [starts[g], starts[g+1]) -> dtype."""
    starts = torch.as_tensor(starts, dtype=torch.long)
    lengths = (starts[1:] - starts[:-1]).to(scales.device)
    per_token = scales.repeat_interleave(lengths, dim=-2)
    return (quantized.float() * per_token).to(dtype)


def dequantize_values(quantized: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (quantized.float() * scales[..., None]).to(dtype)
