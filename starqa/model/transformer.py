"""A compact Llama-family decoder in plain torch (Llama 2/3, SmolLM, Mistral, Qwen2), gpt-fast style.

One model definition serves Phase 1, Phase 2 and full attention: `Transformer.forward` runs the decoder over token
ids at the position ids it is given and hands each layer's attention to a cache object
(starqa.engine.star_cache.StarCache) that holds the stored prefix KV and the buffer being written. It computes what
transformers' LlamaForCausalLM computes, step for step and in the same dtypes (the tests compare logits, KV and greedy
tokens with HF on the same ids), but it loads weights by memory-mapping safetensors files, so answering a question never
imports transformers, and it fuses q/k/v and gate/up into one weight each, so a decoding step streams each weight once
through the CPU GEMV kernel (starqa.kernels).
"""

from __future__ import annotations

import functools
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from starqa import kernels
from starqa.errors import StarqaError, UsageError
from starqa.model.resolve import check_architecture, model_sliding_window
# Rows (tokens x sequences) up to which a bfloat16 linear layer on the CPU goes through the GEMV kernel; from about
# this many rows torch's AMX matrix kernels are faster (benchmarks/decode.py prints both).
GEMV_MAX_ROWS = 8


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str
    rope: dict = field(default_factory=dict)  # rope_type, rope_theta, and that type's parameters
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None  # set only when some layer attends through a window
    eos_token_id: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """From a config.json dict (transformers 4.x or 5.x layout)."""
        check_architecture(config)
        model_type = config["model_type"]
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        rope = dict(config.get("rope_parameters") or {})
        if not rope:  # transformers 4.x: rope_theta and rope_scaling at the top level
            rope = dict(config.get("rope_scaling") or {})
            rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
        eos = config.get("eos_token_id")
        eos_ids = (eos,) if isinstance(eos, int) else tuple(int(t) for t in eos or ())
        return cls(
            model_type=model_type, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings") or 0),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            hidden_act=config.get("hidden_act", "silu"), rope=rope,
            partial_rotary_factor=float(config.get("partial_rotary_factor", 1.0)),
            sliding_window=model_sliding_window(config), eos_token_id=eos_ids,
        )


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [rotary_dim / 2], attention scaling) exactly as transformers' rope init functions give them.

    default, linear and llama3 are computed here; any other rope type asks transformers (imported only then)."""
    rope = args.rope
    dim = int(args.head_dim * args.partial_rotary_factor)
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    kind = rope["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if kind == "llama3":
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_context = float(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "dynamic":
        raise UsageError("dynamic RoPE scaling changes with the sequence length, which blockwise encoding cannot "
                         "follow; starqa does not support such models")
    try:  # yarn, longrope, ...: static frequencies that transformers knows how to compute
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise StarqaError(f"RoPE type '{kind}' needs transformers: {exc}") from None
    if kind not in ROPE_INIT_FUNCTIONS:
        raise UsageError(f"RoPE type '{kind}' is not supported")
    config = AutoConfig.for_model(args.model_type, **_config_for_rope(args))
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    return inv_freq.float(), float(scaling)


def _config_for_rope(args: ModelArgs) -> dict:
    return dict(hidden_size=args.hidden_size, num_attention_heads=args.num_heads, head_dim=args.head_dim,
                max_position_embeddings=args.max_position_embeddings, rope_parameters=dict(args.rope),
                partial_rotary_factor=args.partial_rotary_factor)


_DEQUANTIZED = threading.local()  # per thread: the buffer projections held as integers are de-quantised into


def _dequantized_buffer(numel: int) -> torch.Tensor:
    """This thread's buffer of at least `numel` bfloat16 values (as large as the largest projection de-quantised:
    55 MB for the 1.5B's gate_up), reused by every call: a fresh one per call cost 8x the de-quantisation."""
    buffer = getattr(_DEQUANTIZED, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        _DEQUANTIZED.buffer = buffer = torch.empty(numel, dtype=torch.bfloat16)
    return buffer


@dataclass
class Linear:
    """One (possibly fused) projection: weight [out, in] and optional bias [out], in the compute dtype; `packed`:
    the same rows in 4/8 bits for decoding (starqa.model.quantized_weights), read instead of `weight` by few-row
    calls, with x in bfloat16 or rounded to int8 first (`activations`, --activations). `weight` is None when the
    packed rows are the GGUF's own integers (--weights auto): calls with more rows de-quantise them, to exactly the
    bfloat16 weight the conversion gave, instead of keeping the model's weights in memory twice."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None = None
    packed: list | None = None
    activations: str = "bfloat16"  # what x is rounded to before the packed parts' GEMV (kernels.ACTIVATIONS)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T (+ bias), and `residual + that` with a residual (rounded as torch rounds each op)."""
        rows = x.numel() // x.shape[-1]
        on_cpu_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
        if self.packed is not None and on_cpu_bf16 and rows <= GEMV_MAX_ROWS:
            gemv = functools.partial(kernels.linear_packed, parts=self.packed, weight=self.weight,
                                     activations=self.activations)
            return self._gemv(gemv, x, rows, residual)
        # Held as integers only: de-quantised into a reused buffer (benchmarks/prefill_weights.py: 1.1-1.6x the
        # time of a prefill over a kept bfloat16 copy on the 1.5B; GEMVs of 8 rows at a time were slower from 16 rows)
        weight = self.weight if self.weight is not None else kernels.dequantize_packed(
            self.packed, x.shape[-1], _dequantized_buffer(sum(part.rows for part in self.packed) * x.shape[-1]))
        if on_cpu_bf16 and rows <= GEMV_MAX_ROWS and x.shape[-1] % 32 == 0 and kernels.available():
            return self._gemv(functools.partial(kernels.linear_bf16, weight=weight), x, rows, residual)
        y = F.linear(x, weight, self.bias)
        return y if residual is None else residual + y

    def _gemv(self, gemv, x: torch.Tensor, rows: int, residual: torch.Tensor | None) -> torch.Tensor:
        """A GEMV kernel's product (rows <= GEMV_MAX_ROWS); the residual fused into it where there is no bias."""
        fused = residual if self.bias is None else None
        y = gemv(x.reshape(rows, x.shape[-1]),
                 residual=None if fused is None else fused.reshape(rows, -1)).view(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias
        return y if residual is None or fused is not None else residual + y


@dataclass
class Layer:
    qkv: Linear  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: Linear
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear
    input_norm: torch.Tensor
    post_norm: torch.Tensor


class Transformer:
    """The decoder: embeddings, layers, final norm and LM head; see the module docstring."""

    def __init__(self, args: ModelArgs, embed: torch.Tensor, layers: list[Layer], norm: torch.Tensor,
                 lm_head: torch.Tensor | None) -> None:
        self.args = args
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = Linear(lm_head)
        self.device = embed.device
        self.dtype = embed.dtype
        inv_freq, self.attention_scaling = rope_frequencies(args)
        self.inv_freq = inv_freq.to(self.device)
        if args.hidden_act not in ("silu", "swish"):
            raise UsageError(f"activation '{args.hidden_act}' is not supported (Llama-family models use silu)")

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_directory(cls, directory: Path, *, dtype: torch.dtype, device: torch.device,
                       without: frozenset[str] = frozenset()) -> "Transformer":
        """Weights from the safetensors files of an HF model directory, memory-mapped and fused on the way in;
        the projections named in `without` (keys of `projections()`) are not read: their weight stays None, for
        starqa.model.quantized_weights.attach to give them the GGUF's integers they are held as."""
        from safetensors import safe_open

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        args = ModelArgs.from_config(config)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise StarqaError(f"{directory} holds no .safetensors weights (starqa never unpickles .bin files)")
        where = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                where.update(dict.fromkeys(handle.keys(), path))
        # One file mapped at a time: a mapped file's pages stay resident (and counted as the process's memory) until
        # it is unmapped, so keeping every shard open while the weights are copied into their fused tensors would
        # hold the model twice at the end of loading. Tensors are read in file order, so each file opens about once.
        opened: dict[Path, object] = {}

        def tensor(name: str) -> torch.Tensor | None:
            path = where.get(name)
            if path is None:
                return None
            if path not in opened:
                opened.clear()
                opened[path] = safe_open(str(path), framework="pt")
            return opened[path].get_tensor(name)

        try:
            return cls._from_tensors(args, tensor, dtype=dtype, device=device, without=without,
                                     present=where.__contains__)
        finally:
            opened.clear()

    @classmethod
    def from_hf_model(cls, model) -> "Transformer":
        """From a transformers model object (tests, and models whose weights are not safetensors)."""
        config = model.config.to_dict()
        args = ModelArgs.from_config(config)
        state = dict(model.state_dict())
        parameter = next(model.parameters())
        return cls._from_tensors(args, state.get, dtype=parameter.dtype, device=parameter.device)

    @classmethod
    def _from_tensors(cls, args: ModelArgs, tensor, *, dtype: torch.dtype, device: torch.device,
                      without: frozenset[str] = frozenset(), present=None) -> "Transformer":
        def fused(names: list[str], required: bool = True) -> torch.Tensor | None:
            parts = [tensor(name) for name in names]
            if any(part is None for part in parts):
                if required or any(part is not None for part in parts):
                    missing = [name for name, part in zip(names, parts) if part is None]
                    raise StarqaError(f"the model's weights lack {', '.join(missing)}")
                return None
            rows = sum(part.shape[0] for part in parts)
            out = torch.empty((rows, *parts[0].shape[1:]), dtype=dtype, device=device)
            offset = 0
            for part in parts:  # copy_ converts the dtype while reading the memory-mapped file once
                out[offset:offset + part.shape[0]].copy_(part)
                offset += part.shape[0]
            return out

        def weight(key: str, names: list[str]) -> torch.Tensor | None:
            if key not in without:
                return fused(names)
            missing = [name for name in names if not present(name)]
            if missing:
                raise StarqaError(f"the model's weights lack {', '.join(missing)}")
            return None

        def linear(key: str, names: list[str]) -> Linear:
            return Linear(weight(key, [f"{n}.weight" for n in names]),
                          fused([f"{n}.bias" for n in names], required=False))

        layers = []
        for i in range(args.num_layers):
            prefix = f"model.layers.{i}"
            attention, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
            layers.append(Layer(
                qkv=linear(f"layers.{i}.qkv", [f"{attention}.q_proj", f"{attention}.k_proj", f"{attention}.v_proj"]),
                o=linear(f"layers.{i}.o", [f"{attention}.o_proj"]),
                gate_up=linear(f"layers.{i}.gate_up", [f"{mlp}.gate_proj", f"{mlp}.up_proj"]),
                down=linear(f"layers.{i}.down", [f"{mlp}.down_proj"]),
                input_norm=fused([f"{prefix}.input_layernorm.weight"]),
                post_norm=fused([f"{prefix}.post_attention_layernorm.weight"]),
            ))
        embed = fused(["model.embed_tokens.weight"])
        own_head = present("lm_head.weight") if present is not None else tensor("lm_head.weight") is not None
        lm_head = embed if args.tie_word_embeddings or not own_head else weight("lm_head", ["lm_head.weight"])
        return cls(args, embed, layers, fused(["model.norm.weight"]), lm_head)

    def projections(self):
        """(name, Linear) of every projection a decoding step multiplies: layers.N.qkv/o/gate_up/down, lm_head."""
        for i, layer in enumerate(self.layers):
            for name in ("qkv", "o", "gate_up", "down"):
                yield f"layers.{i}.{name}", getattr(layer, name)
        yield "lm_head", self.lm_head

    def parameters(self):
        yield self.embed
        for layer in self.layers:
            for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
                if linear.weight is not None:  # None: held as its GGUF integers (Linear)
                    yield linear.weight
                if linear.bias is not None:
                    yield linear.bias
            yield layer.input_norm
            yield layer.post_norm
        yield self.norm
        if self.lm_head.weight is not None and self.lm_head.weight is not self.embed:
            yield self.lm_head.weight

    # ------------------------------------------------------------------------------------------------ forward

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As LlamaRMSNorm: normalised in float32 (torch's fused kernel), the weight applied in the input dtype.
        normalised = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.args.rms_norm_eps)
        return weight * normalised.to(x.dtype)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [batch, 1, tokens, rotary_dim] in the compute dtype, as LlamaRotaryEmbedding computes them."""
        freqs = positions[..., None].to(torch.float32) * self.inv_freq  # [batch, tokens, dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(self.dtype)
        sin = (emb.sin() * self.attention_scaling).to(self.dtype)
        return cos[:, None], sin[:, None]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotary = cos.shape[-1]
        head, tail = x[..., :rotary], x[..., rotary:]
        half = rotary // 2
        rotated = torch.cat((-head[..., half:], head[..., :half]), dim=-1)
        out = head * cos + rotated * sin
        return out if tail.shape[-1] == 0 else torch.cat((out, tail), dim=-1)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache, *, logits: bool = True) -> torch.Tensor | None:
        """ids, positions [batch, tokens]; the cache attends and keeps the KV. Returns the next-token logits of each
        sequence's last position [batch, vocab] (in the compute dtype), or None with logits=False (Phase 1)."""
        args = self.args
        batch, tokens = ids.shape
        heads, kv_heads, dim = args.num_heads, args.num_kv_heads, args.head_dim
        x = F.embedding(ids, self.embed)  # [batch, tokens, hidden]
        cos, sin = self.rotary(positions)
        if self._per_token_kernels(x):
            return self._forward_per_token(x, cos, sin, cache, logits=logits)
        for index, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.input_norm)
            qkv = layer.qkv(h)  # [batch, tokens, (heads + 2 kv_heads) dim]
            # RoPE on the query and key heads together: [batch, heads + kv_heads, tokens, dim]
            rotated = self._rotate(qkv[..., : (heads + kv_heads) * dim].view(batch, tokens, heads + kv_heads, dim)
                                   .transpose(1, 2), cos, sin)
            q, k = rotated[:, :heads], rotated[:, heads:]
            v = qkv[..., (heads + kv_heads) * dim:].view(batch, tokens, kv_heads, dim).transpose(1, 2)
            attended = cache.attend(index, q, k, v, dim ** -0.5)  # [batch, tokens, heads, dim]
            x = layer.o(attended.reshape(batch, tokens, heads * dim), residual=x)
            h = self._rms_norm(x, layer.post_norm)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = layer.down(F.silu(gate) * up, residual=x)
        if not logits:
            return None
        return self.lm_head(self._rms_norm(x[:, -1], self.norm))  # [batch, vocab]

    # ------------------------------------------------------------------------------- decoding: per-token kernels

    def _per_token_kernels(self, x: torch.Tensor) -> bool:
        """Decoding a few tokens in bfloat16 on a CPU with the kernels: each layer is ~10 kernel calls, not ~40
        torch ops (see starqa/kernels). Bit for bit the torch path's result: the same roundings."""
        rows = x.shape[0] * x.shape[1]
        return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows <= GEMV_MAX_ROWS
                and x.shape[-1] % 32 == 0 and self.args.head_dim <= 256 and kernels.available())

    def _forward_per_token(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, *,
                           logits: bool) -> torch.Tensor | None:
        args = self.args
        batch, tokens, hidden = x.shape
        heads, kv_heads, dim = args.num_heads, args.num_kv_heads, args.head_dim
        rows, eps = batch * tokens, args.rms_norm_eps
        x = x.reshape(rows, hidden)
        cos, sin = cos.reshape(rows, -1), sin.reshape(rows, -1)  # [batch, 1, tokens, rotary] -> one row per token
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(kernels.rms_norm_bf16(x, layer.input_norm, eps))  # [rows, (heads + 2 kv_heads) dim]
            kernels.rope_bf16_(qkv, heads + kv_heads, dim, cos, sin)
            qkv = qkv.view(batch, tokens, heads + 2 * kv_heads, dim).transpose(1, 2)
            q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
            attended = cache.attend(index, q, k, v, dim ** -0.5)  # [batch, tokens, heads, dim]
            x = layer.o(attended.reshape(rows, heads * dim), residual=x)
            x = layer.down(kernels.silu_mul_bf16(layer.gate_up(kernels.rms_norm_bf16(x, layer.post_norm, eps))),
                           residual=x)
        if not logits:
            return None
        last = x.view(batch, tokens, hidden)[:, -1]
        return self.lm_head(kernels.rms_norm_bf16(last, self.norm, eps))  # [batch, vocab]
