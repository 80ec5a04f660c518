"""Running the real `starqa` command in a subprocess, as users and scripts do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def starqa(*args: str, home: Path, timeout: float = 300, env: dict | None = None, stdin: str | None = None):
    environment = dict(os.environ, STARQA_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    environment.pop("NO_COLOR", None)
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "starqa", *args], capture_output=True, text=True, timeout=timeout,
                          env=environment, cwd=REPO, input=stdin)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the store (but its lock files, converted models and the audit log) with its bytes:
    'byte-for-byte unchanged' checks. The audit log is left out because a refused ask is recorded too (appended,
    never rewriting a record: tests/test_audit.py checks the log itself)."""
    if not root.exists():
        return {}
    snapshot = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if relative.startswith(("locks", "models", "audit")):
            continue
        if path.is_symlink():
            snapshot[relative] = os.readlink(path).encode()
        elif path.is_file():
            snapshot[relative] = path.read_bytes()
    return snapshot
