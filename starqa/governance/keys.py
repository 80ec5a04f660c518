"""Scoped API keys for `starqa serve` over TCP: each key has a name and the document globs it may see and ask.

    <root>/keys.json   {"format": 1, "keys": [{"name", "sha256", "docs", "created", "revoked"}]}   (0600)

A key is printed once, when it is made; the store keeps only its SHA-256. The file is replaced atomically (a
temporary file, fsync, rename) under a lock, so a server that re-reads it (whenever it changes: `KeyRing`) sees the
old set or the new one, never half of one. A revoked key stays listed (its name stays in the audit log), and
its name is not given to another key. torch-free.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from starqa.errors import StarqaError, UsageError

FILE_NAME = "keys.json"
FORMAT = 1
PREFIX = "sqk_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Key:
    name: str
    sha256: str
    docs: tuple[str, ...]
    created: str
    revoked: str | None = None

    def allows(self, document: str) -> bool:
        return any(fnmatch.fnmatchcase(document, pattern) for pattern in self.docs)

    def row(self) -> dict:
        return {"name": self.name, "docs": list(self.docs), "created": self.created, "revoked": self.revoked,
                "sha256": self.sha256}


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def keys_path(root: Path | str) -> Path:
    return Path(root) / FILE_NAME


def read_keys(root: Path | str) -> list[Key]:
    path = keys_path(root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise StarqaError(f"cannot read the key file {path} ({exc.__class__.__name__}): restore it from a backup, "
                          "or remove it and add the keys again") from None
    try:
        if data.get("format") != FORMAT:
            raise ValueError
        return [Key(entry["name"], entry["sha256"], tuple(entry["docs"]), entry["created"], entry.get("revoked"))
                for entry in data["keys"]]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise StarqaError(f"the key file {path} is not a starqa key file: restore it from a backup, or remove it "
                          "and add the keys again") from None


class _KeysLock:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __enter__(self):
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = os.open(self.root / ".keys.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _write_keys(root: Path, keys: list[Key]) -> None:
    from starqa.governance.audit import write_private_file

    data = json.dumps({"format": FORMAT, "keys": [key.row() for key in keys]}, indent=2).encode() + b"\n"
    write_private_file(keys_path(root), data)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def validate_key_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"key name {name!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")
    return name


def add_key(root: Path | str, name: str, docs: list[str]) -> str:
    """A new key for `docs` (globs over document names); returns the key itself, which is stored nowhere."""
    root = Path(root)
    validate_key_name(name)
    globs = [pattern.strip() for value in docs for pattern in value.split(",") if pattern.strip()]
    if not globs:
        raise UsageError("give the documents the key may ask: --docs 'contract-*' (a name or a glob; repeat it or "
                         "separate them with commas)")
    for pattern in globs:
        if "/" in pattern or any(ord(char) < 32 for char in pattern):
            raise UsageError(f"--docs {pattern!r} is not a document name or glob (no '/' or control characters)")
    with _KeysLock(root):
        keys = read_keys(root)
        existing = next((key for key in keys if key.name == name), None)
        if existing is not None:
            state = "was revoked" if existing.revoked else "exists"
            raise UsageError(f"a key named '{name}' {state}; give the new key another name (names stay unique so "
                             "that audit records name one key)")
        secret = PREFIX + secrets.token_urlsafe(32)
        keys.append(Key(name, key_hash(secret), tuple(globs), _now()))
        _write_keys(root, keys)
    return secret


def revoke_key(root: Path | str, name: str) -> Key:
    root = Path(root)
    with _KeysLock(root):
        keys = read_keys(root)
        key = next((key for key in keys if key.name == name), None)
        if key is None:
            known = ", ".join(key.name for key in keys if not key.revoked) or "none"
            raise UsageError(f"no key named '{name}' (keys: {known}); `starqa keys list` shows them")
        if key.revoked:
            raise UsageError(f"the key '{name}' was already revoked on {key.revoked}")
        revoked = Key(key.name, key.sha256, key.docs, key.created, _now())
        _write_keys(root, [revoked if other.name == name else other for other in keys])
    return revoked


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class KeyRing:
    """The store's keys as a server sees them: the file is read again whenever it changes (its inode, size or
    modification time), so a key added or revoked counts from the next request on. A key file that cannot be read
    lets no scoped key in (fail closed) and says so in the log once per change."""

    def __init__(self, root: Path | str, log=None) -> None:
        self.path = keys_path(root)
        self.root = Path(root)
        self.log = log
        self._lock = threading.Lock()
        self._stamp: tuple | None = ()
        self._keys: list[Key] = []

    def keys(self) -> list[Key]:
        try:
            info = os.stat(self.path)
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._keys = read_keys(self.root) if stamp is not None else []
                except StarqaError as exc:
                    self._keys = []
                    if self.log is not None:
                        self.log(f"scoped keys refused: {exc}")
                self._stamp = stamp
            return self._keys

    def active(self) -> bool:
        return any(key.revoked is None for key in self.keys())

    def lookup(self, secret: str) -> Key | None:
        """The key `secret` is (revoked ones included: the caller tells them apart), compared in constant time."""
        digest = key_hash(secret)
        found = None
        for key in self.keys():
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found
