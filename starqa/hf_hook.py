"""Star Attention on transformers' real forward path: a KV cache object and a registered attention function.

A Llama-family attention layer in transformers 5.x computes q, k, v (with RoPE at the position ids we pass), calls
`cache.update(k, v, layer_idx)` and then the attention function registered under the model's `attn_implementation`.
`StarCache` is that cache: it holds a read-only *prefix* KV (the anchor in Phase 1, the document's blocks in Phase 2)
and a preallocated buffer for the tokens being encoded. `star_attention_forward` attends to the prefix without a mask
and to the buffer causally, and merges the two with their log-sum-exp; under torch.distributed each rank's partial
result is merged with the other ranks' the same way. One model definition thus serves Phase 1, Phase 2 and full
attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface

from starqa.attention import attention_with_lse, decode_attention_with_scores, merge_attention
from starqa.errors import StarqaError

ATTN_IMPLEMENTATION = "starqa"


class StarCache:
    """KV for one forward pass (or one generation): prefix KV plus a preallocated, in-place written buffer."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        prefix_keys: list[torch.Tensor] | None = None,  # per layer [1 or batch, kv_heads, prefix_len, head_dim]
        prefix_values: list[torch.Tensor] | None = None,
        keep_local: bool = True,
        merge_across_ranks: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        backend: str = "auto",
    ) -> None:
        self.prefix_keys = prefix_keys
        self.prefix_values = prefix_values
        # Only the query host keeps the KV of the tokens being encoded; other ranks contribute their prefix alone.
        self.keep_local = keep_local
        local_capacity = capacity if keep_local else 0
        shape = (batch, kv_heads, local_capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # tokens written to the buffer by completed forward passes
        self.merge_across_ranks = merge_across_ranks
        self.backend = backend
        # Observer of each layer's queries against the prefix keys (answer sources, starqa.sources.AttentionShares):
        # .observe(layer, query, prefix_keys), or .observe_scores(layer, scores) when the scores are at hand.
        self.observe_prefix = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states: [batch, kv_heads, new_tokens, head_dim]
        end = self.length + key_states.shape[2]
        if not self.keep_local:
            return self.keys[layer_idx][:, :, :0], self.values[layer_idx][:, :, :0]
        if end > self.keys[layer_idx].shape[2]:
            raise RuntimeError(f"StarCache buffer overflow: {end} > {self.keys[layer_idx].shape[2]} tokens")
        self.keys[layer_idx][:, :, self.length : end] = key_states
        self.values[layer_idx][:, :, self.length : end] = value_states
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def _scores_from_attention(query: torch.Tensor) -> bool:
    """Whether the observer takes its scores from the prefix attention itself: a CPU decoding step (one row)."""
    return query.shape[0] == 1 and query.shape[2] == 1 and query.device.type == "cpu"


def star_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, q_heads, q_len, head_dim]
    key: torch.Tensor,  # [batch, kv_heads, k_len, head_dim]: the buffer up to and including this pass's tokens
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    star_cache: StarCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    backend = star_cache.backend if star_cache is not None else "auto"
    window = kwargs.get("sliding_window")
    if window is not None:
        seen = key.shape[2] + (star_cache.prefix_keys[0].shape[2]
                                if star_cache is not None and star_cache.prefix_keys is not None else 0)
        if seen > window:  # ingest refuses such documents; a long question and answer can still get here
            raise StarqaError(f"this model attends to only the last {window:,} tokens in some layers (sliding-window "
                              f"attention), and document, question and answer reach {seen:,} tokens: starqa cannot "
                              "answer this exactly; ask with a shorter --max-new-tokens or use another model")
    # The buffer's tokens precede each other causally; the newest q_len of them are the queries.
    local = attention_with_lse(
        query, key, value, causal=True, scale=scaling, q_offset=key.shape[2] - query.shape[2], backend=backend
    )
    parts = [local]
    if star_cache is not None and star_cache.prefix_keys is not None:
        layer = module.layer_idx
        prefix_keys = star_cache.prefix_keys[layer]
        prefix_values = star_cache.prefix_values[layer]
        observer = star_cache.observe_prefix
        if observer is not None and _scores_from_attention(query):
            # A CPU decoding step: one pass over the stored keys gives the attention and the observer's scores
            # (decoding is bound by reading the stored KV; a second pass for the scores cost about a quarter).
            out, lse, scores = decode_attention_with_scores(query, prefix_keys, prefix_values, scale=scaling)
            observer.observe_scores(layer, scores[0, :, 0])
            parts.insert(0, (out, lse))
        else:
            if observer is not None:
                observer.observe(layer, query, prefix_keys)
            if prefix_keys.shape[0] != query.shape[0]:  # one prefix shared by a batch of blocks: a view, no copy
                prefix_keys = prefix_keys.expand(query.shape[0], -1, -1, -1)
                prefix_values = prefix_values.expand(query.shape[0], -1, -1, -1)
            prefix = attention_with_lse(query, prefix_keys, prefix_values, causal=False, scale=scaling,
                                        backend=backend)
            parts.insert(0, prefix)
    across_ranks = star_cache is not None and star_cache.merge_across_ranks is not None
    if across_ranks:  # this rank's result is itself a partial one: no rounding to bf16/fp16 before the final merge
        parts = [(part_out.float(), part_lse) for part_out, part_lse in parts]
    out, lse = merge_attention(parts) if len(parts) > 1 else parts[0]
    if across_ranks:
        out, lse = star_cache.merge_across_ranks(out, lse)
        out = out.to(query.dtype)
    return out.transpose(1, 2).contiguous(), None  # [batch, q_len, q_heads, head_dim], as transformers expects


AttentionInterface.register(ATTN_IMPLEMENTATION, star_attention_forward)
