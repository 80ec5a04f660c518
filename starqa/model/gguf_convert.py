"""GGUF -> an HF-format model directory in the compute dtype, one tensor at a time.

transformers can load a GGUF, but only by de-quantising every tensor into a float32 model in memory (10 GB of RSS
for a 1.5B model, and a 7 GB float32 copy on disk). Here the `gguf` package de-quantises one tensor (in row chunks)
at a time, each is rounded once to the compute dtype, and the result is written in safetensors shards of about
`SHARD_BYTES`: peak memory is a shard plus one tensor, and the copy on disk is half of float32's in bfloat16. The
config, tokenizer and generation config come from transformers' GGUF metadata reader (no tensors read); the
weights are identical to what `AutoModelForCausalLM.from_pretrained(..., gguf_file=..., dtype=...)` holds
(tests/test_catalogue.py compares them).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from starqa.errors import StarqaError

SHARD_BYTES = 512 << 20
_ROWS_PER_CHUNK = 16384  # rows de-quantised at once: the float32 intermediate of a vocabulary-sized matrix stays small

# GGUF tensor names -> HF names, the same for every Llama-family architecture starqa supports.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor; None for tensors the HF model does not hold (e.g. rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _unpermute_rows(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for a llama GGUF's q/k projections (its converter interleaves each head's two
    rotary halves); the inverse of convert_hf_to_gguf.py's `permute`, as transformers applies it."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).transpose(1, 2).reshape(weights.shape)


def dequantized(tensor, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in `dtype` ([rows, columns] for matrices), de-quantised in row chunks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = tensor.data
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(data)).to(dtype)  # a copy: the reader's arrays are read-only maps
    rows = data.shape[0] if data.ndim > 1 else 1
    if data.ndim == 1:
        return torch.from_numpy(dequantize(data, tensor.tensor_type)).to(dtype)
    out = None
    for start in range(0, rows, _ROWS_PER_CHUNK):
        chunk = torch.from_numpy(dequantize(data[start:start + _ROWS_PER_CHUNK], tensor.tensor_type))
        if out is None:
            out = torch.empty((rows, chunk.shape[-1]), dtype=dtype)
        out[start:start + chunk.shape[0]].copy_(chunk)
    return out


def _metadata(gguf_path: Path):
    """(config, tokenizer, generation config) from the GGUF's metadata, as transformers reads it."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    # The GGUF reader draws its own progress bars on stderr; its errors are exceptions.
    with contextlib.redirect_stderr(io.StringIO()):
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config, tokenizer, GenerationConfig.from_model_config(config)


def _bits_per_weight(tensor) -> float:
    from gguf import GGML_QUANT_SIZES

    block, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
    return 8 * block_bytes / block


def convert(gguf_path: Path, staging: Path, dtype: torch.dtype, *, reader=None, tied: bool = False) -> None:
    """Write config, tokenizer, generation config and the weights in `dtype` of `gguf_path` into `staging`.

    `tied`: the model was trained with one embedding matrix for input and output (the catalogue says so), which
    llama.cpp stored twice at two precisions (token_embd and output): keep the finer of the two as the one tensor,
    so the copy is a vocabulary matrix smaller (467 MB for the 1.5B in bfloat16) and reads it once. Without it, a
    GGUF with an output matrix of its own keeps both, as transformers does."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    reader = reader or GGUFReader(gguf_path)
    architecture = reader.fields["general.architecture"].contents()
    config, tokenizer, generation = _metadata(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    embedding_source = by_name.get("token_embd.weight")
    if tied and "output.weight" in by_name and embedding_source is not None:
        if _bits_per_weight(by_name["output.weight"]) > _bits_per_weight(embedding_source):
            embedding_source = by_name["output.weight"]
        config.tie_word_embeddings = True
    else:  # as transformers decides
        config.tie_word_embeddings = "output.weight" not in by_name
    config.dtype = dtype
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    element = torch.empty((), dtype=dtype).element_size()
    named = [(hf_name(t.name), t) for t in reader.tensors]
    named = [(name, embedding_source if name == "model.embed_tokens.weight" else t) for name, t in named
             if name is not None and not (config.tie_word_embeddings and name == "lm_head.weight")]
    if not named:
        raise StarqaError(f"{gguf_path.name} holds no tensors of a Llama-family model")
    shards, current, size = [], [], 0
    for name, tensor in named:  # plan the shards first, so each file's final name is known when it is written
        nbytes = int(np.prod(tensor.shape)) * element
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    shards.append(current)

    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = ("model.safetensors" if len(shards) == 1
                     else f"model-{index:05d}-of-{len(shards):05d}.safetensors")
        tensors = {}
        for name, tensor in shard:
            values = dequantized(tensor, dtype)
            if architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                            "k_proj.bias")):
                values = _unpermute_rows(values, heads if ".q_proj." in name else kv_heads)
            tensors[name] = values.contiguous()
            weight_map[name] = file_name
        save_file(tensors, str(staging / file_name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(int(np.prod(t.shape)) * element for _, t in named)
        (staging / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(staging)
    generation.save_pretrained(staging)
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer.save_pretrained(staging)
    for path in staging.rglob("*"):  # the store is private: folders 0700, files 0600
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
