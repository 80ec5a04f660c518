"""Settings: configs/default.yaml, then a user's --config file, then command-line flags, as one frozen dataclass.

Unknown keys and wrong types are usage errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from starqa.errors import UsageError

MODEL_ENV = "STARQA_MODEL"  # the model when neither --model nor a --config file names one

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


@dataclass(frozen=True)
class Settings:
    model: str
    dtype: str
    kv_dtype: str
    weights: str
    device: str
    block_size: int | str  # tokens, or "auto": set per document from its length (auto_block_size)
    anchor_size: int | None
    phase1_batch: int
    max_new_tokens: int
    batch_size: int
    temperature: float
    top_p: float
    seed: int
    store: str | None
    nproc: int | str
    attention_backend: str
    max_kv_memory: int  # bytes (the config may say "4GiB")
    max_request_bytes: int  # bytes
    # starqa serve's limits on what requests may make it hold (starqa.serve.limits)
    max_questions_per_request: int
    max_waiting_asks: int
    max_connections: int
    max_queued_events: int
    max_decode_memory: int  # bytes
    audit: str = "metadata"  # off | metadata | full (starqa.governance.audit)
    audit_retention_days: int | None = None  # `starqa audit prune` drops records older than this; None: keep all
    # --attention hybrid's second pass: full attention, or a larger model (starqa.answer.escalation)
    escalate_to: str = "full"
    # what x is rounded to before a 4/8-bit decoding GEMV (starqa/kernels/cpu_quant.c)
    activations: str = "bfloat16"

    @property
    def effective_anchor_size(self) -> int | str:
        return self.block_size if self.anchor_size is None else self.anchor_size

    def sized_for(self, context_tokens: int, stored: dict | None = None) -> Settings:
        """These settings with an `auto` block size made a number of tokens for a context this long; `stored` (a
        stored version's manifest, for `ingest --update`) keeps that version's block and anchor sizes instead, so its
        unchanged blocks are taken over. Numbers given by the user are kept as they are."""
        if self.block_size != AUTO_BLOCK_SIZE:
            return self
        if stored is not None:
            anchor = stored["anchor_size"] if self.anchor_size is None else self.anchor_size
            return dataclasses.replace(self, block_size=stored["block_size"], anchor_size=anchor)
        return dataclasses.replace(self, block_size=block_size_for(self.block_size, context_tokens))


AUTO_BLOCK_SIZE = "auto"
_AUTO_BLOCK_STEP = 1024  # auto block sizes are multiples of this, and never smaller


def auto_block_size(context_tokens: int) -> int:
    """A quarter of the context, to the nearest multiple of 1,024 tokens, at least 1,024.

    Why a quarter: on the RULER-style suite (docs/fidelity.md) blocks of L/4 stayed within a few points of full
    attention at 8K and 16K where 1,024-token blocks lost about 10; Phase 1 costs about 1.2x (8K) to 1.5x (16K) as
    much. Multiples of 1,024 keep the sizes few, so documents of similar length share block sizes."""
    steps = max(1, (context_tokens + 2 * _AUTO_BLOCK_STEP) // (4 * _AUTO_BLOCK_STEP))  # nearest, halves up
    return steps * _AUTO_BLOCK_STEP


def block_size_for(block_size: int | str, context_tokens: int) -> int:
    """A block size setting (tokens, or auto) as tokens for a context this long."""
    return auto_block_size(context_tokens) if block_size == AUTO_BLOCK_SIZE else block_size


# Accepted Python types per key (bool is excluded from int on purpose: `block_size: yes` is a typo).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "dtype": (str,),
    "kv_dtype": (str,),
    "weights": (str,),
    "device": (str,),
    "block_size": (int, str),
    "anchor_size": (int, type(None)),
    "phase1_batch": (int,),
    "max_new_tokens": (int,),
    "batch_size": (int,),
    "temperature": (float, int),
    "top_p": (float, int),
    "seed": (int,),
    "store": (str, type(None)),
    "nproc": (int, str),
    "attention_backend": (str,),
    "max_kv_memory": (int, str),
    "max_request_bytes": (int, str),
    "max_questions_per_request": (int,),
    "max_waiting_asks": (int,),
    "max_connections": (int,),
    "max_queued_events": (int,),
    "max_decode_memory": (int, str),
    "audit": (str,),
    "audit_retention_days": (int, type(None)),
    "escalate_to": (str,),
    "activations": (str,),
}
# Settings given as a size: bytes, or a number with a unit ("512MiB", "4GiB", "1.5GB").
_SIZE_KEYS = ("max_kv_memory", "max_request_bytes", "max_decode_memory")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_CHOICES = {
    "dtype": {"auto", "float32", "bfloat16", "float16"},
    "kv_dtype": {"auto", "float32", "bfloat16", "float16", "int8"},
    "weights": {"auto", "bfloat16", "int8", "int4"},
    "activations": {"bfloat16", "int8"},
    "device": None,  # "auto", "cpu", "cuda", "cuda:N": checked in validate()
    "attention_backend": {"auto", "torch", "triton"},
    "audit": {"off", "metadata", "full"},
}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:  # a folder, no permission, a path through a file, ...
        raise UsageError(f"cannot read config file {path}: {exc.__class__.__name__}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"config file {path} is not valid YAML{line}: fix it or pass another --config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of settings, e.g. 'block_size: 1024'")
    return data


def _check_keys_and_types(values: dict[str, Any], origin: str) -> None:
    for key, value in values.items():
        if key not in _FIELD_TYPES:
            known = ", ".join(sorted(_FIELD_TYPES))
            raise UsageError(f"unknown setting '{key}' in {origin}; known settings: {known}")
        allowed = _FIELD_TYPES[key]
        if key == "audit" and isinstance(value, bool):  # YAML reads `audit: off` as false
            if value:
                raise UsageError(f"setting 'audit' in {origin} must be off, metadata or full, not {value!r}")
            values[key] = value = "off"
        if isinstance(value, bool) or not isinstance(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise UsageError(f"setting '{key}' in {origin} must be {names}, not {value!r}")


def parse_size(value: int | str, key: str) -> int:
    """Bytes from an int or a text such as "4GiB", "512 MiB", "1.5GB"; a usage error naming `key` otherwise."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if unit not in _SIZE_UNITS:
            raise UsageError(f"{key} must be a size such as 4GiB, 512MiB or a number of bytes, not {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise UsageError(f"{key} must not be negative, not {value!r}")
    return size


def validate(settings: Settings) -> Settings:
    """Reject impossible values with a message naming the setting."""
    if settings.block_size != AUTO_BLOCK_SIZE and (isinstance(settings.block_size, str) or settings.block_size <= 0):
        raise UsageError("setting 'block_size' must be a positive number of tokens or auto, "
                         f"not {settings.block_size!r}")
    if settings.anchor_size is not None:
        if settings.anchor_size <= 0:
            raise UsageError(f"anchor size must be a positive number of tokens, not {settings.anchor_size}")
    if settings.phase1_batch <= 0:
        raise UsageError(f"phase1_batch must be positive, not {settings.phase1_batch}")
    if settings.max_new_tokens <= 0:
        raise UsageError(f"max new tokens must be positive, not {settings.max_new_tokens}")
    if settings.batch_size <= 0:
        raise UsageError(f"batch size must be a positive number of questions, not {settings.batch_size}")
    if settings.temperature < 0:
        raise UsageError(f"temperature must be >= 0, not {settings.temperature}")
    if not 0 < settings.top_p <= 1:
        raise UsageError(f"top-p must be in (0, 1], not {settings.top_p}")
    for key, choices in _CHOICES.items():
        value = getattr(settings, key)
        if choices is not None and value not in choices:
            raise UsageError(f"setting '{key}' must be one of {', '.join(sorted(choices))}, not {value!r}")
    if not (settings.device in ("auto", "cpu", "cuda") or settings.device.startswith("cuda:")):
        raise UsageError(f"device must be auto, cpu, cuda or cuda:N, not {settings.device!r}")
    if isinstance(settings.nproc, str) and settings.nproc != "auto":
        raise UsageError(f"nproc must be a positive number or 'auto', not {settings.nproc!r}")
    if isinstance(settings.nproc, int) and settings.nproc <= 0:
        raise UsageError(f"nproc must be a positive number or 'auto', not {settings.nproc}")
    if settings.audit_retention_days is not None and settings.audit_retention_days <= 0:
        raise UsageError(f"audit_retention_days must be a positive number of days or null (keep every record), "
                         f"not {settings.audit_retention_days}")
    if not settings.escalate_to.strip():
        raise UsageError("escalate_to must be full or a model (a catalogue name, .gguf file or HF directory), not empty")
    for key in ("max_request_bytes", "max_questions_per_request", "max_waiting_asks", "max_connections",
                "max_queued_events", "max_decode_memory"):
        if getattr(settings, key) <= 0:
            raise UsageError(f"{key} must be positive, not {getattr(settings, key)}")
    return settings


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Defaults, then $STARQA_MODEL (the model only), then `config_file`, then every override that is not None."""
    values = _read_yaml(DEFAULT_CONFIG_PATH)
    _check_keys_and_types(values, str(DEFAULT_CONFIG_PATH))
    missing = set(_FIELD_TYPES) - set(values)
    if missing:
        raise UsageError(f"{DEFAULT_CONFIG_PATH} lacks settings: {', '.join(sorted(missing))}")
    if os.environ.get(MODEL_ENV):  # between the defaults and a config file: a session's or a test run's model
        values["model"] = os.environ[MODEL_ENV]
    if config_file is not None:
        user_values = _read_yaml(Path(config_file))
        _check_keys_and_types(user_values, str(config_file))
        values.update(user_values)
    flag_values = {key: value for key, value in overrides.items() if value is not None}
    _check_keys_and_types(flag_values, "the command line")
    values.update(flag_values)
    return _normalized(Settings(**values))


def override(settings: Settings, values: dict[str, Any], origin: str) -> Settings:
    """`settings` with `values` (checked as a config file's are: known keys, types, then every setting's range)."""
    _check_keys_and_types(values, origin)
    return _normalized(dataclasses.replace(settings, **values))


def _normalized(settings: Settings) -> Settings:
    if isinstance(settings.nproc, str) and settings.nproc.isdigit():
        settings = dataclasses.replace(settings, nproc=int(settings.nproc))
    if isinstance(settings.block_size, str) and re.fullmatch(r"-?\d+", settings.block_size):  # --block-size 512
        settings = dataclasses.replace(settings, block_size=int(settings.block_size))
    sizes = {key: parse_size(getattr(settings, key), key) for key in _SIZE_KEYS}
    return validate(dataclasses.replace(settings, **sizes))
