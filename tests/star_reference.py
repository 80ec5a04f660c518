"""An independent float64 Llama-family decoder (Llama, Mistral, Qwen2 with q/k/v biases), written from the math, to
check Star Attention's engine against: RMS norm, RoPE, grouped-query causal attention with a plain softmax, SiLU MLP.

    reference = Float64Decoder(config_dict, tensor_by_hf_name)
    keys, values, logits = reference.encode(ids, positions, past=None)   # float64, per layer [kv_heads, n, d]

It reads the weights by their transformers names (`model.layers.0.self_attn.q_proj.weight`, ...) and converts one
layer at a time to float64, so the real 0.5B model fits in memory. Nothing of starqa's own forward path is used
(tests/test_star_fidelity.py checks it against transformers' Qwen2 run in float64 first). Constants are the model's
as transformers defines them: RoPE's inverse frequencies are computed in float32 as transformers computes them, then
every product (positions x frequencies included) is float64.
"""

from __future__ import annotations

import torch


class Float64Decoder:
    def __init__(self, config: dict, tensor) -> None:
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind != "default":
            raise ValueError(f"the float64 reference knows the default RoPE only, not {kind!r}")
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
        self.head_dim = int(config.get("head_dim") or self.hidden // self.heads)
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        dim = self.head_dim
        # transformers' float32 constants, then float64 arithmetic
        self.inv_freq = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))).double()
        self.tie = bool(config.get("tie_word_embeddings", False))
        self.tensor = tensor

    def _weight(self, name: str) -> torch.Tensor | None:
        found = self.tensor(name)
        return None if found is None else found.detach().to(torch.float64)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        y = x @ self._weight(f"{prefix}.weight").T
        bias = self._weight(f"{prefix}.bias")
        return y if bias is None else y + bias

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [heads, n, d] rotated by the angles of `positions` [n] (rotate-half layout)."""
        angles = positions.double()[:, None] * self.inv_freq[None]  # [n, d / 2]
        cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.no_grad()
    def encode(self, ids, positions, past=None, *, logits: bool = False):
        """Causal forward over `ids` [n] at `positions` [n], after `past` (per layer (keys, values) [kv_heads, m, d],
        which every new token sees whole). Returns the new tokens' (keys, values) per layer, float64
        [kv_heads, n, d], and with logits=True the logits [n, vocab] of every new token."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        positions = torch.as_tensor(positions, dtype=torch.long)
        n, d, group = ids.shape[0], self.head_dim, self.heads // self.kv_heads
        x = self.tensor("model.embed_tokens.weight")[ids].detach().to(torch.float64)  # [n, hidden]
        keys_out, values_out = [], []
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}"
            h = self._norm(x, self._weight(f"{prefix}.input_layernorm.weight"))
            q = self._linear(h, f"{prefix}.self_attn.q_proj").view(n, self.heads, d).transpose(0, 1)
            k = self._linear(h, f"{prefix}.self_attn.k_proj").view(n, self.kv_heads, d).transpose(0, 1)
            v = self._linear(h, f"{prefix}.self_attn.v_proj").view(n, self.kv_heads, d).transpose(0, 1)
            q, k = self._rope(q, positions), self._rope(k, positions)
            keys_out.append(k)
            values_out.append(v)
            if past is not None:
                k = torch.cat((past[layer][0].double(), k), dim=1)
                v = torch.cat((past[layer][1].double(), v), dim=1)
            seen = k.shape[1]
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # [heads, seen, d]
            scores = q @ k.transpose(-1, -2) / d**0.5  # [heads, n, seen]
            hidden = torch.arange(seen)[None, :] > (torch.arange(n)[:, None] + seen - n)  # causal among new tokens
            scores = scores.masked_fill(hidden, float("-inf"))
            attended = torch.softmax(scores, dim=-1) @ v  # [heads, n, d]
            x = x + self._linear(attended.transpose(0, 1).reshape(n, self.heads * d), f"{prefix}.self_attn.o_proj")
            h = self._norm(x, self._weight(f"{prefix}.post_attention_layernorm.weight"))
            gate = self._linear(h, f"{prefix}.mlp.gate_proj")
            up = self._linear(h, f"{prefix}.mlp.up_proj")
            x = x + self._linear(torch.nn.functional.silu(gate) * up, f"{prefix}.mlp.down_proj")
        if not logits:
            return keys_out, values_out, None
        x = self._norm(x, self._weight("model.norm.weight"))
        head = self._weight("model.embed_tokens.weight" if self.tie or self.tensor("lm_head.weight") is None
                            else "lm_head.weight")
        return keys_out, values_out, x @ head.T

    def star_block(self, context_ids, span: tuple[int, int], anchor_size: int):
        """The KV Star Attention's Phase 1 must keep for the block `span` = [start, end): block 0 alone, any later
        block as `[anchor, block]` at global positions, the anchor's KV thrown away."""
        start, end = span
        if start == 0:
            ids, positions, keep = list(context_ids[:end]), list(range(end)), 0
        else:
            anchor = min(anchor_size, start)
            ids = list(context_ids[:anchor]) + list(context_ids[start:end])
            positions = list(range(anchor)) + list(range(start, end))
            keep = anchor
        keys, values, _ = self.encode(ids, positions)
        return [k[:, keep:] for k in keys], [v[:, keep:] for v in values]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the error on the tensor's own scale."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300))
