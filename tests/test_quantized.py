"""Decoding with 4- and 8-bit weights (starqa.model.quantized_weights, starqa/kernels/cpu_quant.c): a GGUF's integers are
taken exactly as gguf de-quantises them, the kernels match a float64 reference of the same de-quantised weights
(per projection and end to end), `auto` keeps a GGUF's own integers, and a stored document answers with each
--weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, planted_number_prompts, tiny_model
from starqa import kernels
from starqa.errors import StarqaError
from starqa.model import quantized_weights as qw

needs_kernels = pytest.mark.skipif(not kernels.quantized_available(),
                                   reason="the 4/8-bit kernels need AVX512-BF16 and a C compiler")

# Where each GGUF block layout keeps its float16 scales (d, and dmin/m where it has them), in bytes.
_HALF_OFFSETS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2],
                 "Q5_K": [0, 2], "Q6_K": [208]}


def _random_blocks(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """Random bytes in the block layout of `kind`, with finite float16 scales: every such block is a valid one."""
    import gguf

    rng = np.random.default_rng(seed)
    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for at in _HALF_OFFSETS[kind]:
        raw[:, at:at + 2] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw


@pytest.mark.parametrize("kind", sorted(qw.EXACT_TYPES))
def test_gguf_blocks_give_exactly_the_values_gguf_dequantizes(kind):
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    raw = _random_blocks(kind, 96)
    expected = gguf.quants.dequantize(raw.reshape(-1), qtype).reshape(1, -1)
    q, s, z, group = qw.unpack_blocks(kind, raw)
    matrix = qw.QuantizedMatrix(q.reshape(1, -1), s.reshape(1, -1), None if z is None else z.reshape(1, -1), group,
                                kind)
    assert group == (16 if kind == "Q6_K" else 32)
    assert np.array_equal(matrix.dequantize(), expected)  # value for value (a -0.0 equals 0.0)
    assert q.min() >= -128 and q.max() <= 127
    assert matrix.fits_int4 == (qw.EXACT_TYPES[kind] == 4)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_values_quantized_by_gguf_come_back_exactly(kind):
    """Synthetic weights quantized with gguf.quants.quantize (where gguf has a quantizer) and read back."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    values = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    q, s, z, group = qw.unpack_blocks(kind, raw.reshape(-1, size))
    matrix = qw.QuantizedMatrix(q.reshape(8, 256), s.reshape(8, -1), None if z is None else z.reshape(8, -1),
                                group, kind)
    assert np.array_equal(matrix.dequantize(), gguf.quants.dequantize(raw, qtype))


@pytest.mark.slow
def test_the_bundled_gguf_maps_onto_the_converted_models_weights(bundled_engine):
    """smollm2-135m's GGUF (Q4_1 projections, a Q8_0 embedding, llama-permuted attn_q/attn_k): each HF weight read
    from it equals, value for value, what the float32 conversion holds (transformers de-quantised and un-permuted
    the same file), so the packed rows follow the HF row order."""
    import gguf

    from starqa.model.resolve import bundled_gguf_path

    path = bundled_gguf_path("smollm2-135m")
    kinds = {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_1" and kinds["token_embd.weight"] == "Q8_0"
    matrices = qw.gguf_matrices(path, bundled_engine.args)
    model = bundled_engine.model
    layer = model.layers[0]
    q_rows = bundled_engine.args.num_heads * bundled_engine.args.head_dim
    k_rows = bundled_engine.args.num_kv_heads * bundled_engine.args.head_dim
    pieces = {
        "model.layers.0.self_attn.q_proj.weight": layer.qkv.weight[:q_rows],
        "model.layers.0.self_attn.k_proj.weight": layer.qkv.weight[q_rows:q_rows + k_rows],
        "model.layers.0.self_attn.v_proj.weight": layer.qkv.weight[q_rows + k_rows:],
        "model.layers.0.mlp.down_proj.weight": layer.down.weight,
        "lm_head.weight": model.lm_head.weight,  # tied: the embedding's Q8_0 values
    }
    for name, converted in pieces.items():
        matrix = matrices[name]
        assert isinstance(matrix, qw.QuantizedMatrix), name
        assert np.array_equal(matrix.dequantize(), converted.float().numpy()), name
    unpermuted = qw.gguf_matrix(next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight"))
    assert not np.array_equal(unpermuted.dequantize(), pieces["model.layers.0.self_attn.q_proj.weight"].numpy())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_packing_lets_the_pages_of_the_gguf_it_has_read_go():
    """A mapped file's pages count as the process's memory until unmapped: packing the 1.5B held its whole GGUF
    beside the bf16 model and the packed copy (7.2 GB at the peak). release_pages gives them back."""
    from starqa.model.resolve import bundled_gguf_path

    def file_pages_kib() -> int:
        status = open("/proc/self/status", encoding="ascii").read()
        return int(status.split("RssFile:")[1].split()[0])

    weights = qw.GGUFWeights(bundled_gguf_path("smollm2-135m"), None)
    size_kib = weights.mapping.nbytes // 1024
    tensor = weights.tensors["blk.0.ffn_down.weight"]
    checksum = int(np.asarray(tensor.data, dtype=np.uint8).astype(np.int64).sum())
    weights.release_pages()
    before = file_pages_kib()
    assert int(np.asarray(weights.mapping[::4096], dtype=np.int64).sum()) >= 0  # one byte of every page: all read
    read = file_pages_kib()
    assert read - before > 0.5 * size_kib, (before, read, size_kib)
    weights.release_pages()
    assert file_pages_kib() - before < 0.1 * size_kib
    assert int(np.asarray(tensor.data, dtype=np.uint8).astype(np.int64).sum()) == checksum  # read again, the same


def test_packing_holds_no_float32_copy_or_second_copy_of_a_matrix():
    """Packing the 1.5B's first load peaked at 6.5 GiB, over the 6 GB budget: checking three rows de-quantised its
    whole LM head to float32 (~1 GB, twice over in temporaries) and a lone piece's integers were copied twice. Now
    the check de-quantises the rows it compares and a lone piece is packed without a copy (numpy's allocations are
    traced by tracemalloc)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    out, features = 4096, 1024
    matrix = qw.QuantizedMatrix(rng.integers(-32, 32, (out, features), dtype=np.int8),
                                rng.random((out, features // 16), dtype=np.float32), None, 16, "Q6_K")
    weight = torch.from_numpy(matrix.dequantize()).to(torch.bfloat16)
    tracemalloc.start()
    try:
        qw._check_rows("lm_head.weight", matrix, weight)
        checked = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        parts = qw.pack_parts([(matrix, 8)], [out], features)
        packed = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert checked < 0.05 * out * features * 4, checked  # the float32 matrix would be 16.8 MB
    assert packed < 0.05 * out * features, packed  # its integers: 4.2 MB
    assert np.shares_memory(parts[0].weight.numpy(), matrix.q)
    with pytest.raises(StarqaError, match="does not hold the converted model"):
        qw._check_rows("lm_head.weight", matrix, weight.flip(0))


def _reference_bound(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What a correct kernel may differ from the float64 product by: one bfloat16 rounding of the result (2^-8
    relative, with margin) plus float32 accumulation over the terms."""
    exact = x.double() @ values.T
    return exact, exact.abs() * 2 ** -8 + 1e-5 * (x.double().abs() @ values.abs().T) + 1e-30


def _matrices(out: int, features: int, seed: int = 0) -> dict[str, tuple[qw.QuantizedMatrix, int]]:
    """One weight of each kind the kernels take: int4 g32 (Q4_K-like), int8 g16 narrow (Q6_K-like), int8 g32 with
    zeros (a 4-bit type read as int8), int8 g32 wide (Q8_0-like), int8 per channel (quantized here)."""
    rng = np.random.default_rng(seed)

    def scales(group):
        return (rng.random((out, features // group)) * 0.02 + 0.001).astype(np.float32)

    def zeros(group):
        return (rng.standard_normal((out, features // group)) * 0.05).astype(np.float32)

    return {
        "int4": (qw.QuantizedMatrix(rng.integers(0, 16, (out, features)).astype(np.int16), scales(32), zeros(32),
                                    32, "Q4_K"), 4),
        "int8-g16": (qw.QuantizedMatrix(rng.integers(-32, 32, (out, features)).astype(np.int16), scales(16), None,
                                        16, "Q6_K"), 8),
        "int8-zeros": (qw.QuantizedMatrix(rng.integers(0, 16, (out, features)).astype(np.int16), scales(32),
                                          zeros(32), 32, "Q4_K"), 8),
        "int8-wide": (qw.QuantizedMatrix(rng.integers(-128, 128, (out, features)).astype(np.int16), scales(32), None,
                                         32, "Q8_0"), 8),
        "int8-channel": (qw.quantize_int8_per_channel(rng.standard_normal((out, features)).astype(np.float32),
                                                      "float32"), 8),
    }


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("kind", ["int4", "int8-g16", "int8-zeros", "int8-wide", "int8-channel"])
def test_quantized_linear_equals_a_float64_reference_of_the_same_weights(kind, rows):
    out, features = 97, 640
    choice = _matrices(out, features)[kind]
    parts = qw.pack_parts([choice], [out], features)
    assert parts[0].bits == choice[1] and parts[0].wide == (kind in ("int8-wide", "int8-channel"))
    values = qw.part_values(parts[0])
    assert torch.equal(values, torch.from_numpy(choice[0].dequantize()).double())
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(rows)).bfloat16()
    dummy = torch.zeros(out, features, dtype=torch.bfloat16)
    got = kernels.linear_packed(x, parts, dummy)
    exact, bound = _reference_bound(x, values)
    assert bool(((got.double() - exact).abs() <= bound).all()), float((got.double() - exact).abs().max())
    residual = torch.randn(rows, out).bfloat16()
    with_residual = kernels.linear_packed(x, parts, dummy, residual)
    assert torch.equal(with_residual, (got.float() + residual.float()).bfloat16())  # rounded twice, as torch does


@needs_kernels
def test_dequantized_parts_are_exactly_the_bfloat16_rounding_of_their_values():
    """What a projection held only as its integers multiplies by in a call of many rows: bfloat16(fp32(s * q) + z)
    for every kind, each part into its rows of a fused weight -- the values the GGUF's conversion to bfloat16 holds."""
    out, features = 97, 640
    matrices = _matrices(out, features)
    for kind, choice in matrices.items():
        parts = qw.pack_parts([choice], [out], features)
        expected = torch.from_numpy(choice[0].dequantize()).bfloat16()
        assert torch.equal(kernels.dequantize_packed(parts, features), expected), kind
    fused = qw.pack_parts([matrices["int4"], matrices["int8-g16"], matrices["int8-wide"]], [out] * 3, features)
    assert [p.bits for p in fused] == [4, 8, 8]
    expected = torch.cat([torch.from_numpy(matrices[k][0].dequantize()).bfloat16()
                          for k in ("int4", "int8-g16", "int8-wide")])
    assert torch.equal(kernels.dequantize_packed(fused, features), expected)
    # Weights whose bfloat16 value differs when s * q + z rounds once (an FMA) instead of twice: rare among random
    # ones, so looked for, and one group of 32 given each found (s, z) with its q throughout.
    rng = np.random.default_rng(1)
    s_all = (rng.random(1 << 20) * 0.02 + 0.001).astype(np.float32)
    z_all = (rng.standard_normal(1 << 20) * 0.05).astype(np.float32)
    found = []
    for q in range(16):
        twice = torch.from_numpy(s_all * np.float32(q) + z_all).bfloat16()
        once = torch.from_numpy((s_all.astype(np.float64) * q + z_all).astype(np.float32)).bfloat16()
        found += [(index, q) for index in torch.nonzero(twice != once).flatten()[:8].tolist()]
    assert len(found) >= 32, len(found)
    index, q = (np.array(column) for column in zip(*found[:32]))
    sensitive = qw.QuantizedMatrix(np.repeat(q, 32).reshape(16, 64).astype(np.int16),
                                   s_all[index].reshape(16, 2), z_all[index].reshape(16, 2), 32, "Q4_K")
    for bits in (4, 8):
        parts = qw.pack_parts([(sensitive, bits)], [16], 64)
        assert torch.equal(kernels.dequantize_packed(parts, 64), torch.from_numpy(sensitive.dequantize()).bfloat16())
    with pytest.raises(ValueError, match="no integers"):
        kernels.dequantize_packed([qw.PackedPart(rows=4, bits=16, features=features)], features)
    with pytest.raises(ValueError, match="does not hold"):
        kernels.dequantize_packed(fused, 2 * features)


needs_x8 = pytest.mark.skipif(not kernels.quantized_x8_available(),
                              reason="int8 activations need AVX512-VNNI and a C compiler")


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the *_x8 kernels round it, in float64: per 32 inputs dx = max|x| / 127 and xq = round-half-even(x *
    (127 / max|x|)) clamped to -127..127, both factors in float32 as the kernel computes them."""
    rows, features = x.shape
    groups = x.float().view(rows, features // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(groups * inverse).clamp(-127, 127)
    return (xq.double() * (amax / 127).double()).view(rows, features)


@needs_x8
@pytest.mark.parametrize("features", [640, 576])  # whole 128-input steps, and a last 64-input chunk
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("kind", ["int4", "int8-g16", "int8-zeros", "int8-wide", "int8-channel"])
def test_int8_activations_equal_a_float64_reference_of_the_rounded_activations(kind, rows, features):
    """--activations int8: the product of the same weights with x rounded to int8 per 32 inputs (the zero term with
    the exact x), to float32 accumulation and one bfloat16 rounding; and not the bfloat16-activation product."""
    out = 97
    choice = _matrices(out, features, seed=features)[kind]
    parts = qw.pack_parts([choice], [out], features)
    values = qw.part_values(parts[0])
    zeros = parts[0].zeros
    zero_values = (torch.zeros_like(values) if zeros is None
                   else zeros.double().repeat_interleave(features // zeros.shape[1], dim=1))
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(rows)).bfloat16()
    x[0, 32:64] = 0  # a group of zeros: dx = 0
    dummy = torch.zeros(out, features, dtype=torch.bfloat16)
    got = kernels.linear_packed(x, parts, dummy, activations="int8").double()
    rounded = _int8_activations(x)
    expected = rounded @ (values - zero_values).T + x.double() @ zero_values.T
    bound = expected.abs() * 2 ** -8 + 1e-5 * (rounded.abs() @ values.abs().T + x.double().abs() @ zero_values.abs().T)
    assert bool(((got - expected).abs() <= bound + 1e-30).all()), float((got - expected).abs().max())
    exact = x.double() @ values.T  # the bfloat16-activation product: int8 activations are measurably not it
    assert float((got - exact).abs().mean()) > 1.5 * float((got - expected).abs().mean())
    residual = torch.randn(rows, out).bfloat16()
    with_residual = kernels.linear_packed(x, parts, dummy, residual, activations="int8")
    assert torch.equal(with_residual, (got.bfloat16().float() + residual.float()).bfloat16())


@needs_kernels
def test_the_quantized_wrapper_refuses_inputs_that_would_read_past_a_buffer():
    out, features = 16, 256
    part, = qw.pack_parts([_matrices(out, features)["int4"]], [out], features)
    x = torch.randn(1, features).bfloat16()
    y = torch.empty(1, out, dtype=torch.bfloat16)

    def call(**changes):
        arguments = dict(bits=4, weight=part.weight, scales=part.scales, zeros=part.zeros, group=32, y=y)
        arguments.update(changes)
        kernels.linear_quantized(x, arguments["bits"], arguments["weight"], arguments["scales"], arguments["zeros"],
                                 arguments["group"], arguments["y"])

    call()
    with pytest.raises(ValueError, match="scales"):
        call(scales=part.scales[:8].contiguous())  # fewer rows of scales than of weights
    with pytest.raises(ValueError, match="zeros"):
        call(zeros=part.zeros[:, :4].contiguous())
    with pytest.raises(ValueError, match="need zeros"):
        call(zeros=None)
    with pytest.raises(ValueError, match="does not hold"):
        call(weight=part.weight[:, :64].contiguous())  # narrower than x
    with pytest.raises(ValueError, match="does not take"):
        call(y=torch.empty(1, out // 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bits"):
        call(bits=2)
    with pytest.raises(ValueError, match="whole groups"):
        call(bits=8, weight=torch.zeros(out, features, dtype=torch.int8), group=48)
    with pytest.raises(ValueError, match="bfloat16"):
        call(y=torch.empty(1, out))
    with pytest.raises(ValueError, match="activations"):
        kernels.linear_quantized(x, 4, part.weight, part.scales, part.zeros, 32, y, activations="int4")


@needs_kernels
def test_a_fused_projection_of_mixed_formats_writes_each_part_into_its_columns():
    """q|k|v with q in int4, k in int8 groups of 16 and v left in bfloat16: one output, each part's columns."""
    features = 256
    kinds = _matrices(40, features, seed=3)
    bf16_rows = torch.randn(24, features).bfloat16()
    choices = [kinds["int4"], kinds["int8-g16"], None]
    parts = qw.pack_parts(choices, [40, 40, 24], features)
    assert [p.bits for p in parts] == [4, 8, 16]
    weight = torch.cat([torch.zeros(80, features, dtype=torch.bfloat16), bf16_rows])
    values = torch.cat([qw.part_values(parts[0]), qw.part_values(parts[1]), bf16_rows.double()])
    x = torch.randn(2, features).bfloat16()
    got = kernels.linear_packed(x, parts, weight)
    exact, bound = _reference_bound(x, values)
    assert bool(((got.double() - exact).abs() <= bound).all())


def _float64_logits(engine, values_by_projection, ids, positions_from=0):
    """The model's next-token logits computed in float64 with the given projection weights (the reference)."""
    import copy

    from starqa.engine.star_cache import StarCache
    from starqa.model.transformer import Linear, Transformer

    model = engine.model
    layers = []
    for i, layer in enumerate(model.layers):
        copied = copy.copy(layer)
        for name in ("qkv", "o", "gate_up", "down"):
            linear = getattr(layer, name)
            setattr(copied, name, Linear(values_by_projection[f"layers.{i}.{name}"],
                                         None if linear.bias is None else linear.bias.double()))
        copied.input_norm, copied.post_norm = layer.input_norm.double(), layer.post_norm.double()
        layers.append(copied)
    reference = Transformer(model.args, model.embed.double(), layers, model.norm.double(),
                            values_by_projection["lm_head"])

    cache = StarCache(num_layers=engine.num_layers, batch=1, kv_heads=engine.kv_heads, head_dim=engine.head_dim,
                      capacity=len(ids), dtype=torch.float64, device=torch.device("cpu"))
    with torch.inference_mode():
        ids_tensor = torch.tensor([ids])
        positions = torch.arange(positions_from, positions_from + len(ids))[None]
        return reference.forward(ids_tensor, positions, cache)[0]


@needs_kernels
@pytest.mark.parametrize("mode,activations", [("int8", "bfloat16"), ("int4", "bfloat16"), ("int4", "int8"),
                                              ("int8", "int8")])
def test_decoding_logits_match_a_float64_reference_of_the_same_weights(mode, activations):
    """End to end on a tiny model: the logits of decoding steps with `mode` weights (and `activations`) stay close to
    float64 logits of the same de-quantised weights (int4: far closer to them than to float64 logits of the
    original weights)."""
    from test_engine import _NoTokenizer

    from starqa.engine.star_engine import StarEngine

    if activations == "int8" and not kernels.quantized_x8_available():
        pytest.skip("int8 activations need AVX512-VNNI")
    engine = StarEngine(tiny_model("llama", hidden_size=128, intermediate_size=256).to(torch.bfloat16),
                        _NoTokenizer())
    summary = qw.attach(engine.model, mode, activations=activations)
    assert summary.startswith(mode) and all(linear.packed for _, linear in engine.model.projections())
    assert summary.endswith("; int8 activations") == (activations == "int8")
    assert all(linear.activations == activations for _, linear in engine.model.projections())
    quantized = {key: torch.cat([qw.part_values(p) for p in linear.packed])
                 for key, linear in engine.model.projections()}
    original = {key: linear.weight.double() for key, linear in engine.model.projections()}
    ids = list(range(300, 306))
    # The engine decodes one token at a time after a prefill: prefill in bfloat16 (more than 8 rows) ...
    cache = engine._new_cache(batch=1, capacity=len(ids))
    got = None
    for position, token in enumerate(ids):  # ... here every step is one row: every projection reads `mode` weights
        got = engine._step(cache, torch.tensor([[token]]), torch.tensor([[position]]))[0].double()
    same = _float64_logits(engine, quantized, ids)
    other = _float64_logits(engine, original, ids)
    error, scale = float((got - same).abs().max()), float(same.abs().max())
    # bfloat16 activations round at every layer; int8 activations round each projection's input too (each
    # projection against its own float64 reference: the test above), which this random model amplifies
    assert error <= (0.05 if activations == "bfloat16" else 0.1) * scale, (error, scale)
    assert int(got.argmax()) == int(same.argmax())
    if mode == "int4":  # 4-bit groups move the logits far more than the rounding does: the reference tells them apart
        assert float((same - other).abs().mean()) > 3 * float((got - same).abs().mean())


def test_auto_keeps_an_hf_models_bfloat16_and_explicit_modes_quantize_it():
    from test_engine import _NoTokenizer

    from starqa.engine.star_engine import StarEngine

    engine = StarEngine(tiny_model("llama").to(torch.bfloat16), _NoTokenizer())
    assert qw.attach(engine.model, "auto") == "bfloat16"
    assert all(linear.packed is None for _, linear in engine.model.projections())
    if kernels.quantized_available():
        assert qw.attach(engine.model, "int8").startswith("int8 (bfloat16) 100%")
        assert qw.attach(engine.model, "bfloat16") == "bfloat16"
        assert all(linear.packed is None for _, linear in engine.model.projections())
    with pytest.raises(Exception, match="--weights must be one of"):
        qw.attach(engine.model, "int3")
    with pytest.raises(Exception, match="--activations must be one of"):
        qw.attach(engine.model, "int8", activations="int4")
    # int8 activations round x for 4/8-bit weights only: over bfloat16 weights decoding stays as it is
    assert qw.attach(engine.model, "auto", activations="int8") == "bfloat16"
    assert all(linear.activations == "bfloat16" for _, linear in engine.model.projections())


def test_explicit_quantized_weights_are_refused_where_the_kernels_cannot_run():
    from test_engine import _NoTokenizer

    from starqa.engine.star_engine import StarEngine
    from starqa.errors import UsageError

    engine = StarEngine(tiny_model("llama"), _NoTokenizer())  # float32 compute
    assert qw.attach(engine.model, "auto") == "bfloat16"
    with pytest.raises(UsageError, match="bfloat16 compute dtype"):
        qw.attach(engine.model, "int4")


@needs_kernels
@pytest.mark.slow
def test_auto_keeps_one_copy_of_the_weights_and_prefills_exactly_as_with_the_bfloat16_copy(shared_home):
    """--weights auto drops the bfloat16 projections beside their GGUF integers (the 1.5B held both: 4.7 GiB per
    ask). A prefill de-quantises them to exactly those bfloat16 weights: its KV is bit for bit the bfloat16 engine's;
    attaching bfloat16 again gives back the very weights the bfloat16 engine holds."""
    from starqa.engine.star_engine import StarEngine
    from starqa.model.transformer import Transformer

    def load(mode: str) -> StarEngine:
        return StarEngine.load("smollm2-135m", device="cpu", dtype="bfloat16", store_root=shared_home, weights=mode)

    engines = {mode: load(mode) for mode in ("bfloat16", "auto")}  # (auto packs its weights now if not yet)
    reading = Transformer.from_directory
    loaded_without = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Transformer, "from_directory",
                      lambda *a, **k: loaded_without.append(k.get("without")) or reading(*a, **k))
        engines["auto"] = load("auto")  # with its packed weights cached: their bfloat16 weights are never read
    lean, full = engines["auto"].model, engines["bfloat16"].model
    assert loaded_without == [frozenset(key for key, _ in lean.projections() if key != "lm_head")]
    assert lean.lm_head.weight is lean.embed  # tied: the embedding lookups still read it
    assert all(linear.weight is None for key, linear in lean.projections() if key != "lm_head")

    def weight_bytes(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    assert weight_bytes(lean) < 0.6 * weight_bytes(full)

    def prefill_kv(engine, count: int) -> torch.Tensor:
        """Every layer's keys and values of `count` tokens (the next-token logits would be one row: a GEMV)."""
        cache = engine._new_cache(batch=1, capacity=count)
        engine.model.forward(torch.arange(400, 400 + count)[None], torch.arange(count)[None], cache, logits=False)
        return torch.stack([torch.stack([k, v]) for k, v in zip(cache.keys, cache.values)]).float()

    for count in (9, 41):  # more rows than a GEMV: de-quantised, into one buffer reused by every projection
        assert torch.equal(prefill_kv(engines["auto"], count), prefill_kv(engines["bfloat16"], count)), count
    few = prefill_kv(engines["auto"], 5)  # a GEMV over the integers: close, not equal
    reference = prefill_kv(engines["bfloat16"], 5)
    assert not torch.equal(few, reference)
    assert float((few - reference).abs().max()) < 0.05 * float(reference.abs().max())

    qw.attach(lean, "bfloat16")
    for (key, restored), (_, kept) in zip(lean.projections(), full.projections()):
        assert restored.packed is None and torch.equal(restored.weight, kept.weight), key

    from starqa.engine.star_engine import _attach_weights

    model_dir = engines["auto"].model_dir
    stripped = Transformer.from_directory(model_dir, dtype=torch.bfloat16, device=torch.device("cpu"),
                                          without=frozenset({"layers.0.o"}))
    with pytest.raises(StarqaError, match="loaded without"):
        qw.attach(stripped, "bfloat16")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qw, "read_packed", lambda *a, **k: None)  # gone between the check and the attach
        with pytest.raises(StarqaError, match="went away"):
            _attach_weights(stripped, "auto", model_dir, shared_home, None)


@needs_kernels
@pytest.mark.slow
def test_the_bundled_model_packs_its_gguf_integers_once_and_answers_planted_facts(shared_home, bundled_engine,
                                                                                  monkeypatch):
    """smollm2-135m in bfloat16 with --weights auto: its Q4_1 projections decode in int4 and its Q8_0 embedding (the
    tied LM head) in int8, from a cache written once (0600, outside the weights the fingerprint covers); greedy
    answers to planted facts hold the fact with every --weights."""
    from starqa.engine.star_engine import StarEngine

    engines = {mode: StarEngine.load("smollm2-135m", device="cpu", dtype="bfloat16", store_root=shared_home,
                                     weights=mode) for mode in ("bfloat16", "auto", "int8", "int4")}
    assert engines["auto"].weights == "int4 (Q4_1) 71%, int8 (Q8_0) 29%"
    assert engines["bfloat16"].weights == "bfloat16"
    cache = engines["auto"].model_dir / qw.CACHE_FOLDER / "auto.safetensors"
    assert cache.is_file() and (cache.stat().st_mode & 0o777) == 0o600
    from starqa.model.resolve import model_fingerprint

    with_cache = model_fingerprint(engines["auto"].model_dir)
    aside = cache.parent.with_name("decode-weights-aside")
    cache.parent.rename(aside)
    try:
        assert model_fingerprint(engines["auto"].model_dir) == with_cache  # the cache is not "the model"
    finally:
        aside.rename(cache.parent)
    packed = engines["auto"].model.layers[0].qkv.packed
    assert [p.bits for p in packed] == [4] and packed[0].sources == ["Q4_1"]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the packed weights were built again")

    monkeypatch.setattr(qw, "build_packed", no_rebuild)
    again = StarEngine.load("smollm2-135m", device="cpu", dtype="bfloat16", store_root=shared_home, weights="auto")
    assert torch.equal(again.model.layers[0].qkv.packed[0].weight, packed[0].weight)

    for number, context, query in planted_number_prompts(bundled_engine.hf_tokenizer):
        for mode, engine in engines.items():
            ctx = engine.encode_context(context, 128, 128)
            answer = engine.tokenizer.decode(engine.generate(ctx, query, max_new_tokens=24))
            assert str(number) in answer, (mode, answer)


def _starqa(home, *args):
    env = dict(os.environ, STARQA_HOME=str(home), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "starqa", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@needs_kernels
@pytest.mark.slow
def test_one_stored_document_is_answered_with_each_weights(shared_home, bundled_engine, tmp_path):
    document = tmp_path / "memo.txt"
    document.write_text("Internal memo. The vault access code is 7310. Lunch is served at noon in the east hall. "
                        * 3, encoding="utf-8")
    ingested = _starqa(shared_home, "ingest", str(document), "--name", "memo-weights", "--model", "smollm2-135m",
                       "--force", "--quiet")
    assert ingested.returncode == 0, ingested.stderr
    answers = {}
    for mode in ("bfloat16", "int8", "int4", "auto"):
        result = _starqa(shared_home, "ask", "--doc", "memo-weights", "What is the vault access code?", "--model",
                         "smollm2-135m", "--weights", mode, "--json", "--no-server", "--max-new-tokens", "16")
        assert result.returncode == 0, (mode, result.stderr)
        answers[mode] = json.loads(result.stdout.splitlines()[-1])["answer"]
        assert "7310" in answers[mode], (mode, answers[mode])
    if kernels.quantized_x8_available():
        result = _starqa(shared_home, "ask", "--doc", "memo-weights", "What is the vault access code?", "--model",
                         "smollm2-135m", "--weights", "auto", "--activations", "int8", "--json", "--no-server",
                         "--max-new-tokens", "16")
        assert result.returncode == 0, result.stderr
        assert "7310" in json.loads(result.stdout.splitlines()[-1])["answer"]
    for flag, value in (("--weights", "int3"), ("--activations", "int4")):
        bad = _starqa(shared_home, "ask", "--doc", "memo-weights", "Code?", flag, value, "--no-server")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert flag.strip("-") in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
