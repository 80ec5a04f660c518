"""Where the store is, without importing what reading it needs (torch, safetensors): the CLI client of a running
`starqa serve` finds the server's socket here and must not pay for those imports."""

from __future__ import annotations

import os
from pathlib import Path


def default_store_root() -> Path:
    if os.environ.get("STARQA_HOME"):
        return Path(os.environ["STARQA_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "starqa"
    return Path.home() / ".cache" / "starqa"


def store_root(configured: Path | str | None = None) -> Path:
    """The store's folder as `DocumentStore` uses it: absolute and without links (it may not exist yet)."""
    return (Path(configured).expanduser() if configured is not None else default_store_root()).resolve()
