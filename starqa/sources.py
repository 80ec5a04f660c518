"""Which pages an answer drew on: peak attention per context block, mapped to pages through the page map.

While the answer is decoded, every layer's query (the last prompt token, then each generated token) is scored
against the document's stored keys (the template tokens before the document, where attention "sinks" collect, are
left out). A block's strength for one layer and answer token is the highest attention probability any head gives
one of its tokens; strengths are averaged over layers and answer tokens and normalised to shares.

Why the peak and not the attention mass: the mass is dominated by diffuse, recency-biased attention, so the last
blocks win whatever was asked (on needle questions with the bundled model it named the needle's page first in 2 of
8 cases), while heads that retrieve or copy a fact attend sharply to its few tokens (the peak named it in 8 of 8).
In several processes each rank scores its own blocks; the per-head normaliser is combined across ranks exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from starqa.documents import Page, pages_of_span


# At most this many characters at the end of a decoded piece may differ from the text: the replacement character(s)
# a decoder writes for a character whose bytes continue in the next token.
_PARTIAL_CHAR = 4


def block_char_spans(tokenizer, context_ids: Sequence[int], document_offset: int,
                     spans: Sequence[tuple[int, int]], text: str) -> list[tuple[int, int]]:
    """Each block's [start, end) in the document `text` (which its document tokens encode).

    A block may end inside a character (byte-level tokens split a multi-byte one): that character counts to the
    next block, and the next piece is decoded from the last clean token boundary, so the split never shifts the
    blocks after it. A tokenizer that does not give the text back exactly (it normalises) is followed by
    decoded lengths instead: approximate, but the best it allows.
    """
    char_spans, position = [], 0
    clean_token, clean_char = document_offset, 0  # ids[document_offset:clean_token] decode to text[:clean_char]
    exact = True
    for start, end in spans:
        first = max(start, document_offset)
        if end <= first:
            char_spans.append((0, 0))
            continue
        if exact:
            piece = tokenizer.decode(list(context_ids[clean_token:end]), skip_special_tokens=False)
            expected = text[clean_char:clean_char + len(piece)]
            common = _common_prefix(piece, expected)
            if common == len(piece):
                boundary = clean_char + common
                clean_token, clean_char = end, boundary
            elif common >= len(piece) - _PARTIAL_CHAR:
                boundary = clean_char + common  # a split character: it starts the next block
            else:
                exact = False
        if not exact:
            length = len(tokenizer.decode(list(context_ids[first:end]), skip_special_tokens=False))
            boundary = min(position + length, len(text))
        char_spans.append((position, boundary))
        position = boundary
    return char_spans


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def block_pages(tokenizer, context_ids, document_offset, spans, pages: Sequence[dict],
                text: str) -> list[list[int]]:
    """The page numbers each block's document text lies on."""
    page_map = [Page(number=p["number"], start=p["start"], end=p["end"]) for p in pages]
    result = []
    for char_start, char_end in block_char_spans(tokenizer, context_ids, document_offset, spans, text):
        result.append(pages_of_span(page_map, char_start, char_end) if char_end > char_start else [])
    return result


class AttentionShares:
    """Collects, per answer token and layer, each block's peak score and the document's log-sum-exp (per head)."""

    def __init__(self, spans: Sequence[tuple[int, int]], document_offset: int, scale: float) -> None:
        self.spans = list(spans)  # global [start, end) of the blocks held here, contiguous in the KV
        self.scale = scale
        held_start = self.spans[0][0] if self.spans else 0
        # Local index ranges of each block's document tokens inside the held KV.
        self.ranges = [(max(s, document_offset) - held_start, e - held_start) for s, e in self.spans]
        self.document_lse: list[torch.Tensor] = []  # per observation: [q_heads]
        self.block_peak: list[torch.Tensor] = []  # per observation: [q_heads, held_blocks] (max score)

    def observe(self, layer: int, query: torch.Tensor, prefix_keys: torch.Tensor) -> None:
        # query [1, q_heads, q_len, d]: only the last row predicts the next answer token.
        # prefix_keys [1, kv_heads, held_tokens, d].
        last = query[0, :, -1].float()  # [q_heads, d]
        heads = last.shape[0]
        keys = prefix_keys[0].float()  # [kv_heads, n, d]
        group = heads // keys.shape[0]
        scores = torch.einsum("hgd,hnd->hgn", last.view(keys.shape[0], group, -1), keys) * self.scale
        self.observe_scores(layer, scores.reshape(heads, -1))

    def observe_scores(self, layer: int, scores: torch.Tensor) -> None:
        """scores [q_heads, held_tokens]: the scaled scores of the row that predicts the next answer token."""
        heads = scores.shape[0]
        scores = scores.float()
        peaks, pieces = [], []
        for lo, hi in self.ranges:
            if hi > lo:
                peaks.append(scores[:, lo:hi].max(dim=-1).values)
                pieces.append(scores[:, lo:hi])
            else:  # a block of template tokens only
                peaks.append(torch.full((heads,), -math.inf, device=scores.device))
        # Kept on the device while decoding (no sync per layer); `stacked` hands them over on the CPU.
        self.block_peak.append(torch.stack(peaks, dim=-1) if peaks else scores.new_empty(heads, 0))
        self.document_lse.append(torch.logsumexp(torch.cat(pieces, dim=-1), dim=-1) if pieces
                                 else torch.full((heads,), -math.inf, device=scores.device))

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([observations, q_heads], [observations, q_heads, held_blocks]), on the CPU (ranks on different GPUs
        exchange them, and each rank's tensors must not arrive on another rank's device)."""
        if not self.block_peak:
            return torch.empty(0, 0), torch.empty(0, 0, len(self.spans))
        return torch.stack(self.document_lse).cpu(), torch.stack(self.block_peak).cpu()


def shares_from_parts(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine the (document lse, block peaks) of every rank, in block order, into shares summing to 1."""
    parts = [(lse, peak) for lse, peak in parts if peak.numel()]
    if not parts:
        return torch.zeros(0)
    document_lse = torch.logsumexp(torch.stack([lse for lse, _ in parts]), dim=0)  # [obs, heads]
    block_peak = torch.cat([peak for _, peak in parts], dim=-1)  # [obs, heads, blocks]
    probability = torch.exp(block_peak - document_lse[..., None])  # highest token probability per block
    strength = probability.max(dim=1).values.mean(dim=0)  # strongest head, averaged over layers and tokens
    total = strength.sum()
    return strength / total if total > 0 else strength


def rank_sources(shares: torch.Tensor, pages_per_block: Sequence[Sequence[int]], *, top: int = 3,
                 relative: float = 0.5) -> list[dict]:
    """The strongest blocks, strongest first: at most `top`, each at least `relative` times the strongest."""
    sources: list[dict] = []
    for block in torch.argsort(shares, descending=True).tolist():
        share = float(shares[block])
        if sources and (len(sources) >= top or share < relative * sources[0]["share"]):
            break
        if not pages_per_block[block] or share <= 0:
            continue
        sources.append({"pages": list(pages_per_block[block]), "block": block, "share": round(share, 3)})
    return sources


def format_sources(sources: Sequence[dict]) -> str:
    """'Sources: pp. 4–5, 12' (strongest first; a block's pages joined with an en dash)."""
    parts, seen = [], set()
    for source in sources:
        pages = [p for p in source["pages"] if p not in seen]
        seen.update(pages)
        if not pages:
            continue
        parts.append(str(pages[0]) if len(pages) == 1 else f"{pages[0]}\u2013{pages[-1]}")
    if not parts:
        return ""
    single = len(parts) == 1 and "\u2013" not in parts[0]
    return ("Sources: p. " if single else "Sources: pp. ") + ", ".join(parts)
