"""The context KV a process holds for Phase 2 (its stored blocks, contiguous per layer), or Phase 1's anchor.

The KV stays in its stored precision (the compute dtype, bfloat16/float16, or int8 with scales, see
starqa.store.kv_quant): the CPU decode kernel reads it as it is, so a step reads each stored byte once; the torch path
(prefill rows, GPUs, a CPU without the kernels) takes a dense copy of one layer at a time (`dense`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from starqa.store.kv_quant import dequantize_keys, dequantize_values, group_starts

@dataclass
class EncodedBlock:
    """One context block's KV, as Phase 1 produces it and the store keeps it."""

    index: int
    start: int  # global token offset in the context
    end: int
    keys: list[torch.Tensor]  # per layer [kv_heads, end - start, head_dim] (int8 when quantized)
    values: list[torch.Tensor]
    key_scales: list[torch.Tensor] | None = None  # int8: per layer float32 [kv_heads, groups, head_dim]
    value_scales: list[torch.Tensor] | None = None  # int8: per layer float32 [kv_heads, end - start]



# Keys per chunk of the decode kernel where the KV is not int8 (int8 chunks are its quantization groups).
DENSE_CHUNK = 128


@dataclass
class ContextKV:
    n_tokens: int  # length of the whole context: query positions start here
    spans: list[tuple[int, int]]  # global [start, end) of each block held, in order
    keys: list[torch.Tensor]  # per layer [1, kv_heads, held_tokens, head_dim] (int8 when quantized)
    values: list[torch.Tensor]
    chunk_starts: torch.Tensor | None = None  # int32 [chunks + 1]: local offsets; chunks never cross a block
    key_scales: list[torch.Tensor] | None = None  # int8: per layer float32 [kv_heads, chunks, head_dim]
    value_scales: list[torch.Tensor] | None = None  # int8: per layer float32 [kv_heads, held_tokens]

    def __post_init__(self) -> None:
        if self.chunk_starts is None:
            self.chunk_starts = chunk_starts_for(self.spans, DENSE_CHUNK)

    @property
    def held_tokens(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def quantized(self) -> bool:
        return self.key_scales is not None

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def dense(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values as [1, kv_heads, held, head_dim] in `dtype` (a view when no conversion
        is needed)."""
        keys, values = self.keys[layer], self.values[layer]
        if self.quantized:
            return (dequantize_keys(keys, self.key_scales[layer][None], self.chunk_starts.long(), dtype),
                    dequantize_values(values, self.value_scales[layer][None], dtype))
        return keys.to(dtype), values.to(dtype)

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
        if self.quantized:
            total += sum(t.numel() * t.element_size() for t in (*self.key_scales, *self.value_scales))
        return total


def chunk_starts_for(spans: Iterable[tuple[int, int]], chunk: int) -> torch.Tensor:
    """Local chunk offsets over blocks laid out one after another: each block cut into `chunk`-token pieces from its
    own first token (the int8 key groups of a block start there too), so no chunk crosses a block."""
    starts, offset = [], 0
    for start, end in spans:
        starts.extend(offset + s for s in group_starts(end - start, chunk)[:-1])
        offset += end - start
    starts.append(offset)
    return torch.tensor(starts, dtype=torch.int32)
