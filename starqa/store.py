"""The on-disk document store: one folder per stored document, KV as safetensors, a JSON manifest, atomic writes.

    <root>/documents/<name>     symlink -> ../objects/<name>.<id>   (swapped atomically on re-ingest)
    <root>/objects/<name>.<id>/  manifest.json, text.txt, pages.json, context_ids.safetensors,
                                 blocks/block_00000.safetensors ..., checks.json
    <root>/objects/.tmp-<name>.<id>.<pid>/   an ingest in progress (renamed into objects/ when complete)
    <root>/locks/<name>.lock     held while a document is written or replaced
    <root>/models/               de-quantised copies of GGUF models

A document is visible only once its folder is complete and its link is in place, so a crash at any moment leaves
the previous version or the new one, never a mixture; leftovers are cleaned by the next run (`starqa gc` reports them).
Nothing here is ever unpickled: KV and ids are safetensors, everything else JSON or text.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import save_file

from starqa.errors import StarqaError, UsageError

MANIFEST_FORMAT = 1
_NAME_MAX = 100
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def default_store_root() -> Path:
    if os.environ.get("STARQA_HOME"):
        return Path(os.environ["STARQA_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "starqa"
    return Path.home() / ".cache" / "starqa"


def validate_name(name: str) -> str:
    if not name:
        raise UsageError("document name is empty: pass --name")
    if len(name) > _NAME_MAX:
        raise UsageError(f"document name is {len(name)} characters long; use at most {_NAME_MAX}")
    if "/" in name or "\\" in name or os.sep in name:
        raise UsageError(f"document name '{name}' contains a path separator; pass --name with a plain name")
    if name in (".", "..") or ".." in name:
        raise UsageError(f"document name '{name}' contains '..'; pass --name with a plain name")
    if name.startswith("."):
        raise UsageError(f"document name '{name}' starts with a dot; pass --name with a plain name")
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise UsageError("document name contains control characters; pass --name with a plain name")
    return name


def name_from_path(path: str) -> str:
    stem = Path(path).stem if path != "-" else "stdin"
    cleaned = re.sub(r"[^\w.+-]+", "-", stem).strip("-.") or "document"
    return cleaned[:_NAME_MAX]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, data) -> None:
    _write_bytes(path, json.dumps(data, indent=2, ensure_ascii=False).encode())


def _replace_json(path: Path, data) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    _write_json(temporary, data)
    os.replace(temporary, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StoredDocument:
    name: str
    path: Path  # the object folder the name links to
    manifest: dict

    @property
    def blocks(self) -> list[dict]:
        return self.manifest["blocks"]

    def text(self) -> str:
        return (self.path / "text.txt").read_text(encoding="utf-8")

    def pages(self) -> list[dict]:
        return json.loads((self.path / "pages.json").read_text(encoding="utf-8"))

    def context_ids(self) -> list[int]:
        with safe_open(self.path / "context_ids.safetensors", framework="pt") as handle:
            return handle.get_tensor("ids").tolist()


def block_file_name(index: int) -> str:
    return f"blocks/block_{index:05d}.safetensors"


def write_block_file(staging: Path, index: int, start: int, end: int, keys: Sequence[torch.Tensor],
                     values: Sequence[torch.Tensor]) -> None:
    """One block's KV for every layer; any rank may write its blocks into the staging folder of rank 0's writer."""
    tensors = {}
    for layer, (key, value) in enumerate(zip(keys, values)):
        tensors[f"layers.{layer}.key"] = key.detach().to("cpu").contiguous()  # [kv_heads, tokens, head_dim]
        tensors[f"layers.{layer}.value"] = value.detach().to("cpu").contiguous()
    path = staging / block_file_name(index)
    save_file(tensors, str(path), metadata={"index": str(index), "start": str(start), "end": str(end)})
    os.chmod(path, _FILE_MODE)


class DocumentWriter:
    """Collects one document's files in a staging folder; `DocumentStore.writing` publishes it when complete."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        (staging / "blocks").mkdir(mode=_DIR_MODE)
        self.files: dict[str, dict] = {}
        self.blocks: list[dict] = []

    def _record(self, relative: str) -> None:
        path = self.staging / relative
        os.chmod(path, _FILE_MODE)
        self.files[relative] = {"sha256": sha256_file(path), "size": path.stat().st_size}

    def write_text(self, text: str, pages: Sequence[dict]) -> None:
        _write_bytes(self.staging / "text.txt", text.encode("utf-8"))
        self._record("text.txt")
        _write_json(self.staging / "pages.json", list(pages))
        self._record("pages.json")

    def write_context_ids(self, ids: Sequence[int]) -> None:
        save_file({"ids": torch.tensor(list(ids), dtype=torch.int64)}, str(self.staging / "context_ids.safetensors"))
        self._record("context_ids.safetensors")

    def write_block(self, index: int, start: int, end: int, keys: Sequence[torch.Tensor],
                    values: Sequence[torch.Tensor]) -> None:
        write_block_file(self.staging, index, start, end, keys, values)
        self.record_existing_block(index, start, end)

    def record_existing_block(self, index: int, start: int, end: int) -> None:
        """Record a block file already in the staging folder (written here or by another rank)."""
        relative = block_file_name(index)
        if not (self.staging / relative).is_file():
            raise StarqaError(f"block {index} was not written by any rank")
        self._record(relative)
        self.blocks.append({"index": index, "start": start, "end": end, "file": relative})



class DocumentStore:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_store_root()
        for folder in (self.root, self.root / "documents", self.root / "objects", self.root / "locks"):
            folder.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        os.chmod(self.root, _DIR_MODE)

    # ------------------------------------------------------------ reading

    def names(self) -> list[str]:
        return sorted(p.name for p in (self.root / "documents").iterdir() if p.is_symlink() and p.exists())

    def exists(self, name: str) -> bool:
        link = self.root / "documents" / name
        return link.is_symlink() and link.exists()

    def get(self, name: str) -> StoredDocument:
        validate_name(name)
        link = self.root / "documents" / name
        if not (link.is_symlink() and link.exists()):
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `starqa list` shows what is stored"
            raise UsageError(f"no document named '{name}' in {self.root}{hint}")
        path = link.resolve()
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise StarqaError(
                f"document '{name}' has a missing or damaged manifest: re-ingest it with --force"
            ) from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise StarqaError(f"document '{name}' was stored by an incompatible starqa version: re-ingest it")
        return StoredDocument(name=name, path=path, manifest=manifest)

    def check_files(self, doc: StoredDocument, *, full: bool = False, only: Sequence[str] | None = None) -> None:
        """Size always; SHA-256 with `full`, or when a file's (size, mtime) changed since it was last checked."""
        checks_path = doc.path / "checks.json"
        try:
            checks = json.loads(checks_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            checks = {}
        changed = False
        for relative, expected in doc.manifest["files"].items():
            if only is not None and relative not in only:
                continue
            path = doc.path / relative
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise StarqaError(
                    f"document '{doc.name}' is damaged: {relative} is missing; re-ingest it with --force"
                ) from None
            if stat.st_size != expected["size"]:
                raise StarqaError(
                    f"document '{doc.name}' is damaged: {relative} has {stat.st_size} bytes, expected "
                    f"{expected['size']}; re-ingest it with --force"
                )
            stamp = [stat.st_size, stat.st_mtime_ns]
            if full or checks.get(relative) != stamp:
                if sha256_file(path) != expected["sha256"]:
                    raise StarqaError(
                        f"document '{doc.name}' is damaged: {relative} does not match its checksum; "
                        "re-ingest it with --force"
                    )
                checks[relative] = stamp
                changed = True
        if changed:
            try:
                _replace_json(checks_path, checks)
            except OSError:
                pass  # a read-only store still answers; it just re-hashes next time

    def load_blocks(self, doc: StoredDocument, indices: Sequence[int], device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> Iterator[tuple[dict, list[torch.Tensor], list[torch.Tensor]]]:
        by_index = {block["index"]: block for block in doc.blocks}
        self.check_files(doc, only=[by_index[i]["file"] for i in indices])
        for index in indices:
            block = by_index[index]
            keys, values = [], []
            with safe_open(doc.path / block["file"], framework="pt", device=str(device)) as handle:
                layer = 0
                while f"layers.{layer}.key" in handle.keys():
                    keys.append(handle.get_tensor(f"layers.{layer}.key"))
                    values.append(handle.get_tensor(f"layers.{layer}.value"))
                    layer += 1
            if dtype is not None and keys and keys[0].dtype != dtype:
                raise StarqaError(f"document '{doc.name}' holds {keys[0].dtype} KV, not {dtype}")
            yield block, keys, values

    # ------------------------------------------------------------ writing

    @contextmanager
    def lock(self, name: str, *, timeout: float = 600.0, on_wait=None):
        lock = FileLock(str(self.root / "locks" / f"{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait:
                on_wait(f"another starqa process is writing '{name}'; waiting for it (up to {timeout:.0f} s)")
            try:
                lock.acquire(timeout=timeout)
            except Timeout:
                raise StarqaError(
                    f"document '{name}' is still being written by another starqa process; try again later"
                ) from None
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def writing(self, name: str, manifest: dict) -> Iterator[DocumentWriter]:
        """Stage a document; on normal exit write its manifest and publish it atomically. Caller holds lock(name)."""
        validate_name(name)
        object_name = f"{name}.{uuid.uuid4().hex[:12]}"
        staging = self.root / "objects" / f".tmp-{object_name}.{os.getpid()}"
        staging.mkdir(mode=_DIR_MODE)
        try:
            writer = DocumentWriter(staging)
            yield writer
            manifest = dict(manifest, format=MANIFEST_FORMAT, name=name, files=writer.files,
                            blocks=sorted(writer.blocks, key=lambda block: block["index"]),
                            kv_bytes=sum(f["size"] for r, f in writer.files.items() if r.startswith("blocks/")),
                            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            _write_json(staging / "manifest.json", manifest)
            checks = {rel: [(staging / rel).stat().st_size, (staging / rel).stat().st_mtime_ns] for rel in writer.files}
            _write_json(staging / "checks.json", checks)
            _fsync_dir(staging)
            final = self.root / "objects" / object_name
            os.rename(staging, final)
            self._publish(name, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _publish(self, name: str, target: Path) -> None:
        link = self.root / "documents" / name
        previous = link.resolve() if link.is_symlink() else None
        temporary_link = self.root / "documents" / f".link-{name}.{uuid.uuid4().hex[:8]}"
        os.symlink(Path("..") / "objects" / target.name, temporary_link)
        os.replace(temporary_link, link)  # the atomic moment: readers see the old or the new document
        _fsync_dir(link.parent)
        if previous is not None and previous != target and previous.exists():
            shutil.rmtree(previous, ignore_errors=True)

    def remove(self, name: str) -> int:
        doc = self.get(name)
        with self.lock(name):
            freed = _tree_size(doc.path)
            (self.root / "documents" / name).unlink()
            shutil.rmtree(doc.path, ignore_errors=True)
        return freed

    def collect_garbage(self) -> tuple[int, int]:
        """Remove staging folders of dead processes and objects no name links to; returns (items, bytes)."""
        linked = {p.resolve() for p in (self.root / "documents").iterdir() if p.is_symlink() and p.exists()}
        removed = freed = 0
        for link in (self.root / "documents").iterdir():
            if link.name.startswith(".link-") or (link.is_symlink() and not link.exists()):
                link.unlink(missing_ok=True)
                removed += 1
        for path in (self.root / "objects").iterdir():
            if path.resolve() in linked:
                continue
            if path.name.startswith(".tmp-"):
                pid = path.name.rsplit(".", 1)[-1]
                if pid.isdigit() and _process_alive(int(pid)):
                    continue
                doc_name = path.name[len(".tmp-"):].rsplit(".", 2)[0]
            else:
                doc_name = path.name.rsplit(".", 1)[0]
            lock = FileLock(str(self.root / "locks" / f"{doc_name}.lock"))
            try:
                lock.acquire(timeout=0)  # a writer of that name may be about to link this object
            except Timeout:
                continue
            try:
                if path.resolve() in {p.resolve() for p in (self.root / "documents").iterdir() if p.is_symlink()}:
                    continue
                freed += _tree_size(path)
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
            finally:
                lock.release()
        return removed, freed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
