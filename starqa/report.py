"""What starqa tells people on stderr: Rich progress bars (on a terminal only), timing and memory tables, warnings.

stdout is reserved for answers and JSON, so everything here writes to stderr. `NO_COLOR` is honoured by Rich;
`--quiet` silences all but errors. Off a terminal (a pipe, a batch job's log) every message is one plain line: no
colour, no cursor codes, no wrapping or padding; tables are drawn at a fixed wide width, titles on a line of their own.
"""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

_state = {"quiet": False}
console = Console(stderr=True, highlight=False, emoji=False)  # a name like 'notes:memo:' is printed as it is
# Columns for tables off a terminal: Rich's default there, 80, would wrap their rows; a log has no width to fit.
_LOG_WIDTH = 180


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def info(message: str) -> None:
    if not _state["quiet"]:
        console.print(message, markup=False, soft_wrap=True)


def warn(message: str) -> None:
    if not _state["quiet"]:
        console.print(f"starqa: warning: {message}", markup=False, style="yellow", soft_wrap=True)  # one line


def error(message: str) -> None:
    # Errors are printed even with --quiet; plain print keeps them on one line whatever the terminal width.
    print(f"starqa: error: {message}", file=sys.stderr, flush=True)


class _Silent:
    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass


@contextmanager
def progress():
    """A Rich progress display on a terminal; a silent stand-in in pipes, logs and with --quiet."""
    if _state["quiet"] or not console.is_terminal:
        yield _Silent()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        yield bar


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB.

    On Linux the high-water mark VmHWM, which `starqa eval` resets per mode (/proc/self/clear_refs); getrusage's
    ru_maxrss stopped following that reset part-way through long eval runs (the kernel may also keep a peak of its
    own, e.g. the one recorded when a thread exits), which left earlier, higher peaks in later records.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cuda_peak_mb(device=None) -> float | None:
    """Peak CUDA memory allocated on `device` (default: the current one), MiB; None without CUDA in use."""
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def table(title: str, rows: list[tuple[str, str]]) -> None:
    """A titled table of labels and values."""
    if _state["quiet"]:
        return
    grid = Table(show_header=False)
    grid.add_column(style="bold")
    grid.add_column(justify="right")
    for label, value in rows:
        grid.add_row(label, value)
    print_table(grid, title)


def print_table(grid: Table, title: str) -> None:
    """`title` on a line of its own, then `grid`: at the terminal's width, or off a terminal at a fixed wide one.

    The title is not the table's own: Rich wraps a table title to the table's width, padded with spaces, which in a
    log split "star attention over 'contract' (4,795 context tokens)" over two lines.
    """
    console.print(title, markup=False, style="table.title", soft_wrap=True)
    if console.is_terminal:
        console.print(grid)
        return
    width = console.width
    console.width = max(width, _LOG_WIDTH)
    try:
        console.print(grid)
    finally:
        console.width = width
