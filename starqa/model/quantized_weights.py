"""Weights for decoding in 4 or 8 bits: a GGUF's own integers repacked for the CPU GEMV (starqa/kernels/cpu_quant.c).

Phase 1 and every prefill multiply bfloat16 matrices (compute-bound: AMX/AVX512-BF16 do them well); a decoding step
reads every weight once, so there the bytes decide. `--weights` (config key `weights`) picks what decoding reads:

  auto      a GGUF's own 4- and 8-bit values where they fit the kernels' formats with no second rounding (Q4_0, Q4_1,
            Q4_K -> int4 groups of 32; Q8_0, Q5_0, Q5_1, Q5_K -> int8 groups of 32; Q6_K -> int8 groups of 16), bfloat16
            for every other tensor type; an HF-format model stays bfloat16.
  bfloat16  the compute dtype's weights (as before).
  int8      every projection in int8: a GGUF's values exactly where they fit (any of the types above: a 4-bit value
            is an int8 value too), else quantized here per output channel (symmetric, float32 scale).
  int4      every projection in int4 groups of 32 (asymmetric: scale and min): Q4_0/Q4_1/Q4_K exactly, anything
            else quantized here from its (de-quantised) values, a second rounding the user asked for.

Every weight is `value = s[g] * q + z[g]` for its group g of consecutive inputs, s and z float32: a Q4_K sub-block's
d * sc (fp16 times a 6-bit integer) and dmin * m are exact in float32, and s * q + z computes in float32 exactly what
`gguf.quants.dequantize` computes (tests/test_quantized.py checks it value for value).

The packed weights are cached once per model and mode in the model's folder (`decode-weights/<mode>.safetensors`:
written aside and renamed under a file lock, 0600; a folder, so that the model's fingerprint and loading, which
take every *.safetensors file beside config.json, never see them), laid out per fused projection (q|k|v, gate|up) so that a load memory-maps them
with no copy. A model directory the user owns is never written to: its cache goes to the store's models/ folder.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from starqa.errors import StarqaError, UsageError

WEIGHT_MODES = ("auto", "bfloat16", "int8", "int4")
FORMAT_VERSION = 2
CACHE_FOLDER = "decode-weights"  # <model dir>/decode-weights/<mode>.safetensors
SOURCE_FILE = "starqa-source.json"  # written by the GGUF conversion: {"gguf": path, "gguf_sha256": ...}

# GGUF tensor types whose integers the kernels take as they are: type -> bits `auto` keeps them in.
EXACT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q8_0": 8, "Q5_0": 8, "Q5_1": 8, "Q5_K": 8, "Q6_K": 8}
_QK_K = 256


@dataclass
class QuantizedMatrix:
    """One [out, in] weight as integers q with float32 scales s (and zeros z) per group of `group` inputs."""

    q: np.ndarray  # int8 (or int16) [out, in]: 0..15 (4-bit types), else -128..127
    scales: np.ndarray  # float32 [out, in / group]
    zeros: np.ndarray | None  # float32 [out, in / group], or None (symmetric)
    group: int
    source: str  # the GGUF type it came from, or "bfloat16"/"float32"/... when quantized here

    def dequantize(self) -> np.ndarray:
        """float32 values, computed as the GGUF de-quantisers compute them: fp32(s * q) + z."""
        out, features = self.q.shape
        q = self.q.astype(np.float32).reshape(out, features // self.group, self.group)
        values = self.scales[..., None] * q
        if self.zeros is not None:
            values = values + self.zeros[..., None]
        return values.reshape(out, features)

    @property
    def fits_int4(self) -> bool:
        return self.group == 32 and self.zeros is not None and self.q.min() >= 0 and self.q.max() <= 15


# ------------------------------------------------------------------------------------------------ GGUF blocks

def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def _q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's twelve bytes of 6-bit sub-block scales and mins (as gguf.quants.Q4_K.get_scale_min)."""
    n = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8), mins.reshape(n, 8)


def unpack_blocks(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """A GGUF tensor's blocks (uint8 [n_blocks, type_size]) -> q int16 [n, block], s [n, groups], z or None, group.

    The block layouts are gguf.quants' (ggml-quants.c): q, s and z are taken out as they are stored."""
    n = blocks.shape[0]
    if kind == "Q8_0":
        return blocks[:, 2:].copy().view(np.int8).astype(np.int16), _f16(blocks[:, :2]), None, 32
    if kind in ("Q4_0", "Q4_1"):
        offset = 2 if kind == "Q4_0" else 4
        qs = blocks[:, offset:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)
        d = _f16(blocks[:, :2])
        z = -8 * d if kind == "Q4_0" else _f16(blocks[:, 2:4])  # -8d is exact in float32
        return q, d, z, 32
    if kind in ("Q5_0", "Q5_1"):
        offset = 2 if kind == "Q5_0" else 4
        qh = blocks[:, offset:offset + 4].copy().view(np.uint32).reshape(n, 1) >> np.arange(32, dtype=np.uint32)
        qs = blocks[:, offset + 4:]
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)
        q = low | ((qh & 1).astype(np.int16) << 4)
        d = _f16(blocks[:, :2])
        if kind == "Q5_0":
            return q - 16, d, None, 32
        return q, d, _f16(blocks[:, 2:4]), 32
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mins = _q4k_scale_min(blocks[:, 4:16])
        s = d * sc.astype(np.float32)  # [n, 8], exact: an fp16 times a 6-bit integer
        z = -(dmin * mins.astype(np.float32))
        if kind == "Q4_K":
            qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
            q = (qs & 0x0F).reshape(n, 256).astype(np.int16)
        else:
            qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            ql = blocks[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
            q = ((ql & 0x0F).reshape(n, 8, 32).astype(np.int16) | ((qh & 1).astype(np.int16) << 4)).reshape(n, 256)
        return q, s, z, 32
    if kind == "Q6_K":
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = _f16(blocks[:, 208:210])
        low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = (low.reshape(n, 8, 32).astype(np.int16) | (high.reshape(n, 8, 32).astype(np.int16) << 4)) - 32
        return q.reshape(n, 256), d * sc, None, 16  # d * sc exact: an fp16 times an int8
    raise ValueError(f"no exact integer form for GGUF type {kind}")


def gguf_matrix(tensor, rows_per_chunk: int = 4096) -> QuantizedMatrix | np.ndarray:
    """A gguf.ReaderTensor [out, in] as a QuantizedMatrix (exact; q held as int8) when its type has one, else float32
    values; unpacked a few thousand rows at a time, so a vocabulary-sized matrix needs little more than its result."""
    import gguf

    kind = tensor.tensor_type.name
    features, out = int(tensor.shape[0]), int(np.prod(tensor.shape[1:]))
    if kind not in EXACT_TYPES:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(out,
                                                                                                             features)
    block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(out, -1, type_size)
    q = np.empty((out, features), dtype=np.int8)
    scales = zeros = None
    group = 0
    for start in range(0, out, rows_per_chunk):
        chunk = blocks[start:start + rows_per_chunk]
        rows = chunk.shape[0]
        q_part, s_part, z_part, group = unpack_blocks(kind, chunk.reshape(-1, type_size))
        if scales is None:
            scales = np.empty((out, features // group), dtype=np.float32)
            zeros = None if z_part is None else np.empty((out, features // group), dtype=np.float32)
        q[start:start + rows] = q_part.reshape(rows, features)
        scales[start:start + rows] = s_part.reshape(rows, -1)
        if zeros is not None:
            zeros[start:start + rows] = z_part.reshape(rows, -1)
    return QuantizedMatrix(q, scales, zeros, group, kind)


class GGUFWeights:
    """HF weight name -> that weight read from the GGUF (exact integers or float32 values), on demand: one
    projection's pieces are in memory at a time."""

    def __init__(self, gguf_path: Path, args) -> None:
        import gguf

        self.path = Path(gguf_path)
        self.args = args
        reader = gguf.GGUFReader(str(gguf_path))
        self.mapping = reader.data  # the file, memory-mapped (np.memmap)
        self.tensors = {tensor.name: tensor for tensor in reader.tensors}
        field_ = reader.fields.get("general.architecture")
        self.architecture = field_.contents() if field_ is not None else ""
        self.has_output = "output.weight" in self.tensors
        self.output_finer = self.has_output and _bits_per_weight(self.tensors["output.weight"]) > _bits_per_weight(
            self.tensors["token_embd.weight"])

    def release_pages(self) -> None:
        """Let the kernel drop the file's pages read so far: a mapped file's pages count as this process's memory
        until unmapped, so packing the 1.5B held its whole 1.1 GB GGUF beside the bf16 model and the packed copy. The
        pieces taken out are copies; a page touched again is read again (from the page cache)."""
        import ctypes
        import mmap

        if os.name != "posix" or not hasattr(mmap, "MADV_DONTNEED") or not self.mapping.size:
            return
        # The process's own symbols hold libc's madvise (ctypes.util.find_library would start a process per call).
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise(ctypes.c_void_p(self.mapping.ctypes.data), ctypes.c_size_t(self.mapping.nbytes), mmap.MADV_DONTNEED)

    def __getitem__(self, name: str) -> QuantizedMatrix | np.ndarray:
        args = self.args
        source = gguf_name(name, tied=args.tie_word_embeddings, has_output=self.has_output,
                           output_finer=self.output_finer)
        if source not in self.tensors:
            raise StarqaError(f"{self.path.name} has no tensor {source} (for {name})")
        matrix = gguf_matrix(self.tensors[source])
        if self.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = args.num_heads if ".q_proj." in name else args.num_kv_heads
            matrix = _permuted(matrix, hf_row_order(_rows(matrix), heads))
        return matrix


# ------------------------------------------------------------------------------------------------ quantizers

def quantize_int8_per_channel(values: np.ndarray, source: str) -> QuantizedMatrix:
    """Symmetric int8, one float32 scale per output channel (absmax / 127)."""
    values = values.astype(np.float32)
    scale = np.abs(values).max(axis=1, keepdims=True) / np.float32(127)
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.rint(values * inverse), -127, 127).astype(np.int16)
    return QuantizedMatrix(q, scale.astype(np.float32), None, values.shape[1], source)


def quantize_int4_groups(values: np.ndarray, source: str) -> QuantizedMatrix:
    """Asymmetric int4 in groups of 32: s = (max - min) / 15, z = min, q = round((v - min) / s)."""
    out, features = values.shape
    grouped = values.astype(np.float32).reshape(out, features // 32, 32)
    low, high = grouped.min(axis=-1), grouped.max(axis=-1)
    scale = ((high - low) / np.float32(15)).astype(np.float32)
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.rint((grouped - low[..., None]) * inverse[..., None]), 0, 15).astype(np.int16)
    return QuantizedMatrix(q.reshape(out, features), scale, low.astype(np.float32), 32, source)


def choose(matrix: QuantizedMatrix | np.ndarray, mode: str, source: str = "") -> tuple[QuantizedMatrix, int] | None:
    """What decoding reads for one weight under `mode`: (integers, 4 or 8 bits), or None for bfloat16. `matrix`: a
    GGUF tensor's exact integers, or float values (an HF model's weights, or a GGUF type without an exact form)."""
    if mode == "bfloat16":
        return None
    if isinstance(matrix, QuantizedMatrix):
        int4_ok = matrix.fits_int4 and matrix.q.shape[1] % 64 == 0
        if mode == "int8" or (mode == "auto" and (EXACT_TYPES[matrix.source] == 8 or not int4_ok)):
            return matrix, 8  # exact: a 4-bit type's q (0..15) with its s and z is an int8 value too
        if int4_ok:
            return matrix, 4
        if matrix.q.shape[1] % 64 == 0:  # int4 asked of an 8-bit type: a second rounding, as asked
            return quantize_int4_groups(matrix.dequantize(), matrix.source), 4
        return matrix, 8
    if mode == "auto":
        return None
    if mode == "int4" and matrix.shape[1] % 64 == 0:
        return quantize_int4_groups(matrix, source), 4
    return quantize_int8_per_channel(matrix, source), 8


# ------------------------------------------------------------------------------------------------ packed parts

@dataclass
class PackedPart:
    """Rows [start, start + rows) of a (fused) projection in one format. bits 16: the bfloat16 weight's rows."""

    rows: int
    bits: int
    features: int
    group: int = 0
    weight: torch.Tensor | None = None  # bits 4: uint8 [rows, in / 2]; bits 8: int8 [rows, in]
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)
    wide: bool = False  # int8 with some q outside -64..63 (Q8_0, per-channel): the kernel's two-product path


def pack_parts(choices: list[tuple[QuantizedMatrix, int] | None], row_counts: list[int],
               features: int) -> list[PackedPart]:
    """The kernels' layout of a fused projection's pieces; consecutive pieces of one format share a part."""
    parts: list[PackedPart] = []
    pending: list[tuple[tuple[QuantizedMatrix, int] | None, int]] = []

    def key(choice):
        return (16,) if choice is None else (choice[1], choice[0].group, choice[0].zeros is not None)

    def flush():
        if not pending:
            return
        first = pending[0][0]
        rows = sum(count for _, count in pending)
        if first is None:
            parts.append(PackedPart(rows=rows, bits=16, features=features))
        else:
            bits, group, has_zeros = key(first)
            matrices = [choice[0] for choice, _ in pending]

            def joined(arrays: list[np.ndarray]) -> np.ndarray:  # no copy of a lone piece (the LM head: 233 MB)
                return np.ascontiguousarray(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))

            q = joined([m.q for m in matrices])
            scales = torch.from_numpy(joined([m.scales for m in matrices]))
            zeros = torch.from_numpy(joined([m.zeros for m in matrices])) if has_zeros else None
            weight = torch.from_numpy(pack_int4(q) if bits == 4 else q.astype(np.int8, copy=False))
            wide = bits == 8 and bool(q.min() < -64 or q.max() > 63)
            parts.append(PackedPart(rows, bits, features, group, weight, scales, zeros,
                                    sorted({m.source for m in matrices}), wide))
        pending.clear()

    for choice, count in zip(choices, row_counts):
        if choice is not None and choice[0].q.shape != (count, features):
            raise StarqaError(f"a packed weight is {tuple(choice[0].q.shape)} where the model has {(count, features)}")
        if pending and key(pending[0][0]) != key(choice):
            flush()
        pending.append((choice, count))
    flush()
    return parts


def pack_int4(q: np.ndarray) -> np.ndarray:
    """q 0..15 [out, in] -> uint8 [out, in / 2]: in each 64-input chunk, byte j = q[j] | q[32 + j] << 4."""
    out, features = q.shape
    chunks = q.astype(np.uint8).reshape(out, features // 64, 2, 32)
    return np.ascontiguousarray((chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(out, features // 2))


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    out, half = packed.shape
    chunks = packed.reshape(out, half // 32, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(out, half * 2).astype(np.int16)


def part_values(part: PackedPart, bf16_rows: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [rows, in] values the kernel multiplies by (tests' reference; bf16 parts: the bf16 rows)."""
    if part.bits == 16:
        return bf16_rows.double()
    q = unpack_int4(part.weight.numpy()) if part.bits == 4 else part.weight.numpy().astype(np.int16)
    matrix = QuantizedMatrix(q, part.scales.numpy(), None if part.zeros is None else part.zeros.numpy(), part.group,
                             "")
    return torch.from_numpy(matrix.dequantize()).double()


# ------------------------------------------------------------------------------------------------ the model's projections

def projection_names(num_layers: int) -> dict[str, list[str]]:
    """Each (fused) projection of starqa.model.transformer and the HF weights its rows concatenate, in order."""
    names: dict[str, list[str]] = {}
    for i in range(num_layers):
        attention, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        names[f"layers.{i}.qkv"] = [f"{attention}.{p}_proj.weight" for p in "qkv"]
        names[f"layers.{i}.o"] = [f"{attention}.o_proj.weight"]
        names[f"layers.{i}.gate_up"] = [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"]
        names[f"layers.{i}.down"] = [f"{mlp}.down_proj.weight"]
    names["lm_head"] = ["lm_head.weight"]
    return names


def projection_shape(args, key: str) -> tuple[int, int]:
    """(rows, inputs) of a projection (a key of projection_names) from the model's configuration."""
    attention = args.num_heads * args.head_dim
    return {"qkv": ((args.num_heads + 2 * args.num_kv_heads) * args.head_dim, args.hidden_size),
            "o": (args.hidden_size, attention), "gate_up": (2 * args.intermediate_size, args.hidden_size),
            "down": (args.hidden_size, args.intermediate_size),
            "lm_head": (args.vocab_size, args.hidden_size)}[key.rsplit(".", 1)[-1]]


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str, *, tied: bool, has_output: bool, output_finer: bool = False) -> str:
    """The GGUF tensor an HF weight was converted from (llama.cpp's names). The LM head: `output` when the model has
    its own; a tied model's one matrix is the finer of token_embd and output (starqa.model.gguf_convert keeps that one),
    else token_embd."""
    if hf_name in ("lm_head.weight", "model.embed_tokens.weight"):
        own_head = hf_name == "lm_head.weight" and not tied
        return "output.weight" if has_output and (own_head or (tied and output_finer)) else "token_embd.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def hf_row_order(rows: int, heads: int) -> np.ndarray:
    """Which GGUF row each HF row is, for attn_q/attn_k of a llama-architecture GGUF: llama.cpp's converter permuted
    them (rotary halves interleaved); transformers' reverse_permute_weights undoes it, applied here to row indices."""
    dim = rows // heads // 2
    return np.arange(rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(rows)


def _permuted(matrix: QuantizedMatrix | np.ndarray, order: np.ndarray):
    if isinstance(matrix, np.ndarray):
        return matrix[order]
    return QuantizedMatrix(matrix.q[order], matrix.scales[order], None if matrix.zeros is None else matrix.zeros[order],
                           matrix.group, matrix.source)


def gguf_matrices(gguf_path: Path, args) -> GGUFWeights:
    """name -> HF weight (exact integers or float32 values) read from the GGUF, for every projection's piece."""
    return GGUFWeights(gguf_path, args)


def _bits_per_weight(tensor) -> float:
    import gguf

    block, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    return 8 * block_bytes / block


def _check_rows(name: str, matrix, weight: torch.Tensor) -> None:
    """The GGUF's values, rounded as the conversion rounded them, must be the model's weights: a few rows of each
    piece are compared (a wrong tensor, row order or layout would differ)."""
    rows = sorted({0, 1, _rows(matrix) - 1})
    if isinstance(matrix, QuantizedMatrix):  # only the rows compared: the whole LM head in float32 is ~1 GB
        values = QuantizedMatrix(matrix.q[rows], matrix.scales[rows],
                                 None if matrix.zeros is None else matrix.zeros[rows], matrix.group,
                                 matrix.source).dequantize()
    else:
        values = matrix[rows]
    expected = weight[rows].float()
    got = torch.from_numpy(np.ascontiguousarray(values)).to(weight.dtype).float()
    if got.shape != expected.shape or not torch.equal(got, expected):
        raise StarqaError(f"the GGUF's {name} does not hold the converted model's values; its packed weights were "
                          "not used (delete the model from the store's models/ folder to convert it again)")


def _rows(matrix) -> int:
    return matrix.q.shape[0] if isinstance(matrix, QuantizedMatrix) else matrix.shape[0]


def build_packed(transformer, mode: str, gguf_path: Path | None) -> dict[str, list[PackedPart]]:
    """Every projection's parts under `mode`: from the GGUF's integers when the model came from one, else from the
    model's own (bfloat16) weights."""
    names = projection_names(transformer.args.num_layers)
    linears = dict(transformer.projections())
    packed: dict[str, list[PackedPart]] = {}
    if gguf_path is not None:
        weights = gguf_matrices(gguf_path, transformer.args)
        for key, pieces in names.items():
            matrices = {name: weights[name] for name in pieces}
            counts = [_rows(matrices[name]) for name in pieces]
            if sum(counts) != linears[key].weight.shape[0]:
                raise StarqaError(f"{gguf_path.name} does not match the converted model ({key}: {sum(counts)} rows, "
                                  f"the model has {linears[key].weight.shape[0]})")
            start = 0
            for name, count in zip(pieces, counts):
                _check_rows(name, matrices[name], linears[key].weight[start:start + count])
                start += count
            packed[key] = pack_parts([choose(matrices[name], mode) for name in pieces], counts,
                                     linears[key].weight.shape[1])
            del matrices
            weights.release_pages()
        return packed
    for key, linear in linears.items():
        values = linear.weight.detach().float().cpu().numpy()
        source = str(linear.weight.dtype).removeprefix("torch.")
        packed[key] = pack_parts([choose(values, mode, source)], [values.shape[0]], values.shape[1])
    return packed


# ------------------------------------------------------------------------------------------------ the cache file

def _metadata(packed: dict[str, list[PackedPart]], identity: dict) -> dict:
    return {"format_version": FORMAT_VERSION, **identity,
            "projections": {key: [{"rows": p.rows, "bits": p.bits, "features": p.features, "group": p.group, "zeros": p.zeros is not None,
                                   "sources": p.sources, "wide": p.wide} for p in parts] for key, parts in packed.items()}}


def write_packed(path: Path, packed: dict[str, list[PackedPart]], identity: dict) -> None:
    """One safetensors file (written aside, renamed into place, 0600): tensors `<projection>.<part>.{q,s,z}`."""
    from safetensors.torch import save_file

    tensors = {}
    for key, parts in packed.items():
        for index, part in enumerate(parts):
            if part.bits == 16:
                continue
            tensors[f"{key}.{index}.q"] = part.weight
            tensors[f"{key}.{index}.s"] = part.scales
            if part.zeros is not None:
                tensors[f"{key}.{index}.z"] = part.zeros
    staging = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, str(staging), metadata={"starqa": json.dumps(_metadata(packed, identity))})
        os.chmod(staging, 0o600)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F32": torch.float32}


def read_packed(path: Path, identity: dict) -> dict[str, list[PackedPart]] | None:
    """The packed projections, memory-mapped (no copy); None when the file is missing, damaged or for another
    model/mode/format (it is then rebuilt)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > min(size, 1 << 26):
                return None
            header = json.loads(handle.read(header_size))
        meta = json.loads(header.get("__metadata__", {}).get("starqa", "{}"))
    except (OSError, ValueError, struct.error):
        return None
    if meta.get("format_version") != FORMAT_VERSION or any(meta.get(k) != v for k, v in identity.items()):
        return None
    storage = torch.UntypedStorage.from_file(str(path), False, size)
    base = 8 + header_size

    def tensor(name: str) -> torch.Tensor:
        info = header[name]
        begin, end = info["data_offsets"]
        if base + end > size:
            raise ValueError(name)
        flat = torch.empty(0, dtype=_DTYPES[info["dtype"]])
        flat.set_(storage, (base + begin) // flat.element_size(), (int(np.prod(info["shape"])),))
        return flat.view(info["shape"])

    packed: dict[str, list[PackedPart]] = {}
    try:
        for key, descriptions in meta["projections"].items():
            parts = []
            for index, d in enumerate(descriptions):
                if d["bits"] == 16:
                    parts.append(PackedPart(rows=d["rows"], bits=16, features=d["features"]))
                    continue
                parts.append(PackedPart(d["rows"], d["bits"], d["features"], d["group"], tensor(f"{key}.{index}.q"),
                                        tensor(f"{key}.{index}.s"),
                                        tensor(f"{key}.{index}.z") if d["zeros"] else None, d["sources"],
                                        d["wide"]))
            packed[key] = parts
    except (KeyError, ValueError, TypeError):
        return None
    return packed


# ------------------------------------------------------------------------------------------------ attaching

def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str:
    """Why 4/8-bit decoding is not offered here ("" when it is)."""
    from starqa import kernels

    if device.type != "cpu":
        return f"4/8-bit decoding runs on the CPU only (this model runs on {device.type})"
    if dtype != torch.bfloat16:
        return f"4/8-bit decoding needs the bfloat16 compute dtype (this model computes in {dtype})"
    if not kernels.available():
        return f"4/8-bit decoding needs the CPU decoding kernels: {kernels.unavailable_reason()}"
    if not kernels.quantized_available():
        return "4/8-bit decoding needs AVX512-BF16, which this CPU (or compiler) lacks"
    return ""


def gguf_source(model_dir: Path | None) -> tuple[Path, str] | None:
    """(GGUF path, its SHA-256) that a converted model directory came from, when it records one that still exists."""
    if model_dir is None or not (Path(model_dir) / SOURCE_FILE).is_file():
        return None
    try:
        record = json.loads((Path(model_dir) / SOURCE_FILE).read_text(encoding="utf-8"))
        path = Path(record["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (path, str(record.get("gguf_sha256", ""))) if path.is_file() else None


def attach(transformer, mode: str, *, model_dir: Path | None = None, cache_path: Path | None = None,
           model_key: str = "", on_status=None, activations: str = "bfloat16") -> str:
    """Give the transformer's projections the weights decoding reads under `mode`, multiplied with x in
    `activations` (bfloat16, or int8: rounded per 32 inputs, see starqa/kernels/cpu_quant.c); returns a one-line
    summary ("bfloat16", or e.g. "int4 (Q4_K) 71%, int8 (Q6_K) 27%, bfloat16 2% of the decoding bytes", followed by
    "; int8 activations" when they apply).

    The packed weights come from `cache_path` when it holds them for this model and mode, else they are built
    (from the GGUF the model was converted from, else from its weights) and written there. int8 activations apply
    to 4/8-bit weights only: over bfloat16 weights (`--weights bfloat16`, or `auto` on an HF-format model) decoding
    stays as it is."""
    from starqa import kernels

    if mode not in WEIGHT_MODES:
        raise UsageError(f"--weights must be one of {', '.join(WEIGHT_MODES)}, not '{mode}'")
    if activations not in kernels.ACTIVATIONS:
        raise UsageError(f"--activations must be one of {', '.join(kernels.ACTIVATIONS)}, not '{activations}'")
    for _, linear in transformer.projections():
        if linear.weight is None and linear.packed is not None:  # an earlier attach kept only the integers
            linear.weight = kernels.dequantize_packed(linear.packed, linear.packed[0].features)  # exactly
        linear.packed = None
        linear.activations = "bfloat16"
    reason = unsupported_reason(transformer.device, transformer.dtype)
    source = gguf_source(model_dir)
    if mode == "bfloat16" or (mode == "auto" and (reason or source is None)):
        # (an HF-format model stays in its own precision unless asked)
        _check_complete(transformer)
        return "bfloat16"
    if reason:
        raise UsageError(f"--weights {mode}: {reason}")
    if activations == "int8" and not kernels.quantized_x8_available():  # before any packing
        raise UsageError("--activations int8 needs AVX512-VNNI, which this CPU (or compiler) lacks; use "
                         "--activations bfloat16")
    identity = {"mode": mode, "gguf_sha256": source[1] if source else "", "model": model_key}
    packed = read_packed(cache_path, identity) if cache_path is not None else None
    if packed is None and any(linear.weight is None for _, linear in transformer.projections()):
        raise StarqaError(f"the packed weights {cache_path} went away while the model loaded without the "
                          "weights they hold; run the command again")
    if packed is None:
        if cache_path is None:
            packed = build_packed(transformer, mode, source[0] if source else None)
        else:
            from filelock import FileLock

            cache_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with FileLock(str(cache_path) + ".lock", mode=0o600):
                packed = read_packed(cache_path, identity)  # another process may have built it meanwhile
                if packed is None:
                    if on_status:
                        on_status(f"packing the weights for {mode} decoding (once)")
                    write_packed(cache_path, build_packed(transformer, mode, source[0] if source else None),
                                 identity)
                    packed = read_packed(cache_path, identity)
                    if packed is None:
                        raise StarqaError(f"cannot read back the packed weights {cache_path}")
    linears = dict(transformer.projections())
    tied = transformer.lm_head.weight is transformer.embed
    for key, parts in packed.items():
        linear = linears.get(key)
        shape = (sum(p.rows for p in parts), parts[0].features)
        if linear is None or shape != (tuple(linear.weight.shape) if linear.weight is not None
                                       else projection_shape(transformer.args, key)):
            raise StarqaError(f"the packed weights do not match the model ({key})")
        if all(p.bits == 16 for p in parts):
            continue
        linear.packed = parts
        linear.activations = activations
        if key in integers_only(mode, source is not None, {key: parts}, tied):
            linear.weight = None
    _check_complete(transformer)
    return summary(packed) + ("; int8 activations" if activations == "int8" else "")


def _check_complete(transformer) -> None:
    """Every projection has a weight or packed parts (one loaded without its weight gets the parts it is held as)."""
    missing = [key for key, linear in transformer.projections() if linear.weight is None and linear.packed is None]
    if missing:
        raise StarqaError(f"the model was loaded without the weights of {', '.join(missing[:3])}, and its packed "
                          "weights do not hold them; run the command again")


def integers_only(mode: str, from_gguf: bool, packed: dict[str, list[PackedPart]], tied: bool) -> frozenset[str]:
    """The projections that need no bfloat16 weight beside their packed parts: under auto every part is a GGUF
    integer as it is, and the bfloat16 weight is their rounding (checked by _check_rows when they were packed), so
    calls with many rows de-quantise them (starqa.model.transformer.Linear) instead: the 1.5B then holds 1.3 GB of
    weights where it held 2.9 + 1.3 GB. A tied LM head is the embedding, which lookups still read."""
    if mode != "auto" or not from_gguf:
        return frozenset()
    return frozenset(key for key, parts in packed.items()
                     if parts and all(p.bits in (4, 8) for p in parts) and not (key == "lm_head" and tied))


def cached_integers_only(mode: str, *, model_dir: Path, cache_path: Path, model_key: str, args, device: torch.device,
                         dtype: torch.dtype) -> frozenset[str]:
    """integers_only for the packed weights already cached at `cache_path` (none when they are not, or cannot be
    used here): the projections a model can be loaded without (Transformer.from_directory's `without`), so that an
    ask never holds their bfloat16 weights, not even while loading."""
    source = gguf_source(model_dir)
    if mode != "auto" or source is None or unsupported_reason(device, dtype):
        return frozenset()
    packed = read_packed(cache_path, {"mode": mode, "gguf_sha256": source[1], "model": model_key})
    if packed is None:
        return frozenset()
    if any((sum(p.rows for p in parts), parts[0].features) != projection_shape(args, key)
           for key, parts in packed.items()):
        return frozenset()  # attach says why
    return integers_only(mode, True, packed, bool(args.tie_word_embeddings))


def summary(packed: dict[str, list[PackedPart]]) -> str:
    """Share of the decoding bytes per precision, e.g. "int4 (Q4_K) 71%, int8 (Q6_K, Q8_0) 29%"."""
    totals: dict[str, list] = {}
    for parts in packed.values():
        for part in parts:
            label = {4: "int4", 8: "int8", 16: "bfloat16"}[part.bits]
            entry = totals.setdefault(label, [0, set()])
            entry[0] += part_bytes(part)
            entry[1].update(part.sources)
    whole = sum(entry[0] for entry in totals.values()) or 1
    return ", ".join(f"{label}{' (' + ', '.join(sorted(s)) + ')' if s else ''} {count / whole:.0%}"
                     for label, (count, s) in sorted(totals.items(), key=lambda item: -item[1][0]))


def part_bytes(part: PackedPart) -> int:
    """Bytes a decoding step reads of one part (a bf16 part: its rows of the bf16 weight)."""
    if part.bits == 16:
        return part.rows * part.features * 2
    return sum(t.numel() * t.element_size() for t in (part.weight, part.scales, part.zeros) if t is not None)
