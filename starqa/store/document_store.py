"""The on-disk document store: one folder per stored document, KV as safetensors, a JSON manifest, atomic writes.

    <root>/documents/<name>     symlink -> ../objects/<name>.<id>   (swapped atomically on re-ingest)
    <root>/objects/<name>.<id>/  manifest.json, text.txt, pages.json, context_ids.safetensors,
                                 blocks/block_00000.safetensors ..., checks.json
                                 (a new version may hard-link block files of the version it replaces: see
                                 `DocumentWriter.take_over_block`; no file is ever written after it is complete)
    <root>/objects/.tmp-<name>.<id>.<pid>/   an ingest in progress (renamed into objects/ when complete)
    <root>/locks/<name>.lock     held while a document is written or replaced
    <root>/models/               de-quantised copies of GGUF models

A document is visible only once its folder is complete and its link is in place, so a crash at any moment leaves
the previous version or the new one, never a mixture; leftovers are cleaned by the next run (`starqa gc` reports them).
Nothing here is ever unpickled: KV and ids are safetensors, everything else JSON or text.

Test hook (tests/test_hardening.py stops an ingest at an exact moment to kill or resume it):
STARQA_TEST_PAUSE_AT=after-block:N (the staging folder holds N block files after this process wrote one; blocks
taken over from the previous version count) or before-link-swap (the complete
object folder is in place, the name's link not yet swapped) makes the writer wait there until the file named by
STARQA_TEST_RESUME_FILE exists, for at most 120 s.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from starqa.store.context_kv import EncodedBlock
from starqa.errors import StarqaError, UsageError, one_line
from starqa.store.kv_quant import storage_dtype
from starqa.store.root import default_store_root, store_root  # noqa: F401  (default_store_root: re-exported)

MANIFEST_FORMAT = 1
HISTORY_LENGTH = 5  # versions of a document whose sizes and reuse counts its manifest keeps ("history")
_NAME_MAX = 100
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_PAUSE_ENV, _RESUME_ENV = "STARQA_TEST_PAUSE_AT", "STARQA_TEST_RESUME_FILE"


def validate_name(name: str) -> str:
    if not name:
        raise UsageError("document name is empty: pass --name")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > _NAME_MAX:  # in bytes: file names are limited in bytes, and ours get a suffix of up to 40 bytes
        if size == len(name):
            raise UsageError(f"document name is {size} characters long; use at most {_NAME_MAX}")
        raise UsageError(f"document name is {size} bytes long in UTF-8 ({len(name)} characters); use at most "
                         f"{_NAME_MAX} bytes")
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
    return cleaned.encode("utf-8", "surrogateescape")[:_NAME_MAX].decode("utf-8", "ignore")  # whole characters


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


def _copy_new_file(source: Path, target: Path) -> None:
    """Copy into a file that must not exist yet (O_EXCL: never into an existing file, which may be a hard link)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    with os.fdopen(fd, "wb") as handle, source.open("rb") as original:
        shutil.copyfileobj(original, handle, 1 << 20)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, data) -> None:
    _write_bytes(path, json.dumps(data, indent=2, ensure_ascii=False).encode())


def _replace_json(path: Path, data) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        _write_json(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python's own I/O, or safetensors' Rust writer saying the same in words."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(sign in text for sign in ("No space left on device", "Disk quota exceeded",
                                         f"os error {errno.ENOSPC})", f"os error {errno.EDQUOT})"))


def _test_pause(point: str) -> None:
    if os.environ.get(_PAUSE_ENV) != point:
        return
    resume = os.environ.get(_RESUME_ENV, "")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (resume and os.path.exists(resume)):
        time.sleep(0.05)


def _lock_for(root: Path, name: str) -> FileLock:
    return FileLock(str(root / "locks" / f"{name}.lock"), mode=_FILE_MODE)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames, new files), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reingest_hint(doc: "StoredDocument") -> str:
    source = doc.manifest.get("source", {}).get("path") or "SOURCE"
    return f"re-ingest it: starqa ingest {shlex.quote(source)} --name {shlex.quote(doc.name)} --force"


@dataclass
class StoredDocument:
    name: str
    path: Path  # the object folder the name links to
    manifest: dict

    @property
    def blocks(self) -> list[dict]:
        return self.manifest["blocks"]

    @property
    def kv_dtype(self) -> str:
        """The stored KV's precision (documents stored before --kv-dtype existed hold their compute dtype)."""
        return self.manifest.get("kv_dtype") or self.manifest["dtype"]

    @property
    def kv_bytes_per_token(self) -> float:
        return self.manifest["kv_bytes"] / max(1, self.manifest["context_tokens"])

    def text(self) -> str:
        return self._read("text.txt")

    def pages(self) -> list[dict]:
        return json.loads(self._read("pages.json"))

    def context_ids(self) -> list[int]:
        try:
            return safetensors_load(self._read_bytes("context_ids.safetensors"))["ids"].tolist()
        except SafetensorError as exc:  # the checksum matched, so the file was written this way
            raise self.read_error("context_ids.safetensors", exc) from None

    def current(self) -> bool:
        """Whether the name still links to this version (the store's layout: root/documents/NAME -> objects/X)."""
        link = self.path.parent.parent / "documents" / self.name
        return self.path.exists() and link.resolve() == self.path

    def _read(self, relative: str) -> str:
        data = self._read_bytes(relative)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.read_error(relative, exc) from None

    def _read_bytes(self, relative: str) -> bytes:
        """A small stored file's bytes, checked against the manifest's size and SHA-256 (they are read whole)."""
        try:
            data = (self.path / relative).read_bytes()
        except OSError as exc:
            raise self.read_error(relative, exc) from None
        expected = self.manifest["files"][relative]
        if len(data) != expected["size"]:
            raise self.damaged(f"{relative} has {len(data)} bytes, expected {expected['size']}")
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise self.damaged(f"{relative} does not match its checksum")
        return data

    def damaged(self, what: str) -> StarqaError:
        return StarqaError(f"document '{self.name}' is damaged: {what}; {reingest_hint(self)}")

    def read_error(self, relative: str, exc: BaseException) -> StarqaError:
        """The error for a file of this version that cannot be read: replaced by another process, or damaged."""
        if not self.current():  # `ingest --force` or `rm` of this name ran after the manifest was read
            return DocumentReplaced(f"document '{self.name}' was replaced or removed by another starqa process "
                                    "while it was being read; try again")
        return self.damaged(f"{relative} cannot be read ({one_line(exc, 120)})")


def block_file_name(index: int) -> str:
    return f"blocks/block_{index:05d}.safetensors"


def read_block_file(path: Path, device: torch.device | str = "cpu") -> tuple[list, list, list, list]:
    """A block file's tensors per layer: (keys, values, key scales, value scales); the scales are empty lists
    unless the KV is int8. Raises OSError or SafetensorError for a file that cannot be read."""
    keys, values, key_scales, value_scales = [], [], [], []
    with safe_open(path, framework="pt", device=str(device)) as handle:
        names = set(handle.keys())
        layer = 0
        while f"layers.{layer}.key" in names:
            keys.append(handle.get_tensor(f"layers.{layer}.key"))  # [kv_heads, tokens, head_dim]
            values.append(handle.get_tensor(f"layers.{layer}.value"))
            if f"layers.{layer}.key_scale" in names:
                key_scales.append(handle.get_tensor(f"layers.{layer}.key_scale"))
                value_scales.append(handle.get_tensor(f"layers.{layer}.value_scale"))
            layer += 1
    return keys, values, key_scales, value_scales


def write_block_file(staging: Path, block: EncodedBlock) -> None:
    """One block's KV for every layer, in its stored precision (int8 with its scales, see starqa.store.kv_quant); any
    rank may write its blocks into the staging folder of rank 0's writer."""
    tensors = {}
    for layer, (key, value) in enumerate(zip(block.keys, block.values)):
        tensors[f"layers.{layer}.key"] = key.detach().to("cpu").contiguous()  # [kv_heads, tokens, head_dim]
        tensors[f"layers.{layer}.value"] = value.detach().to("cpu").contiguous()
        if block.key_scales is not None:
            tensors[f"layers.{layer}.key_scale"] = block.key_scales[layer].detach().to("cpu").contiguous()
            tensors[f"layers.{layer}.value_scale"] = block.value_scales[layer].detach().to("cpu").contiguous()
    path = staging / block_file_name(block.index)
    if os.path.lexists(path):
        # safetensors would write into the existing file, and a block taken over from the previous version is a
        # hard link to that version's file: writing here would change the version that must stay whole.
        raise StarqaError(f"block {block.index} is already in the staging folder; it is not written twice")
    save_file(tensors, str(path), metadata={"index": str(block.index), "start": str(block.start), "end": str(block.end)})
    os.chmod(path, _FILE_MODE)
    _fsync(path)
    if os.environ.get(_PAUSE_ENV, "").startswith("after-block:"):
        _test_pause(f"after-block:{sum(1 for _ in (staging / 'blocks').glob('*.safetensors'))}")


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
        _fsync(self.staging / "context_ids.safetensors")
        self._record("context_ids.safetensors")

    def take_over_block(self, previous: StoredDocument, block: dict) -> bool:
        """Put the previous version's file of `block` into this version, unchanged: a hard link (its bytes are
        shared; no store file is ever written after it is complete, so the previous version stays whole until the
        new one is published), else a copy, checked against the checksum it had. The checksum is re-used; the
        caller checked the file (`DocumentStore.intact_files`). Returns whether it was linked."""
        relative = block["file"]
        source, target = previous.path / relative, self.staging / relative
        expected = previous.manifest["files"][relative]
        try:
            os.link(source, target)
            linked = True
        except FileExistsError:
            raise
        except OSError as exc:  # another file system, no hard links there, or too many links to the file
            if _disk_full(exc):
                raise
            _copy_new_file(source, target)
            linked = False
        if not linked:
            self._record(relative)
            if self.files[relative] != {"sha256": expected["sha256"], "size": expected["size"]}:
                raise StarqaError(f"the copy of {relative} from the previous version does not match its checksum")
        self.files[relative] = {"sha256": expected["sha256"], "size": expected["size"]}
        return linked

    def record_existing_block(self, index: int, start: int, end: int, pages: Sequence[int] = (),
                              key: str | None = None, reused: bool = False) -> None:
        """Record a block file already in the staging folder: written here or by another rank, or taken over from
        the previous version (`reused`, recorded by take_over_block with the checksum it had)."""
        relative = block_file_name(index)
        if reused != (relative in self.files):
            raise StarqaError(f"block {index} was {'not ' if reused else ''}taken over from the previous version")
        if not reused:
            if not (self.staging / relative).is_file():
                raise StarqaError(f"block {index} was not written by any rank")
            self._record(relative)
        entry = {"index": index, "start": start, "end": end, "file": relative, "pages": list(pages)}
        self.blocks.append(entry if key is None else dict(entry, key=key, reused=reused))


def version_summary(manifest: dict) -> dict:
    """One line of a document's history: when a version was stored, its size and how much of it was reused."""
    blocks = len(manifest.get("blocks", []))
    return {"created": manifest.get("created"), "context_tokens": manifest.get("context_tokens"), "blocks": blocks,
            "blocks_reused": manifest.get("blocks_reused", 0), "blocks_encoded": manifest.get("blocks_encoded", blocks),
            "kv_bytes": manifest.get("kv_bytes"), "phase1_s": manifest.get("phase1_s")}


class DamagedDocument(StarqaError):
    """A stored name whose manifest cannot be read (or comes from another layout): only --force replaces it."""


class DocumentReplaced(StarqaError):
    """The name was re-ingested or removed by another process while this one read it: reading again may succeed."""


class DocumentStore:
    def __init__(self, root: Path | str | None = None) -> None:
        # Absolute and without links, so an object folder compares equal to what a document link resolves to.
        self.root = store_root(root)
        for folder in (self.root, self.root / "documents", self.root / "objects", self.root / "locks"):
            folder.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        if stat.S_IMODE(self.root.stat().st_mode) != _DIR_MODE:
            try:
                os.chmod(self.root, _DIR_MODE)
            except OSError:
                pass  # a read-only store (or someone else's) can still be read

    # ------------------------------------------------------------ reading

    def names(self) -> list[str]:
        # A writer's temporary link (".link-NAME.xxxx", see _publish) is not a document.
        return sorted(p.name for p in (self.root / "documents").iterdir()
                      if p.is_symlink() and p.exists() and not p.name.startswith("."))

    def exists(self, name: str) -> bool:
        link = self.root / "documents" / name
        return link.is_symlink() and link.exists()

    def object_path(self, name: str) -> Path:
        """The object folder a stored name links to; a usage error (with close names) if nothing is stored."""
        validate_name(name)
        link = self.root / "documents" / name
        if not (link.is_symlink() and link.exists()):
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `starqa list` shows what is stored"
            raise UsageError(f"no document named '{name}' in {self.root}{hint}")
        return link.resolve()

    def get(self, name: str) -> StoredDocument:
        path = self.object_path(name)
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DamagedDocument(
                f"document '{name}' has a missing or damaged manifest: re-ingest it with --force, or remove it "
                f"with starqa rm {shlex.quote(name)}"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise DamagedDocument(f"document '{name}' was stored by an incompatible starqa version: re-ingest it "
                                  "with --force")
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
                status = path.stat()
            except FileNotFoundError as exc:
                if not doc.current():  # `ingest --force` or `rm` of this name ran meanwhile
                    raise doc.read_error(relative, exc) from None
                raise doc.damaged(f"{relative} is missing") from None
            if status.st_size != expected["size"]:
                raise doc.damaged(f"{relative} has {status.st_size} bytes, expected {expected['size']}")
            stamp = [status.st_size, status.st_mtime_ns]
            if full or checks.get(relative) != stamp:
                try:
                    digest = sha256_file(path)
                except OSError as exc:  # removed (or unreadable) since its size was checked
                    raise doc.read_error(relative, exc) from None
                if digest != expected["sha256"]:
                    raise doc.damaged(f"{relative} does not match its checksum")
                checks[relative] = stamp
                changed = True
        if changed:
            try:
                _replace_json(checks_path, checks)
            except OSError:
                pass  # a read-only store still answers; it just re-hashes next time

    def load_blocks(self, doc: StoredDocument, indices: Sequence[int], device: torch.device | str = "cpu",
                    ) -> Iterator[EncodedBlock]:
        """The blocks' KV as stored (their precision: the manifest's kv_dtype), each checked before it is read."""
        by_index = {block["index"]: block for block in doc.blocks}
        self.check_files(doc, only=[by_index[i]["file"] for i in indices])
        wanted = storage_dtype(doc.kv_dtype)
        for index in indices:
            block = by_index[index]
            try:
                keys, values, key_scales, value_scales = read_block_file(doc.path / block["file"], device)
            except (OSError, SafetensorError) as exc:  # checked a moment ago: changed or removed since
                raise doc.read_error(block["file"], exc) from None
            if not keys or keys[0].dtype != wanted or bool(key_scales) != (wanted == torch.int8):
                found = keys[0].dtype if keys else "no"
                raise doc.damaged(f"{block['file']} holds {found} KV, but the manifest says {doc.kv_dtype}")
            yield EncodedBlock(index=index, start=block["start"], end=block["end"], keys=keys, values=values,
                               key_scales=key_scales or None, value_scales=value_scales or None)

    def intact_files(self, doc: StoredDocument, relatives: Collection[str]) -> set[str]:
        """Those of `relatives` that match the manifest: their size, and their SHA-256 unless checks.json vouches
        for their (size, mtime). Unlike check_files it writes nothing: it is asked about a version being replaced,
        which must stay exactly as it is until the new one is published."""
        try:
            checks = json.loads((doc.path / "checks.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            checks = {}
        intact = set()
        for relative in relatives:
            expected = doc.manifest["files"].get(relative)
            try:
                status = (doc.path / relative).stat()
                if expected is None or status.st_size != expected["size"]:
                    continue
                if (checks.get(relative) == [status.st_size, status.st_mtime_ns]
                        or sha256_file(doc.path / relative) == expected["sha256"]):
                    intact.add(relative)
            except OSError:
                continue
        return intact

    # ------------------------------------------------------------ writing

    @contextmanager
    def lock(self, name: str, *, timeout: float = 600.0, on_wait=None):
        lock = _lock_for(self.root, name)
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
    def writing(self, name: str, manifest: dict, previous: StoredDocument | None = None) -> Iterator[DocumentWriter]:
        """Stage a document; on normal exit write its manifest and publish it atomically. Caller holds lock(name).

        `previous`: the version this one replaces (read under the lock), whose history it continues. Leftovers of
        earlier, killed writers are removed first. On any failure the staging folder is removed and the store is as
        it was; running out of disk space is reported as such.
        """
        validate_name(name)
        self.collect_garbage(held={name})
        object_name = f"{name}.{uuid.uuid4().hex[:12]}"
        staging = self.root / "objects" / f".tmp-{object_name}.{os.getpid()}"
        try:
            staging.mkdir(mode=_DIR_MODE)
        except OSError as exc:
            if _disk_full(exc):
                raise self._disk_full_error(name) from None
            raise
        try:
            writer = DocumentWriter(staging)
            yield writer
            manifest = dict(manifest, format=MANIFEST_FORMAT, name=name, files=writer.files,
                            blocks=sorted(writer.blocks, key=lambda block: block["index"]),
                            kv_bytes=sum(f["size"] for r, f in writer.files.items() if r.startswith("blocks/")),
                            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            manifest.update(_continued_history(manifest, previous))
            _write_json(staging / "manifest.json", manifest)
            checks = {rel: [(staging / rel).stat().st_size, (staging / rel).stat().st_mtime_ns] for rel in writer.files}
            _write_json(staging / "checks.json", checks)
            _fsync(staging / "blocks")
            _fsync(staging)
            final = self.root / "objects" / object_name
            os.rename(staging, final)
            staging = final  # from here a failure before the link swap leaves an unlinked object: remove it too
            _test_pause("before-link-swap")
            self._publish(name, final)
        except BaseException as exc:
            if not (self.root / "documents" / name).resolve() == staging:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, Exception) and _disk_full(exc):
                raise self._disk_full_error(name) from None
            raise

    def _disk_full_error(self, name: str) -> StarqaError:
        return StarqaError(f"no space left on device while writing document '{name}' into {self.root}; nothing was "
                           "stored: free some space (starqa gc, starqa rm NAME) and try again")

    def _publish(self, name: str, target: Path) -> None:
        link = self.root / "documents" / name
        previous = link.resolve() if link.is_symlink() else None
        temporary_link = self.root / "documents" / f".link-{name}.{uuid.uuid4().hex[:8]}"
        try:
            os.symlink(Path("..") / "objects" / target.name, temporary_link)
            os.replace(temporary_link, link)  # the atomic moment: readers see the old or the new document
        except BaseException:
            temporary_link.unlink(missing_ok=True)
            raise
        _fsync(link.parent)
        if previous is not None and previous != target and previous.exists():
            shutil.rmtree(previous, ignore_errors=True)

    def remove(self, name: str) -> int:
        """Remove a document completely (its link, then its folder), even a damaged one; returns the bytes freed."""
        self.object_path(name)
        with self.lock(name):
            path = self.object_path(name)  # the link may have been swapped by a writer we waited for
            freed = _tree_size(path)
            (self.root / "documents" / name).unlink()
            _fsync(self.root / "documents")
            shutil.rmtree(path, ignore_errors=True)
            self.collect_garbage(held={name})
        return freed

    def _linked_objects(self) -> set[Path]:
        """Object folders a document name links to (a writer's temporary link does not count)."""
        return {p.resolve() for p in (self.root / "documents").iterdir()
                if p.is_symlink() and not p.name.startswith(".link-")}

    def collect_garbage(self, *, held: Collection[str] = ()) -> tuple[int, int]:
        """Remove what interrupted or killed writers left: staging folders, objects that no name links to,
        temporary and dangling links. Returns (items removed, bytes freed).

        Each item is removed only under its document name's lock (every writer holds it for as long as its
        staging folder or unlinked object exists), so a live writer's work is never touched; a staging folder
        whose pid is another live process is kept as well. `held`: names whose lock the caller already holds.
        """
        documents, objects = self.root / "documents", self.root / "objects"
        candidates: list[tuple[str, Path]] = []  # (document name, path)
        for link in documents.iterdir():
            if link.name.startswith(".link-"):
                candidates.append((link.name[len(".link-"):].rsplit(".", 1)[0], link))
            elif link.is_symlink() and not link.exists():
                candidates.append((link.name, link))
        linked_now = self._linked_objects()
        for path in objects.iterdir():
            if path.resolve() in linked_now:
                continue
            if path.name.startswith(".tmp-"):
                stem, _, pid = path.name[len(".tmp-"):].rpartition(".")
                if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
                    continue
                candidates.append((stem.rsplit(".", 1)[0], path))
            else:
                candidates.append((path.name.rsplit(".", 1)[0], path))
        removed = freed = 0
        for name, path in candidates:
            lock = None
            if name not in held:
                lock = _lock_for(self.root, name)
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    continue  # a writer of that name is at work
            try:
                if path.parent == objects:
                    if path.resolve() in self._linked_objects():
                        continue
                    size = _tree_size(path) if path.is_dir() else path.lstat().st_size
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                elif path.name.startswith(".link-") or not path.exists():
                    size = 0
                    path.unlink(missing_ok=True)
                else:
                    continue
                if not os.path.lexists(path):
                    removed += 1
                    freed += size
            finally:
                if lock is not None:
                    lock.release()
        models = self.root / "models"
        for path in models.glob(".tmp-*") if models.is_dir() else ():
            # An interrupted GGUF conversion (starqa.model.resolve): its lock is held while a conversion runs.
            lock = FileLock(str(models / f"{path.name[len('.tmp-'):].rsplit('-', 1)[0]}.lock"), mode=_FILE_MODE)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                size = _tree_size(path)
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed += 1
                    freed += size
            finally:
                lock.release()
        return removed, freed


def _continued_history(manifest: dict, previous: StoredDocument | None) -> dict:
    """The new version's place in its name's history: its number, when the name was first stored, and the last
    HISTORY_LENGTH versions (newest first; a version stored before starqa kept a history counts as one)."""
    if previous is None:
        return {"version": 1, "first_created": manifest["created"], "history": [version_summary(manifest)]}
    old = previous.manifest
    earlier = old.get("history") or [version_summary(old)]
    return {"version": old.get("version", 1) + 1, "first_created": old.get("first_created") or old.get("created"),
            "history": [version_summary(manifest), *earlier][:HISTORY_LENGTH]}


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
