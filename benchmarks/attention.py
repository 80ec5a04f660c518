"""Benchmark of starqa.attention against plain attentions, on Phase-1, Phase-2 and decode shapes.

    python benchmarks/attention.py                  # CPU: torch path vs HF-style eager vs SDPA
    python benchmarks/attention.py --quick          # CPU, smaller shapes (well under a minute)
    python benchmarks/attention.py --device cuda    # GPU: Triton kernels vs torch SDPA
    python benchmarks/attention.py --device cuda --json figures.json   # and every row as JSON

Columns: milliseconds per call (best of several), TFLOP/s for attention-shaped work
(4 * visible q.k pairs * head_dim) and GB/s of K/V read for decode shapes (one query).
SDPA returns no log-sum-exp, so it does less than attention_with_lse; it is the speed to beat.
On CUDA, SDPA may use only its fused kernels (flash, memory-efficient, cuDNN): its math fallback would materialise
the float32 scores (about 140 GiB for the cached-anchor shape). Queries after a cached prefix use SDPA's lower-right
causal bias rather than a boolean mask, which flash attention refuses. A row that fails (refused, out of memory)
is printed and recorded as failed, and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from starqa.attention import attention_with_lse, triton_available  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    causal: bool
    q_offset: int = 0

    def visible_pairs(self) -> int:
        """Number of (query, key) pairs that attend (per batch element and head)."""
        if not self.causal:
            return self.q_len * self.k_len
        return sum(max(0, min(self.k_len, i + self.q_offset + 1)) for i in range(self.q_len))

    def flops(self) -> float:
        return 4.0 * self.batch * self.q_heads * self.visible_pairs() * self.head_dim

    def kv_bytes(self, dtype: torch.dtype) -> float:
        elt = torch.finfo(dtype).bits // 8
        return 2.0 * self.batch * self.kv_heads * self.k_len * self.head_dim * elt


def cpu_shapes(quick: bool) -> list[Shape]:
    """SmolLM2-135M geometry: 9 query heads, 3 KV heads, head_dim 64."""
    h, hk, d = 9, 3, 64
    shapes = [
        Shape("phase1 block 1024", 1, h, hk, 1024, 1024, d, True),
        Shape("phase1 [anchor,block] 2x1024", 1, h, hk, 2048, 2048, d, True),
        Shape("phase1 4 x [anchor,block] 2x1024", 4, h, hk, 2048, 2048, d, True),
        Shape("phase1 block over cached anchor", 4, h, hk, 1024, 2048, d, True, 1024),
        Shape("phase2 prefill 30 vs 8K context", 1, h, hk, 30, 8192, d, False),
        Shape("phase2 prefill 30 over 8K cache", 1, h, hk, 30, 8192, d, True, 8192 - 30),
        Shape("decode 1 over 2K", 1, h, hk, 1, 2048, d, True, 2047),
        Shape("decode 1 over 8K", 1, h, hk, 1, 8192, d, True, 8191),
        Shape("decode 1 over 8K, batch 4", 4, h, hk, 1, 8192, d, True, 8191),
    ]
    if quick:
        shapes = [s for s in shapes if s.batch * s.q_len * s.k_len <= 2048 * 2048]
    return shapes


def cuda_shapes(quick: bool) -> list[Shape]:
    """Llama-3-8B geometry: 32 query heads, 8 KV heads, head_dim 128."""
    h, hk, d = 32, 8, 128
    blk = 4096 if quick else 8192
    shapes = [
        Shape(f"phase1 4 x [anchor,block] 2x{blk}", 4, h, hk, 2 * blk, 2 * blk, d, True),
        Shape(f"phase1 4 blocks over cached anchor {blk}", 4, h, hk, blk, 2 * blk, d, True, blk),
        Shape("phase2 prefill 64 over 32K", 1, h, hk, 64, 32768, d, True, 32768 - 64),
    ]
    for n in ([32768] if quick else [32768, 65536, 131072]):
        shapes.append(Shape(f"decode 1 over {n // 1024}K", 1, h, hk, 1, n, d, True, n - 1))
    return shapes


def make_inputs(s: Shape, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(s.batch, s.q_heads, s.q_len, s.head_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(s.batch, s.kv_heads, s.k_len, s.head_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(s.batch, s.kv_heads, s.k_len, s.head_dim, generator=gen, device=device, dtype=dtype)
    return q, k, v


def causal_mask(s: Shape, device: str) -> torch.Tensor | None:
    """Boolean [q_len, k_len] mask, True = attend (SDPA's convention); None if nothing is hidden."""
    if not s.causal or s.q_offset >= s.k_len - 1:
        return None
    i = torch.arange(s.q_len, device=device).unsqueeze(1)
    j = torch.arange(s.k_len, device=device).unsqueeze(0)
    return j <= i + s.q_offset


def eager_attention(q, k, v, s: Shape, mask):
    """What HF's eager attention does: repeat_kv, explicit scores, additive mask, fp32 softmax."""
    group = s.q_heads // s.kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * s.head_dim**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def sdpa_mask(s: Shape, device: str):
    """SDPA's mask for the shape: None, "causal" (square), a lower-right causal bias (queries after a cached prefix:
    q_offset = k_len - q_len), or a boolean mask for any other offset."""
    if not s.causal or s.q_offset >= s.k_len - 1:
        return None
    if s.q_offset == 0 and s.q_len == s.k_len:
        return "causal"
    if s.q_offset == s.k_len - s.q_len:
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(s.q_len, s.k_len)
    return causal_mask(s, device)


def fused_sdpa_only(device: str):
    """On CUDA, SDPA without its math fallback (which would build the whole score matrix): refused shapes raise."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def sdpa(q, k, v, s: Shape, mask):
    mask = sdpa_mask(s, str(q.device))
    with fused_sdpa_only(str(q.device)):
        if isinstance(mask, str):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def timeit(fn: Callable[[], object], device: str, reps: int) -> float:
    """Best wall time of `reps` calls, in milliseconds (after one warm-up call)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def run(device: str, quick: bool, dtype: torch.dtype) -> list[dict]:
    """Print the table; return its rows (a failed row has "error" instead of timings)."""
    on_cuda = device.startswith("cuda")
    shapes = cuda_shapes(quick) if on_cuda else cpu_shapes(quick)
    reps = 3 if quick else 10
    candidates: dict[str, Callable] = {}
    if on_cuda:
        if triton_available():
            candidates["triton"] = lambda q, k, v, s, m: attention_with_lse(
                q, k, v, causal=s.causal, q_offset=s.q_offset, backend="triton"
            )
        candidates["sdpa (no lse)"] = sdpa
        # the chunked torch loop (fallback without triton): only on the few-query shapes
        candidates["torch path"] = lambda q, k, v, s, m: attention_with_lse(
            q, k, v, causal=s.causal, q_offset=s.q_offset, backend="torch"
        )
    else:
        candidates["torch path"] = lambda q, k, v, s, m: attention_with_lse(
            q, k, v, causal=s.causal, q_offset=s.q_offset, backend="torch"
        )
        candidates["sdpa (no lse)"] = sdpa
        candidates["eager (HF)"] = eager_attention

    print(f"device={device} dtype={str(dtype).removeprefix('torch.')} threads={torch.get_num_threads()}")
    header = (
        f"{'shape':38s} {'b':>2s} {'h/kv':>5s} {'q_len':>6s} {'k_len':>7s} {'impl':>14s} "
        f"{'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for s in shapes:
        q, k, v = make_inputs(s, dtype, device)
        mask = causal_mask(s, device)
        for name, impl in candidates.items():
            if name.startswith("eager") and s.batch * s.q_heads * s.q_len * s.k_len > 2**28:
                continue  # would need a multi-GiB score matrix
            if on_cuda and name == "torch path" and s.q_len > 64:
                continue
            row = {"shape": s.name, "batch": s.batch, "q_heads": s.q_heads, "kv_heads": s.kv_heads, "q_len": s.q_len,
                   "k_len": s.k_len, "head_dim": s.head_dim, "impl": name}
            prefix = f"{s.name:38s} {s.batch:2d} {s.q_heads:2d}/{s.kv_heads:<2d} {s.q_len:6d} {s.k_len:7d} {name:>14s}"
            try:
                ms = timeit(lambda: impl(q, k, v, s, mask), device, reps)
            except (RuntimeError, ValueError) as error:  # refused by the backend, or out of memory: go on
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
                print(f"{prefix} failed: {row['error']}")
                if on_cuda:
                    torch.cuda.empty_cache()
                rows.append(row)
                continue
            tflops = s.flops() / (ms * 1e-3) / 1e12
            gbs = s.kv_bytes(dtype) / (ms * 1e-3) / 1e9  # K/V bytes read: decode's bound
            gb_txt = f"{gbs:7.1f}" if s.q_len == 1 else f"{'':>7s}"
            print(f"{prefix} {ms:9.3f} {tflops:8.3f} {gb_txt}", flush=True)
            rows.append({**row, "ms": round(ms, 4), "tflops": round(tflops, 3),
                         **({"kv_gb_per_s": round(gbs, 1)} if s.q_len == 1 else {})})
        del q, k, v, mask
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--json", metavar="PATH", help="also write the rows, with the versions and device, to PATH")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    rows = run(args.device, args.quick, getattr(torch, dtype_name))
    if args.json:
        on_cuda = args.device.startswith("cuda")
        report = {"device": args.device, "device_name": torch.cuda.get_device_name(args.device) if on_cuda else "cpu",
                  "dtype": dtype_name, "quick": args.quick, "torch": torch.__version__,
                  "triton": _version("triton"), "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if any("error" in row for row in rows):
        print(f"{sum('error' in row for row in rows)} row(s) failed (see above)", file=sys.stderr)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
