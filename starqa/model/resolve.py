"""Model resolution and loading: catalogue models (starqa.model.catalogue), local HF directories, GGUF files and cached
HF ids.

Nothing here downloads: HF ids are looked up in the local HF cache only. A GGUF is de-quantised once, to the
compute dtype, and kept as a safetensors copy under the store's `models/` folder (starqa.model.gguf_convert), so later
loads memory-map it in about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from starqa.model import catalogue
from starqa.model.catalogue import CATALOGUE, CatalogueModel
from starqa.errors import StarqaError, UsageError, one_line

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
    catalogue: CatalogueModel | None = None  # set for a catalogue model (its GGUF may still need assembling)
    dtype: str = "float32"  # the dtype a GGUF is converted to


def _offline_environment() -> None:
    # starqa must never download: make huggingface_hub refuse any network access in this process.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def bundled_gguf_path(name: str) -> Path:
    """The GGUF of a catalogue model that ships whole in one package (the tests' smollm2-135m)."""
    return catalogue.part_paths(CATALOGUE[name])[0]


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def resolve_model(spec: str, models_root: Path, dtype=None) -> ModelSource:
    """Turn a --model value into a directory of HF files (assembling and converting a GGUF lazily, see
    `ensure_converted`). `dtype` (a torch dtype or its name): what a GGUF is converted to; float32 if None."""
    _offline_environment()
    dtype_name = _dtype_name(dtype)
    if spec in CATALOGUE:
        model = CATALOGUE[spec]
        converted = Path(models_root) / f"{model.name}-{model.sha256[:16]}-{dtype_name}"
        if (converted / "config.json").is_file():
            return ModelSource(name=spec, directory=converted, dtype=dtype_name)
        gguf_file = catalogue.source_file(model, models_root)
        if not gguf_file.is_file():
            catalogue.part_paths(model)  # not installed: says what to install
        return ModelSource(name=spec, directory=converted, gguf_file=str(gguf_file), catalogue=model,
                           dtype=dtype_name)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file not found: {path}")
        return _gguf_source(str(path.resolve()), path, models_root, dtype_name)
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
    raise UsageError(
        f"unknown model '{spec}': use a catalogue model ({catalogue.catalogue_names()}; `starqa models` lists "
        "them), a local HF model directory, a .gguf file, or an HF id already in the local HF cache"
    )


def _gguf_source(name: str, gguf_path: Path, models_root: Path, dtype_name: str) -> ModelSource:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    converted = Path(models_root) / f"{gguf_path.stem}-{key}-{dtype_name}"
    if (converted / "config.json").is_file():
        return ModelSource(name=name, directory=converted, dtype=dtype_name)
    return ModelSource(name=name, directory=converted, gguf_file=str(gguf_path), dtype=dtype_name)


def _cached_hf_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (or an invalid id): the caller explains
        return None


def ensure_converted(source: ModelSource, *, on_status=None) -> ModelSource:
    """Assemble a catalogue model's parts (checked against the pinned SHA-256) and convert a GGUF once into a
    safetensors directory in the source's dtype (written aside, then renamed into place).

    A file lock makes concurrent first uses (two jobs, or several ranks) do this once; the others wait for it.
    """
    if source.gguf_file is None:
        return source
    from filelock import FileLock

    source.directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with FileLock(str(source.directory.parent / f"{source.directory.name}.lock"), mode=0o600):
        if not (source.directory / "config.json").is_file():
            gguf_path = Path(source.gguf_file)
            if source.catalogue is not None and not gguf_path.is_file():
                if on_status:
                    on_status(f"assembling {source.catalogue.name} from its {source.catalogue.parts} packages "
                              "(once) and checking its SHA-256")
                gguf_path = catalogue.assemble(source.catalogue, source.directory.parent)
            reader = _gguf_reader(gguf_path)
            check_architecture(SimpleNamespace(model_type=reader.fields["general.architecture"].contents()
                                               if "general.architecture" in reader.fields else None))
            if source.directory.exists():  # left incomplete by an older, interrupted conversion
                shutil.rmtree(source.directory)
            try:
                _convert_gguf(gguf_path, source, reader, on_status)
            except StarqaError:
                raise
            except Exception as exc:  # tensor types or layouts the GGUF reader cannot de-quantise
                message = one_line(exc, 200)
                raise StarqaError(f"cannot convert {gguf_path.name}: {exc.__class__.__name__}: {message}; nothing "
                                  "was stored") from exc
    return ModelSource(name=source.name, directory=source.directory, dtype=source.dtype)


def _gguf_reader(gguf_path: Path):
    """The GGUF's reader (metadata and memory-mapped tensors); a usage error if the file is not a GGUF."""
    import gguf

    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as exc:  # not a GGUF file, or a damaged one
        message = one_line(exc, 200)
        raise UsageError(f"cannot read {gguf_path.name} as a model: {exc.__class__.__name__}: {message}") from None


def _convert_gguf(gguf_path: Path, source: ModelSource, reader, on_status) -> None:
    import torch

    from starqa.model import gguf_convert
    from starqa.store.document_store import sha256_file

    target = source.directory
    if on_status:
        on_status(f"converting {gguf_path.name} to a {source.dtype} safetensors copy (once)")
    staging = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(mode=0o700)
    try:
        gguf_convert.convert(gguf_path, staging, getattr(torch, source.dtype), reader=reader,
                             tied=source.catalogue is not None and source.catalogue.tied_embeddings)
        digest = source.catalogue.sha256 if source.catalogue is not None else sha256_file(gguf_path)
        (staging / "starqa-source.json").write_text(json.dumps({"gguf": str(gguf_path), "gguf_sha256": digest},
                                                               indent=2))
        os.chmod(staging / "starqa-source.json", 0o600)
        if not (staging / "config.json").is_file() or not any(staging.glob("*.safetensors")):
            raise StarqaError(f"converting {gguf_path.name} wrote no weights; nothing was stored")
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
    """For a model built in memory (tests): its shape and a sample of every weight (a
    starqa.model.transformer.Transformer)."""
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
