"""Star Attention's attention step: a read-only prefix KV plus a preallocated buffer, merged by their log-sum-exp.

`StarCache` holds, for one forward pass or one generation, the *prefix* (Phase 1: the anchor's KV; Phase 2: the
document's stored blocks, see starqa.store.context_kv) and a buffer for the tokens being encoded, written in place.
`attend` computes, per layer, the attention of the new queries to the prefix (no mask: it precedes them all) and,
causally, to the buffer, and merges the two exactly with their log-sum-exp; under torch.distributed each rank's
partial result is then merged with the other ranks' the same way (only the query host keeps a buffer).

Sequences of a batch (several questions over one document) share the prefix and each have their own row of the
buffer; their query tokens are left-padded to one length, so every row writes at the same offset and `key_valid`
hides each row's padding.

Where the decode kernel can run (a CPU with starqa.kernels, a few query rows), the prefix is read by it in its
stored precision, and the same pass gives the scores an observer needs for the answer's sources.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from starqa import kernels
from starqa.attention import attention_with_lse, merge_attention
from starqa.store.context_kv import ContextKV
from starqa.errors import StarqaError

# Query rows per KV head (sequences x tokens x GQA group) up to which the CPU decode kernel reads the prefix; more
# rows (a question's prefill) are a matrix problem, for the torch path's fused kernels.
KERNEL_MAX_ROWS = 32


def layer_heads_of(observer, layer: int) -> list[int] | None:
    """The query heads whose scores `observer` wants at `layer`: None for all, [] for none (the engine computes no
    scores for a layer no observer wants). An observer without `layer_heads` wants every head of every layer."""
    wanted = getattr(observer, "layer_heads", None)
    return None if wanted is None else wanted(layer)


class StarCache:
    def __init__(self, *, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, prefix: ContextKV | None = None, keep_local: bool = True,
                 merge_across_ranks: Callable | None = None, backend: str = "auto",
                 key_valid: torch.Tensor | None = None, sliding_window: int | None = None,
                 buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None, length: int = 0) -> None:
        self.prefix = prefix if prefix is not None and prefix.held_tokens > 0 else None
        self.keep_local = keep_local  # only the query host keeps the KV of the tokens being encoded
        if buffers is not None:  # views of another cache's buffer (full attention's decode, see `split_prefix`)
            self.keys, self.values = buffers
        else:
            shape = (batch, kv_heads, capacity if keep_local else 0, head_dim)
            self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = length  # buffer tokens written by completed forward passes
        self.key_valid = key_valid  # [batch, capacity] bool, False at each row's left padding; None: no padding
        self.merge_across_ranks = merge_across_ranks
        self.backend = backend
        self.sliding_window = sliding_window
        self.dtype = dtype
        # Observers of each sequence's scores over the prefix (the answer's sources): one per batch row, each with
        # .observe_scores(layer, scores [heads, prefix_tokens]) for the row that predicts the next token, for the
        # heads its optional .layer_heads(layer) names (all when it has none; see `_observing`).
        self.observers: Sequence | None = None
        self._head_indices: dict = {}

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def split_prefix(self, prefix_tokens: int, spans: list[tuple[int, int]]) -> "StarCache":
        """This cache's first `prefix_tokens` buffer tokens as a read-only prefix, the rest as the buffer (views, no
        copy). Full attention decodes this way after its one causal pass: exactly the same attention, through the
        decode kernel, with the observer's scores."""
        keys = [k[0, :, :prefix_tokens][None] for k in self.keys]
        values = [v[0, :, :prefix_tokens][None] for v in self.values]
        prefix = ContextKV(n_tokens=prefix_tokens, spans=spans, keys=keys, values=values)
        rest = ([k[:, :, prefix_tokens:] for k in self.keys], [v[:, :, prefix_tokens:] for v in self.values])
        return StarCache(num_layers=len(self.keys), batch=self.keys[0].shape[0], kv_heads=self.keys[0].shape[1],
                         head_dim=self.keys[0].shape[3], capacity=0, dtype=self.dtype, device=self.keys[0].device,
                         prefix=prefix, backend=self.backend, sliding_window=self.sliding_window, buffers=rest,
                         length=self.length - prefix_tokens)

    # ------------------------------------------------------------------------------------------------ attend

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [batch, q_heads, tokens, d]; k, v [batch, kv_heads, tokens, d] of the new tokens (after RoPE).
        Returns the attention output [batch, tokens, q_heads, d] in q's dtype."""
        batch, q_heads, tokens, dim = q.shape
        end = self.length + tokens
        self._check_window(end)
        if self.keep_local:
            if end > self.keys[layer].shape[2]:
                raise RuntimeError(f"StarCache buffer overflow: {end} > {self.keys[layer].shape[2]} tokens")
            self.keys[layer][:, :, self.length:end] = k
            self.values[layer][:, :, self.length:end] = v
        across_ranks = self.merge_across_ranks is not None
        if self._one_kernel_call(q):
            # One sequence decoding on a CPU: the kernel reads the stored prefix and the buffer and merges them.
            out, lse = self._attend_prefix(layer, q, scale, local=(self.keys[layer][0, :, :end],
                                                                     self.values[layer][0, :, :end]))
        else:
            parts = []
            if self.prefix is not None:
                parts.append(self._attend_prefix(layer, q, scale))
            if self.keep_local:
                parts.append(self._attend_buffer(q, self.keys[layer][:, :, :end], self.values[layer][:, :, :end],
                                                 scale))
            if not parts:  # a rank holding no block and not the query host: nothing seen, a neutral part
                parts.append((torch.zeros(q.shape, dtype=torch.float32, device=q.device),
                              torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)))
            if across_ranks:  # this rank's result is itself partial: no rounding to bf16/fp16 before the final merge
                parts = [(out.float(), lse) for out, lse in parts]
            out, lse = merge_attention(parts) if len(parts) > 1 else parts[0]
        if across_ranks:
            out, lse = self.merge_across_ranks(out.float(), lse)
        return out.to(q.dtype).transpose(1, 2)

    def _kernel_usable(self, q: torch.Tensor, rows: int) -> bool:
        return (q.device.type == "cpu" and rows <= KERNEL_MAX_ROWS and q.shape[-1] % 16 == 0
                and self.prefix is not None and kernels.available())

    def _one_kernel_call(self, q: torch.Tensor) -> bool:
        return (q.shape[0] == 1 and q.shape[2] == 1 and self.keep_local and self.key_valid is None
                and self._kernel_usable(q, q.shape[1]))

    def _check_window(self, end: int) -> None:
        if self.sliding_window is None:
            return
        seen = end + (self.prefix.n_tokens if self.prefix is not None else 0)
        if seen > self.sliding_window:  # ingest refuses such documents; a long question and answer can still get here
            raise StarqaError(f"this model attends to only the last {self.sliding_window:,} tokens in some layers "
                              f"(sliding-window attention), and document, question and answer reach {seen:,} tokens: "
                              "starqa cannot answer this exactly; ask with a shorter --max-new-tokens or use another "
                              "model")

    def _attend_prefix(self, layer: int, q: torch.Tensor, scale: float,
                       local: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q to the prefix (and, with `local`, to those buffer keys too, in the same kernel call)."""
        prefix = self.prefix
        batch, q_heads, tokens, dim = q.shape
        kv_heads = prefix.keys[layer].shape[1]
        group = q_heads // kv_heads
        rows = batch * tokens * group
        observers, heads = self._observing(layer, q_heads)
        if local is not None or self._kernel_usable(q, rows):
            # [batch, kv_heads * group, tokens, d] -> [kv_heads, batch * tokens * group, d]
            rows_q = q if q.dtype in (torch.float32, torch.bfloat16) else q.float()
            rows_q = rows_q.reshape(batch, kv_heads, group, tokens, dim).permute(1, 0, 3, 2, 4)
            out, lse, scores = kernels.decode_attention(
                rows_q.reshape(kv_heads, rows, dim), prefix.keys[layer][0], prefix.values[layer][0],
                prefix.chunk_starts, key_scales=prefix.key_scales[layer] if prefix.quantized else None,
                value_scales=prefix.value_scales[layer] if prefix.quantized else None, scale=scale,
                want_scores=observers is not None, local_keys=None if local is None else local[0],
                local_values=None if local is None else local[1])
            out = out.view(kv_heads, batch, tokens, group, dim).permute(1, 0, 3, 2, 4).reshape(q.shape)
            lse = lse.view(kv_heads, batch, tokens, group).permute(1, 0, 3, 2).reshape(batch, q_heads, tokens)
            if observers is not None:
                # [kv_heads, batch, tokens, group, n] -> the last token's rows of the wanted heads, per sequence
                by_row = scores.view(kv_heads, batch, tokens, group, -1)[:, :, -1]
                kv_index, in_group = self._head_index(heads, group, scores.device)
                for row, observer in enumerate(observers):
                    self._deliver(observer, layer, heads, by_row[kv_index, row, in_group])
            return out, lse
        keys, values = prefix.dense(layer, q.dtype)
        if observers is not None:
            # The rows that predict the next tokens, of the wanted heads only, scored in the KV's own dtype (the
            # matmul accumulates in float32): a float32 copy of every stored key per layer and step would cost more
            # than the attention itself, and so would scoring every head for the few an observer follows.
            if len(heads) == q_heads:
                last = q[:, :, -1].reshape(batch, kv_heads, group, dim).to(keys.dtype)
                scores = torch.matmul(last, keys[0].transpose(-1, -2)[None]).float() * scale  # [batch, hk, group, n]
                scores = scores.view(batch, q_heads, -1)
            else:
                kv_index, _ = self._head_index(heads, group, keys.device)
                wanted_keys = keys[0].index_select(0, kv_index)  # [m, n, d]: the key heads of the wanted heads
                last = q[:, heads, -1].to(keys.dtype)  # [batch, m, d]
                scores = torch.matmul(wanted_keys[None], last[..., None])[..., 0].float() * scale  # [batch, m, n]
            for row, observer in enumerate(observers):
                self._deliver(observer, layer, heads, scores[row])
        return attention_with_lse(q, keys, values, causal=False, scale=scale, backend=self.backend)

    def _observing(self, layer: int, q_heads: int) -> tuple[Sequence | None, list[int]]:
        """(the observers, the query heads to score for them) at `layer`; (None, []) when none wants this layer.

        An observer says which heads it follows with `layer_heads(layer)` (None: all, []: none; see
        starqa.evidence.observer.AttentionShares); one without that method gets every head of every layer."""
        if self.observers is None:
            return None, []
        wanted: set[int] = set()
        for observer in self.observers:
            heads = layer_heads_of(observer, layer)
            if heads is None:
                return self.observers, list(range(q_heads))
            wanted.update(heads)
        return (self.observers, sorted(wanted)) if wanted else (None, [])

    def _head_index(self, heads: list[int], group: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(key head, position in its group) of each query head in `heads`, as index tensors (kept per list)."""
        key = (tuple(heads), group, str(device))
        if key not in self._head_indices:
            index = torch.tensor(heads, device=device)
            self._head_indices[key] = (index // group, index % group)
        return self._head_indices[key]

    @staticmethod
    def _deliver(observer, layer: int, heads: list[int], scores: torch.Tensor) -> None:
        """scores [len(heads), n] to an observer, as the rows of its own heads (in its order)."""
        wanted = layer_heads_of(observer, layer)
        if wanted == []:
            return
        if wanted is None or wanted == heads:
            observer.observe_scores(layer, scores)
        else:
            observer.observe_scores(layer, scores[[heads.index(head) for head in wanted]])

    def _attend_buffer(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention of the newest q tokens over the buffer (they are its last tokens)."""
        tokens, seen = q.shape[2], keys.shape[2]
        if self.key_valid is None and (tokens > 1 or q.device.type != "cpu"):
            return attention_with_lse(q, keys, values, causal=True, scale=scale, q_offset=seen - tokens,
                                      backend=self.backend)
        # Decoding on a CPU (a few hundred keys at most: explicit scores beat a fused kernel's fixed cost), or rows
        # with left padding: scores with a mask, in float32.
        batch, q_heads, _, dim = q.shape
        kv_heads = keys.shape[1]
        group = q_heads // kv_heads
        grouped = q.float().reshape(batch, kv_heads, group * tokens, dim) * scale
        scores = torch.matmul(grouped, keys.float().transpose(-1, -2)).view(batch, kv_heads, group, tokens, seen)
        positions = torch.arange(seen - tokens, seen, device=q.device)[:, None]  # the queries' buffer offsets
        columns = torch.arange(seen, device=q.device)[None, :]
        hidden = (columns > positions)[None]  # [1, tokens, seen]: causal
        if self.key_valid is not None:
            # A padding token still sees itself, so that its (unused) output stays finite: a NaN written into the
            # buffer would reach real rows through 0 * NaN in the weighted sum.
            hidden = hidden | (~self.key_valid[:, None, :seen] & (columns != positions)[None])
        scores = scores.masked_fill(hidden[:, None, None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # every row sees at least its own token
        out = torch.matmul(torch.exp(scores - lse[..., None]).view(batch, kv_heads, group * tokens, seen),
                           values.float())
        return (out.view(batch, q_heads, tokens, dim).to(q.dtype),
                lse.view(batch, q_heads, tokens))
