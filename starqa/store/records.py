"""Small JSON record files in the store's models/ folder (the tokenizer check, the light tokenizer's profile, the
retrieval heads): one object of `key: outcome`, read leniently (a missing or damaged file is no record) and
written under a file lock, aside and renamed into place (several processes may record at once).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_records(path: Path) -> dict:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def record(path: Path, key: str, outcome: dict) -> None:
    """Add `key: outcome` to the JSON file at `path`: under a file lock (several processes may record), written
    aside and renamed into place."""
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with FileLock(str(path) + ".lock", timeout=30, mode=0o600):
            records = read_records(path)
            records[key] = outcome
            staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            # The store's files are private (docs/store.md: what starqa guarantees): created 0600, never wider.
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(records, indent=2, sort_keys=True) + "\n")
            os.replace(staging, path)
    except (OSError, Timeout):
        pass  # a cache: without it the check only runs again
