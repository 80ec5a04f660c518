"""CPU decoding kernels (cpu_decode.c): a bfloat16 GEMV and attention of a few query rows over the stored KV.

Decoding reads every weight and every stored KV byte once per token; torch's CPU kernels read bfloat16 matrices
at a fraction of the memory bandwidth when only a few rows multiply them, and attention of a few rows over many
keys is no better. These C functions stream each byte once (see benchmarks/decode.py for the figures); three small
ones do a layer's per-token steps (RMS norm, rotary embedding, SiLU gate) in one call each, since at one token a
decoding step's dozens of tiny torch ops per layer cost more in dispatch than their arithmetic.

The C file is compiled once per machine on first use with the machine's C compiler (`cc -O3 -march=native
-fopenmp`, about a second) into a cache folder, keyed by the source, the compiler (its file, not run) and the CPU,
and loaded with ctypes after torch, so that its OpenMP threads are torch's own. Loading a library runs its code:
the folder and the file must belong to this user and be writable by no one else, or the kernels are built afresh
in a private temporary folder (with a warning); a library lacking a function is not used. The wrappers check
their tensors' shapes and dtypes, so a wrong call raises instead of reading past a buffer. Where it cannot be built (no compiler, no AVX-512,
not Linux/x86-64) or STARQA_KERNELS=off, `unavailable_reason()` says why and the callers use plain torch instead:
same results within float32 rounding, slower decoding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

from starqa import report

__all__ = ["available", "unavailable_reason", "linear_bf16", "rms_norm_bf16", "rope_bf16_", "silu_mul_bf16",
           "decode_attention", "read_bandwidth", "quantized_available", "quantized_x8_available", "linear_quantized",
           "ACTIVATIONS",
           "linear_packed", "dequantize_packed", "KV_FORMATS",
           "MAX_ROWS", "MAX_CHUNK", "cache_folder"]

_SOURCE = Path(__file__).with_name("cpu_decode.c")
_SOURCES = [_SOURCE, Path(__file__).with_name("cpu_quant.c")]  # compiled into one library
_HEADERS = [Path(__file__).with_name("bf16.h")]  # included by both: part of what a build depends on
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_OFF_ENV = "STARQA_KERNELS"  # "off": use plain torch everywhere (comparisons, or a machine where the build misbehaves)
_CACHE_ENV = "STARQA_KERNEL_CACHE"
# Kernel formats of the stored KV (cpu_decode.c's enum).
KV_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}
MAX_ROWS = 64  # query rows per KV head in one decode_attention call
MAX_CHUNK = 256  # keys per chunk
_P = ctypes.c_void_p


def cache_folder() -> Path:
    """Where compiled kernels are kept: $STARQA_KERNEL_CACHE (a relative path is taken from the current folder and
    made absolute), else $XDG_CACHE_HOME/starqa-kernels, else ~/.cache/starqa-kernels (not the document store: one
    build serves every store on the machine). Only used when it is ours (see `_trusted`)."""
    if os.environ.get(_CACHE_ENV):
        return Path(os.path.abspath(Path(os.environ[_CACHE_ENV]).expanduser()))
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return Path(os.path.abspath(base / "starqa-kernels"))


def _cpu_identity() -> str:
    """-march=native builds for this CPU: a cache shared by several machines (a network home) must not mix them."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            lines = [line for line in info if line.startswith(("flags", "model name"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _compiler_identity(compiler: str) -> str:
    """The compiler as the cache key sees it, without running it: its resolved path, size and modification time
    (an upgraded compiler is another file, so another key): no process is started on every run."""
    real = os.path.realpath(compiler)
    info = os.stat(real)
    return f"{real}:{info.st_size}:{info.st_mtime_ns}"


def _cache_key(compiler: str) -> str:
    """What the library built here depends on: the source, the compiler, the flags and the CPU."""
    sources = b"".join(path.read_bytes() for path in [*_SOURCES, *_HEADERS])
    return hashlib.sha256(sources + _compiler_identity(compiler).encode() + " ".join(_FLAGS).encode()
                          + _cpu_identity().encode()).hexdigest()[:16]


# Every function the Python side calls: a library lacking one (a damaged or foreign file) is not used.
_SYMBOLS = ("starqa_kernels_available", "linear_bf16", "rms_norm_bf16", "rope_bf16", "silu_mul_bf16", "stream_read",
            "decode_attention", "starqa_quant_available", "linear_q4", "linear_q8", "starqa_quant_x8_available",
            "linear_q4_x8", "linear_q8_x8", "dequantize_q")
_STALE_BUILD_S = 600  # a `.tmp-*.so` older than this is left by a killed build (a build takes seconds)


def _trusted(info: os.stat_result) -> bool:
    """Owned by this user and writable by no one else: nobody else can have put code there."""
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _usable_folder(folder: Path) -> str | None:
    """Why `folder` cannot hold kernels this process loads (None: it can; it is created, 0700, when missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = os.stat(folder)
    except OSError as exc:
        return f"cannot create it ({exc.strerror or exc})"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    if info.st_uid != os.geteuid():
        return f"it belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"others can write to it (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _untrusted_file(target: Path) -> str | None:
    """Why the cached library `target` is not to be loaded (None: it is absent, or a file of ours)."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return f"{target.name} is not a regular file"
    if info.st_uid != os.geteuid():
        return f"{target.name} belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"others can write to {target.name} (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _remove_stale_builds(folder: Path) -> None:
    now = time.time()
    for leftover in folder.glob(".tmp-*.so"):
        try:
            if now - leftover.lstat().st_mtime > _STALE_BUILD_S:
                leftover.unlink()
        except OSError:
            pass


def _build(compiler: str, folder: Path, key: str) -> Path | str:
    """Compile cpu_decode.c into `folder` (atomically, as cpu_decode-<key>.so); the path, or why it failed."""
    target = folder / f"cpu_decode-{key}.so"
    staging = folder / f".tmp-{key}-{uuid.uuid4().hex[:8]}.so"
    result = subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", str(staging), "-lm"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        staging.unlink(missing_ok=True)
        first = (result.stderr.strip().splitlines() or ["(no message)"])[0]
        return f"the C compiler failed: {first[:200]}"
    os.chmod(staging, 0o700)
    os.replace(staging, target)  # atomic: a concurrent build of the same key writes the same file
    return target


def _open_trusted(target: Path) -> ctypes.CDLL | str:
    """Load `target` only if it is a regular file of ours that no one else can write (checked on the open file,
    and the file loaded checked to be that one: in a folder only we can write, nobody can swap it meanwhile)."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {target} ({exc.strerror or exc})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not _trusted(info):
            return f"{target} is not a file of this user that only it can write"
        # (Not dlopen("/proc/self/fd/N"): the loader takes a name it has loaded before for the same library.)
        library = ctypes.CDLL(str(target))
        loaded = os.stat(target)
        if (loaded.st_dev, loaded.st_ino) != (info.st_dev, info.st_ino):
            return f"{target} changed while it was loaded"
    except OSError as exc:
        return f"cannot load {target.name}: {exc}"[:240]
    finally:
        os.close(fd)
    return library


def _missing_symbols(library: ctypes.CDLL, target: Path) -> str | None:
    missing = [name for name in _SYMBOLS if not hasattr(library, name)]
    return f"{target} lacks {', '.join(missing)} (remove it to rebuild)" if missing else None


_state: dict[str, str] = {"reason": ""}


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(_OFF_ENV, "").lower() in ("0", "off", "no", "false"):
        _state["reason"] = f"turned off by {_OFF_ENV}"
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        _state["reason"] = f"built for Linux on x86-64 only, not {platform.system()} on {platform.machine()}"
        return None
    compiler = _compiler()
    if compiler is None:
        _state["reason"] = "no C compiler found (install gcc, or set CC)"
        return None
    private = None
    try:
        key = _cache_key(compiler)
        folder = cache_folder()
        target = folder / f"cpu_decode-{key}.so"
        problem = _usable_folder(folder) or _untrusted_file(target)
        if problem is not None:  # another user could have put a library there: build one of our own instead
            private = Path(tempfile.mkdtemp(prefix="starqa-kernels-"))
            report.warn(f"not using the kernel cache {folder}: {problem}; building the decode kernels in a private "
                        f"folder for this run (set {_CACHE_ENV} to a folder of your own)")
            folder, target = private, private / target.name
        _remove_stale_builds(folder)
        if not target.is_file():
            built = _build(compiler, folder, key)
            if isinstance(built, str):
                _state["reason"] = built
                return None
        library = _open_trusted(target)
        if isinstance(library, str):
            _state["reason"] = library
            return None
        if not hasattr(library, "starqa_kernels_available"):
            _state["reason"] = _missing_symbols(library, target)
            return None
    except (OSError, subprocess.SubprocessError) as exc:
        _state["reason"] = f"cannot build or load the kernels: {exc.__class__.__name__}: {exc}"[:240]
        return None
    finally:
        if private is not None:  # loaded (or not): the mapped library needs no file
            shutil.rmtree(private, ignore_errors=True)
    if not library.starqa_kernels_available():
        _state["reason"] = "this CPU has no AVX-512"
        return None
    missing = _missing_symbols(library, target)
    if missing:
        _state["reason"] = missing
        return None
    library.linear_bf16.restype = ctypes.c_int
    library.linear_bf16.argtypes = [_P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P]
    library.rms_norm_bf16.restype = ctypes.c_int
    library.rms_norm_bf16.argtypes = [_P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_float]
    library.rope_bf16.restype = ctypes.c_int
    library.rope_bf16.argtypes = [_P, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P]
    library.silu_mul_bf16.restype = ctypes.c_int
    library.silu_mul_bf16.argtypes = [_P, _P, ctypes.c_int, ctypes.c_int]
    library.stream_read.restype = ctypes.c_float
    library.stream_read.argtypes = [_P, ctypes.c_long]
    library.decode_attention.restype = ctypes.c_int
    library.decode_attention.argtypes = [_P, _P, ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, ctypes.c_float,
                                         ctypes.c_int, _P, _P, _P]
    library.starqa_quant_available.restype = ctypes.c_int
    library.linear_q4.restype = ctypes.c_int
    library.linear_q4.argtypes = [_P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long, _P,
                                  ctypes.c_long]
    library.linear_q8.restype = ctypes.c_int
    library.linear_q8.argtypes = [_P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_long, _P, ctypes.c_long]
    library.dequantize_q.restype = ctypes.c_int
    library.dequantize_q.argtypes = [ctypes.c_int, _P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P]
    library.starqa_quant_x8_available.restype = ctypes.c_int
    library.linear_q4_x8.restype = ctypes.c_int
    library.linear_q4_x8.argtypes = library.linear_q4.argtypes
    library.linear_q8_x8.restype = ctypes.c_int
    library.linear_q8_x8.argtypes = [_P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_long, _P, ctypes.c_long]
    return library


def available() -> bool:
    return _library() is not None


def unavailable_reason() -> str:
    """Why the kernels are not used here ("" when they are)."""
    _library()
    return _state["reason"]


def _pointer(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.data_ptr()


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] @ weight[out, in].T for bfloat16 CPU tensors, float32 accumulation, rounded to bfloat16 once;
    with `residual` [rows, out] (bf16), residual + that, rounded again (as torch's `residual + linear(x)`).

    Callers check `available()` and keep rows small (a GEMV; torch's AMX kernels win from about 8 rows)."""
    rows, features = x.shape
    out = weight.shape[0]
    if features % 32 or not weight.is_contiguous():
        raise ValueError(f"linear_bf16 needs a contiguous weight and in-features divisible by 32, got {tuple(weight.shape)}")
    _check_bf16("linear_bf16", x, weight)
    if weight.dim() != 2 or weight.shape[1] != features:
        raise ValueError(f"linear_bf16: weight {tuple(weight.shape)} does not take x {tuple(x.shape)}")
    x = x.contiguous()
    if residual is not None:
        residual = residual.contiguous()
        if residual.shape != (rows, out) or residual.dtype != torch.bfloat16:
            raise ValueError(f"linear_bf16: residual {tuple(residual.shape)} {residual.dtype}, needs ({rows}, {out}) bf16")
    y = torch.empty((rows, out), dtype=torch.bfloat16)
    code = _library().linear_bf16(weight.data_ptr(), x.data_ptr(), y.data_ptr(), out, features, rows,
                                  _pointer(residual))
    if code != 0:
        raise RuntimeError(f"linear_bf16 failed ({code}) for x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return y


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of bfloat16 rows x [..., dim] (normalised in float32, rounded, times the bf16 weight)."""
    x = x.contiguous()
    dim = x.shape[-1]
    _check_bf16("rms_norm_bf16", x, weight)
    if weight.shape != (dim,) or not weight.is_contiguous():
        raise ValueError(f"rms_norm_bf16: weight {tuple(weight.shape)} for rows of {dim}")
    y = torch.empty_like(x)
    code = _library().rms_norm_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps)
    if code != 0:
        raise RuntimeError(f"rms_norm_bf16 failed ({code}) for x {tuple(x.shape)}")
    return y


def rope_bf16_(qkv: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotary embedding in place on the first `heads` heads of each row of a contiguous bf16 qkv [rows, features];
    cos, sin: bf16 [rows, rotary_dim] (each row's position)."""
    rows = qkv.shape[0]
    cos, sin = cos.contiguous(), sin.contiguous()
    _check_bf16("rope_bf16_", qkv, cos, sin)
    if (qkv.dim() != 2 or not qkv.is_contiguous() or cos.dim() != 2 or cos.shape[0] != rows
            or sin.shape != cos.shape or cos.shape[1] > head_dim or qkv.shape[1] < heads * head_dim):
        raise ValueError(f"rope_bf16_: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, "
                         f"{heads} heads of {head_dim}")
    code = _library().rope_bf16(qkv.data_ptr(), qkv.shape[1], rows, heads, head_dim, cos.shape[1], cos.data_ptr(),
                                sin.data_ptr())
    if code != 0:
        raise RuntimeError(f"rope_bf16 failed ({code}) for head_dim {head_dim}, rotary {cos.shape[1]}")


def silu_mul_bf16(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for bf16 rows [..., 2 * inter] holding [gate | up]; returns [..., inter]."""
    gate_up = gate_up.contiguous()
    _check_bf16("silu_mul_bf16", gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul_bf16: rows of {gate_up.shape[-1]} do not hold [gate | up]")
    inter = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=torch.bfloat16)
    code = _library().silu_mul_bf16(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter), inter)
    if code != 0:
        raise RuntimeError(f"silu_mul_bf16 failed ({code})")
    return out


def _check_bf16(name: str, *tensors: torch.Tensor) -> None:
    for tensor in tensors:
        if tensor.dtype != torch.bfloat16 or tensor.device.type != "cpu":
            raise ValueError(f"{name} takes bfloat16 CPU tensors, not {tensor.dtype} on {tensor.device}")


def _check_attention_inputs(q, keys, values, chunk_starts, key_scales, value_scales) -> None:
    """decode_attention's tensors agree with each other (the C code trusts every size it is given)."""
    hk, _, dim = q.shape
    n = keys.shape[1]
    if q.dtype not in (torch.float32, torch.bfloat16) or keys.dtype not in KV_FORMATS:
        raise ValueError(f"decode_attention: q {q.dtype}, keys {keys.dtype}")
    if keys.shape != (hk, n, dim) or values.shape != keys.shape or values.dtype != keys.dtype:
        raise ValueError(f"decode_attention: keys {tuple(keys.shape)} {keys.dtype} and values {tuple(values.shape)} "
                         f"{values.dtype} for q {tuple(q.shape)}")
    if chunk_starts.dtype != torch.int32 or chunk_starts.dim() != 1 or not chunk_starts.is_contiguous():
        raise ValueError(f"decode_attention: chunk_starts must be contiguous int32 [chunks + 1], not "
                         f"{chunk_starts.dtype} {tuple(chunk_starts.shape)}")
    chunks = chunk_starts.numel() - 1
    if keys.dtype == torch.int8:
        if key_scales is None or value_scales is None:
            raise ValueError("decode_attention: int8 keys and values need key_scales and value_scales")
        for name, scales, shape in (("key_scales", key_scales, (hk, chunks, dim)), ("value_scales", value_scales,
                                                                                    (hk, n))):
            if scales.shape != shape or scales.dtype != torch.float32 or not scales.is_contiguous():
                raise ValueError(f"decode_attention: {name} {tuple(scales.shape)} {scales.dtype}, needs contiguous "
                                 f"float32 {shape}")


class _Segment(ctypes.Structure):
    """cpu_decode.c's Segment: one set of keys the query rows attend to."""

    _fields_ = [("fmt", ctypes.c_int), ("K", _P), ("V", _P), ("kscale", _P), ("vscale", _P),
                ("head_stride", ctypes.c_long), ("chunk_start", _P), ("n_chunks", ctypes.c_int), ("n", ctypes.c_int),
                ("scores", _P)]


_work = threading.local()  # one reusable float32 scratch buffer per thread (decode steps would allocate it per layer)


def _scratch(elements: int) -> torch.Tensor:
    buffer = getattr(_work, "buffer", None)
    if buffer is None or buffer.numel() < elements:
        buffer = torch.empty(max(elements, 1 << 16), dtype=torch.float32)
        _work.buffer = buffer
    return buffer


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk_starts: torch.Tensor, *,
                     key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None,
                     scale: float = 1.0, want_scores: bool = False, local_keys: torch.Tensor | None = None,
                     local_values: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention of R query rows per KV head over every stored key (no mask), and optionally over a decode buffer.

    q: float32 or bfloat16 [hk, R, d], multiplied by `scale` in the kernel. keys, values: [hk, n, d] (any head
    stride, token stride d) in float32, bfloat16, float16 or int8; int8 takes key_scales float32 [hk, chunks, d]
    (per channel, one row per chunk) and value_scales float32 [hk, n] (per token). chunk_starts: int32
    [chunks + 1], ascending offsets, at most MAX_CHUNK keys each (the int8 groups). local_keys/local_values:
    [hk, m, d] keys every row also sees (the decode buffer of a single sequence), merged in exactly. Returns out
    float32 [hk, R, d], lse float32 [hk, R] and, with want_scores, the prefix scores float32 [hk, R, n].
    """
    hk, rows, dim = q.shape
    if rows > MAX_ROWS:  # each row is independent: split the batch
        parts = [decode_attention(q[:, start:start + MAX_ROWS], keys, values, chunk_starts, key_scales=key_scales,
                                  value_scales=value_scales, scale=scale, want_scores=want_scores,
                                  local_keys=local_keys, local_values=local_values)
                 for start in range(0, rows, MAX_ROWS)]
        scores = torch.cat([p[2] for p in parts], dim=1) if want_scores else None
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1), scores
    n = keys.shape[1]
    if keys.stride(2) != 1 or keys.stride(1) != dim or values.stride() != keys.stride():
        raise ValueError("decode_attention needs keys and values laid out [hk, n, d] with token stride d")
    quantized = keys.dtype == torch.int8
    _check_attention_inputs(q, keys, values, chunk_starts, key_scales if quantized else None,
                            value_scales if quantized else None)
    scores = torch.empty((hk, rows, n), dtype=torch.float32) if want_scores else None
    prefix = _Segment(KV_FORMATS[keys.dtype], keys.data_ptr(), values.data_ptr(),
                      _pointer(key_scales) if quantized else None, _pointer(value_scales) if quantized else None,
                      keys.stride(0), chunk_starts.data_ptr(), chunk_starts.numel() - 1, n, _pointer(scores))
    chunks = prefix.n_chunks
    local = None
    if local_keys is not None and local_keys.shape[1] > 0:
        if local_keys.stride(2) != 1 or local_keys.stride(1) != dim or local_values.stride() != local_keys.stride():
            raise ValueError("decode_attention needs the local keys and values laid out [hk, m, d]")
        if (local_keys.shape != (hk, local_keys.shape[1], dim) or local_values.shape != local_keys.shape
                or local_keys.dtype not in (torch.float32, torch.bfloat16, torch.float16)
                or local_values.dtype != local_keys.dtype):
            raise ValueError(f"decode_attention: local keys {tuple(local_keys.shape)} {local_keys.dtype}, values "
                             f"{tuple(local_values.shape)} {local_values.dtype}, for q {tuple(q.shape)}")
        m = local_keys.shape[1]
        local = _Segment(KV_FORMATS[local_keys.dtype], local_keys.data_ptr(), local_values.data_ptr(), None, None,
                         local_keys.stride(0), None, -(-m // MAX_CHUNK), m, None)
        chunks += local.n_chunks
    q = q.contiguous()
    work = _scratch(hk * chunks * rows * (dim + 2))
    out = torch.empty((hk, rows, dim), dtype=torch.float32)
    lse = torch.empty((hk, rows), dtype=torch.float32)
    code = _library().decode_attention(ctypes.byref(prefix), None if local is None else ctypes.byref(local), hk, dim,
                                       q.data_ptr(), KV_FORMATS[q.dtype], scale, rows, work.data_ptr(),
                                       out.data_ptr(), lse.data_ptr())
    if code != 0:
        raise RuntimeError(f"decode_attention failed ({code}) for q {tuple(q.shape)}, keys {tuple(keys.shape)}")
    return out, lse, scores


def quantized_available() -> bool:
    """Whether the 4/8-bit decoding GEMVs (cpu_quant.c) are built here: they need AVX512-BF16."""
    library = _library()
    return library is not None and bool(library.starqa_quant_available())


def quantized_x8_available() -> bool:
    """Whether the int8-activation GEMVs (cpu_quant.c's *_x8, --activations int8) are built here: AVX512-VNNI."""
    library = _library()
    return library is not None and bool(library.starqa_quant_available()) and bool(library.starqa_quant_x8_available())


ACTIVATIONS = ("bfloat16", "int8")  # what x is rounded to before a 4/8-bit GEMV (see cpu_quant.c)


def linear_quantized(x: torch.Tensor, bits: int, weight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None, group: int, y: torch.Tensor,
                     residual: torch.Tensor | None = None, wide: bool = True, activations: str = "bfloat16") -> None:
    """y[:, :out] = x [rows, in] @ W.T (+ residual) for W held in 4 or 8 bits (starqa.model.quantized_weights' format);
    x bf16 contiguous, y bf16 [rows, >= out] with unit column stride (a column slice of a fused output is fine).

    bits 4: weight uint8 [out, in / 2], scales/zeros float32 [out, in / 32]. bits 8: weight int8 [out, in], scales
    (zeros optional) float32 [out, in / group]; `wide`: some q lies outside -64..63 (the kernel's slower exact path).
    activations "int8": x rounded to int8 per 32 inputs first (x ~ dx * xq), the products summed exactly in int32
    (AVX512-VNNI): bound by the bytes it reads rather than by the work per weight (docs/quantized-decoding.md)."""
    rows, features = x.shape
    out = weight.shape[0]
    _check_quantized_inputs(x, bits, weight, scales, zeros, group, y, residual)
    res_pointer, res_stride = (None, 0) if residual is None else (residual.data_ptr(), residual.stride(0))
    library = _library()
    if activations == "int8":
        if not quantized_x8_available():
            raise ValueError("linear_quantized: int8 activations need AVX512-VNNI, which this build lacks")
        if bits == 4:
            code = library.linear_q4_x8(weight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), x.data_ptr(),
                                        y.data_ptr(), out, features, rows, y.stride(0), res_pointer, res_stride)
        else:
            code = library.linear_q8_x8(weight.data_ptr(), scales.data_ptr(), _pointer(zeros), x.data_ptr(),
                                        y.data_ptr(), out, features, group, rows, y.stride(0), res_pointer, res_stride)
        if code != 0:
            raise RuntimeError(f"linear_q{bits}_x8 failed ({code}) for x {tuple(x.shape)}, weight {tuple(weight.shape)}")
        return
    if activations != "bfloat16":
        raise ValueError(f"linear_quantized: activations must be one of {', '.join(ACTIVATIONS)}, not {activations!r}")
    if bits == 4:
        code = library.linear_q4(weight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), x.data_ptr(), y.data_ptr(),
                                 out, features, rows, y.stride(0), res_pointer, res_stride)
    else:
        code = library.linear_q8(weight.data_ptr(), scales.data_ptr(), _pointer(zeros), x.data_ptr(), y.data_ptr(),
                                 out, features, group, int(wide), rows, y.stride(0), res_pointer, res_stride)
    if code != 0:
        raise RuntimeError(f"linear_q{bits} failed ({code}) for x {tuple(x.shape)}, weight {tuple(weight.shape)}")


def _check_quantized_inputs(x, bits, weight, scales, zeros, group, y, residual) -> None:
    """Shapes and dtypes the C kernels trust (a wrong one would read past a buffer)."""
    rows, features = x.shape
    out = weight.shape[0]
    _check_bf16("linear_quantized", x, y, *([] if residual is None else [residual]))
    if not x.is_contiguous() or y.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("linear_quantized needs a contiguous x and unit column strides")
    if y.shape[0] != rows or y.shape[1] < out or (residual is not None and (residual.shape[0] != rows
                                                                            or residual.shape[1] < out)):
        raise ValueError(f"linear_quantized: y {tuple(y.shape)} or the residual does not take {rows} x {out}")
    _check_quantized_weight("linear_quantized", bits, weight, scales, zeros, group, features)


def _check_quantized_weight(caller: str, bits, weight, scales, zeros, group, features) -> None:
    """A 4/8-bit weight's integers, scales and zeros have the shapes and dtypes the C kernels trust."""
    out = weight.shape[0]
    if bits == 4:
        expected, group = (torch.uint8, (out, features // 2)), 32
    elif bits == 8:
        expected = (torch.int8, (out, features))
    else:
        raise ValueError(f"{caller}: bits must be 4 or 8, not {bits}")
    if (weight.dtype, tuple(weight.shape)) != expected or not weight.is_contiguous():
        raise ValueError(f"{caller}: weight {weight.dtype} {tuple(weight.shape)} does not hold {features} inputs "
                         f"in {bits} bits")
    if group <= 0 or features % group:
        raise ValueError(f"{caller}: {features} inputs are not whole groups of {group}")
    if bits == 4 and zeros is None:
        raise ValueError(f"{caller}: 4-bit weights need zeros")
    for name, values in (("scales", scales), ("zeros", zeros)):
        if values is not None and (values.dtype != torch.float32 or tuple(values.shape) != (out, features // group)
                                   or not values.is_contiguous()):
            raise ValueError(f"{caller}: {name} {values.dtype} {tuple(values.shape)}, expected float32 "
                             f"{(out, features // group)}")


def linear_packed(x: torch.Tensor, parts: list, weight: torch.Tensor | None,
                  residual: torch.Tensor | None = None, activations: str = "bfloat16") -> torch.Tensor:
    """x [rows, in] bf16 @ a projection held as row parts (starqa.model.quantized_weights.PackedPart: 4 or 8 bits, or
    16: that part's rows of the bf16 `weight`, which only such parts need), each written into its columns of one
    output [rows, out]; `activations` as in linear_quantized (the 4/8-bit parts only)."""
    x = x.contiguous()
    rows = x.shape[0]
    y = torch.empty((rows, sum(part.rows for part in parts)), dtype=torch.bfloat16)
    start = 0
    for part in parts:
        columns = y[:, start:start + part.rows]
        part_residual = None if residual is None else residual[:, start:start + part.rows]
        if part.bits == 16:
            columns.copy_(linear_bf16(x, weight[start:start + part.rows], part_residual))
        else:
            linear_quantized(x, part.bits, part.weight, part.scales, part.zeros, part.group, columns, part_residual,
                             wide=part.wide, activations=activations)
        start += part.rows
    return y


def dequantize_packed(parts: list, features: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """A projection held as 4/8-bit row parts (no bfloat16 part) as its bfloat16 weight [out, in]: exactly the values
    the GGUF's conversion to bfloat16 gives (cpu_quant.c's dequantize_q), for the calls with many rows. Written into
    the start of `buffer` (bf16, contiguous) when given: a fresh tensor per call costs ~8x the de-quantisation itself
    in page faults."""
    library = _library()
    if library is None or not library.starqa_quant_available():
        raise RuntimeError("dequantize_packed needs the 4/8-bit kernels")
    shape = (sum(part.rows for part in parts), features)
    if buffer is None:
        weight = torch.empty(shape, dtype=torch.bfloat16)
    elif buffer.dtype != torch.bfloat16 or not buffer.is_contiguous() or buffer.numel() < shape[0] * shape[1]:
        raise ValueError(f"dequantize_packed: the buffer {buffer.dtype} {tuple(buffer.shape)} does not hold {shape}")
    else:
        weight = buffer.view(-1)[:shape[0] * shape[1]].view(shape)
    start = 0
    for part in parts:
        if part.bits not in (4, 8):
            raise ValueError(f"dequantize_packed: a {part.bits}-bit part has no integers to de-quantise")
        rows = weight[start:start + part.rows]
        group = 32 if part.bits == 4 else part.group
        _check_quantized_weight("dequantize_packed", part.bits, part.weight, part.scales, part.zeros, group, features)
        code = library.dequantize_q(part.bits, part.weight.data_ptr(), part.scales.data_ptr(), _pointer(part.zeros),
                                    group, part.rows, features, rows.data_ptr())
        if code != 0:
            raise RuntimeError(f"dequantize_q failed ({code}) for a {part.bits}-bit part {tuple(part.weight.shape)}")
        start += part.rows
    return weight


def read_bandwidth(megabytes: int = 1024, repeat: int = 5) -> float:
    """Bytes per second a streaming read of a large float32 buffer reaches here (best of `repeat`): the bandwidth a
    decoding step's reads are bound by. Uses the kernels' reader where available, else torch's sum."""
    import time

    data = torch.ones(megabytes * (1 << 20) // 4)
    library = _library()
    read = ((lambda: library.stream_read(data.data_ptr(), data.numel())) if library is not None
            else (lambda: float(data.sum())))
    read()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best
