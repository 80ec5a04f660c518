"""Which tokens of the document an answer drew on: the attention of the model's retrieval heads while it is decoded.

While the answer is decoded, every layer's scores over the context (the row that predicts the next answer token:
the prompt's last row, then each generated token's) reach `AttentionShares.observe_scores`. For the few heads that
copy from the context (starqa.evidence.heads, found once per model) it keeps each step's most attended document
tokens with their scores and the log-sum-exp over the whole context; after decoding, `attended_tokens` turns them
into attention probabilities per document token, summed over steps and heads. starqa.evidence.quotes makes passages,
sources and quotes of them.

Why retrieval heads and not every head: most heads' attention is diffuse and recency-biased, so summing it (the
attention mass) names the last blocks whatever was asked, and even the peak over all heads leaned to them on
documents we had not tuned on; a head that copies a fact attends to that fact's tokens, wherever they are. And it
is cheap: only the layers holding a retrieval head do any work per step, a top-k and a log-sum-exp over the context
for those heads alone.

Under several processes each rank observes its own blocks; `attended_tokens` merges the ranks' parts exactly (the
log-sum-exp over all ranks, the top tokens of the union), so the outcome equals one process's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from starqa.evidence.scores import prefix_scores
from starqa.engine.star_cache import layer_heads_of


# Each step keeps this many most attended document tokens per followed head.
TOP_TOKENS = 8


@dataclass
class ObservedPart:
    """What one process observed over its blocks, on the CPU: per step and followed head, the log-sum-exp of the
    scores over its held context and its most attended document tokens."""

    spans: list  # global [start, end) of the blocks held
    heads: list  # the followed (layer, head) pairs, in the order of the head axis
    context_lse: torch.Tensor  # [steps, heads]
    top_scores: torch.Tensor  # [steps, heads, k]
    top_positions: torch.Tensor  # [steps, heads, k] global context positions (-1: none)


def deliver(observer, layer: int, scores: torch.Tensor) -> None:
    """Hand `observer` its heads' rows of `scores` [q_heads, tokens] (every head's scores of one row)."""
    heads = layer_heads_of(observer, layer)
    if heads == []:
        return
    observer.observe_scores(layer, scores if heads is None else scores[heads])


class AttentionShares:
    """The observer: for the followed heads, each step's top document tokens and the context's log-sum-exp.

    `heads` are the retrieval heads (starqa.evidence.heads.RetrievalHeads, or {layer: [head, ...]}); None follows
    every head of every layer (for a model whose calibration found none: costlier and less precise).

    The engine (starqa.engine.star_cache) asks `layer_heads(layer)` and calls `observe_scores(layer, scores)` with the
    rows of exactly those heads, in that order, over the keys before the row: the held context first (under full
    attention the prompt's question tokens follow it, and are left out here).
    """

    def __init__(self, spans: Sequence[tuple[int, int]], document_offset: int, scale: float, *,
                 heads=None, top: int = TOP_TOKENS) -> None:
        self.spans = list(spans)  # global [start, end) of the blocks held here, contiguous in the KV
        self.scale = scale
        self.top = top
        self.held_start = self.spans[0][0] if self.spans else 0
        held = sum(end - start for start, end in self.spans)
        self.held = held  # scores beyond these (full attention's question tokens) are not the context's
        # Local index of the first document token in the held KV (the template before the document is not quoted).
        self.document_start = min(max(document_offset - self.held_start, 0), held)
        by_layer = heads.by_layer() if hasattr(heads, "by_layer") else heads
        self.by_layer = None if by_layer is None else {int(k): [int(h) for h in v] for k, v in by_layer.items()}
        # Per layer, per step: kept on the scores' device while decoding (no sync per layer); `stacked` hands
        # them over on the CPU.
        self.observed: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def wants(self, layer: int) -> bool:
        """Whether this layer's scores are wanted at all (an engine may skip computing them for other layers)."""
        return self.layer_heads(layer) != []

    def layer_heads(self, layer: int) -> list[int] | None:
        """The followed heads of `layer`: [] for none, None for all."""
        return None if self.by_layer is None else self.by_layer.get(layer, [])

    def observe(self, layer: int, query: torch.Tensor, prefix_keys: torch.Tensor) -> None:
        """query [1, q_heads, q_len, d] (its last row predicts the next answer token), prefix_keys [1, kv_heads,
        held_tokens, d]: scored for the followed heads only."""
        heads = self.layer_heads(layer)
        if heads == []:
            return
        self._keep(layer, prefix_scores(query, prefix_keys, self.scale, heads))

    def observe_scores(self, layer: int, scores: torch.Tensor) -> None:
        """scores [len(layer_heads(layer)) (all q_heads when None), >= held_tokens]: the scaled scores of the row
        that predicts the next answer token, for the followed heads of this layer (see the class docstring)."""
        if self.layer_heads(layer) == []:
            return
        self._keep(layer, scores)

    def _keep(self, layer: int, scores: torch.Tensor) -> None:
        scores = scores[:, : self.held].float()
        lse = torch.logsumexp(scores, dim=-1)  # [heads]: over the whole held context, template included
        document = scores[:, self.document_start:]
        k = min(self.top, document.shape[-1])
        if k:
            top = document.topk(k, dim=-1)
            values, positions = top.values, top.indices + (self.held_start + self.document_start)
        else:
            values = scores.new_empty(scores.shape[0], 0)
            positions = torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
        self.observed.setdefault(layer, []).append((lse, values, positions))

    def stacked(self) -> ObservedPart:
        """This process's observations on the CPU (ranks on different GPUs exchange them)."""
        heads, lse, values, positions = [], [], [], []
        steps = min((len(rows) for rows in self.observed.values()), default=0)
        for layer in sorted(self.observed):
            rows = self.observed[layer][:steps]
            followed = self.layer_heads(layer)
            count = rows[0][0].shape[0] if rows else 0
            heads += [(layer, head) for head in (followed if followed is not None else range(count))]
            lse.append(torch.stack([row[0] for row in rows]).cpu())
            values.append(_pad(torch.stack([row[1] for row in rows]).cpu(), self.top, -math.inf))
            positions.append(_pad(torch.stack([row[2] for row in rows]).cpu(), self.top, -1))
        if not heads:
            empty = torch.empty(0, 0, self.top)
            return ObservedPart(self.spans, [], torch.empty(0, 0), empty, empty.long())
        return ObservedPart(self.spans, heads, torch.cat(lse, dim=1), torch.cat(values, dim=1),
                            torch.cat(positions, dim=1))


def _pad(tensor: torch.Tensor, k: int, fill) -> torch.Tensor:
    """[steps, heads, <= k] -> [steps, heads, k] (a document shorter than k tokens)."""
    missing = k - tensor.shape[-1]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_full((*tensor.shape[:-1], missing), fill)], dim=-1)


def attended_tokens(parts: Sequence[ObservedPart], context_tokens: int, *, top: int | None = None) -> torch.Tensor:
    """Attention per context position [context_tokens] (float64): the probability each followed head gave it at each
    decoding step, summed over steps and heads, counting each step's `top` (default: as many as each part kept)
    most attended document tokens of the whole context. Parts are the ranks' observations (any order); the merge
    is exact: probabilities are taken against the log-sum-exp over every rank's held context, and the top tokens
    of the union of the ranks' top tokens are the top tokens of the whole."""
    weights = torch.zeros(context_tokens, dtype=torch.float64)
    parts = [part for part in parts if part.heads]
    if not parts:
        return weights
    steps = min(part.context_lse.shape[0] for part in parts)
    heads = parts[0].heads
    if any(part.heads != heads for part in parts):
        raise ValueError("the ranks followed different heads")
    lse = torch.logsumexp(torch.stack([part.context_lse[:steps].double() for part in parts]), dim=0)
    scores = torch.cat([part.top_scores[:steps].double() for part in parts], dim=-1)  # [steps, heads, k * ranks]
    positions = torch.cat([part.top_positions[:steps] for part in parts], dim=-1)
    k = min(parts[0].top_scores.shape[-1] if top is None else top, scores.shape[-1])
    best = scores.topk(k, dim=-1)
    chosen = positions.gather(-1, best.indices)
    probability = torch.exp(best.values - lse[..., None])
    keep = chosen >= 0
    weights.index_add_(0, chosen[keep], probability[keep])
    return weights


def shares_from_parts(parts: Sequence[ObservedPart]) -> torch.Tensor:
    """Each block's share of the attended tokens' weight (all ranks' blocks, in block order), summing to 1 (all zero
    when nothing was attended)."""
    spans = [span for part in sorted(parts, key=lambda p: p.spans[0][0] if p.spans else 0) for span in part.spans]
    if not spans:
        return torch.zeros(0)
    weights = attended_tokens(parts, max(end for _, end in spans))
    strength = torch.tensor([float(weights[start:end].sum()) for start, end in spans])
    total = strength.sum()
    return strength / total if total > 0 else strength
