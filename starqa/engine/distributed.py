"""Several processes (GPUs, or CPU processes with gloo) under torch.distributed, launched by torchrun.

- `launch`: with --nproc N > 1 and no torchrun environment, starqa re-launches its own command line under torch's
  elastic launcher (what `torchrun --standalone` runs) and turns a failed rank into one clear line.
- `Ranks`: this process's place: rank, world size, device, the process group; a single process is world size 1.
- `block_plan`: contiguous runs of blocks per rank (block 0 on rank 0).
- `merge_across_ranks`: Phase 2's only communication per layer: all-gather each rank's (out, lse) and merge them
  with the one `merge_attention`. KV never crosses ranks.

torch is imported inside the functions that use it: every command's exit (`exit_rank`) imports this module, and
`starqa --help` or `starqa list` should not pay the seconds torch takes to import.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from starqa.errors import StarqaError, UsageError, describe

# Seconds a collective may wait for a silent rank before every rank gives up (no hang on a dead peer).
DEFAULT_TIMEOUT_S = 600
_STATUS_DIR_ENV = "STARQA_RANK_STATUS_DIR"  # set by `launch`: ranks leave their one-line error there


class RankFailure(StarqaError):
    """Another rank failed; the error names it. Printed once, by rank 0."""


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "auto"
    group: object = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_speaker(self) -> bool:  # the one rank that writes to stdout and stderr
        return self.rank == 0

    @property
    def is_query_host(self) -> bool:  # holds the KV of the query and generated tokens
        return self.rank == self.world - 1


def requested_nproc(nproc: int | str, device: str = "auto") -> int:
    """`auto`: one process per visible GPU where the device is CUDA (auto or cuda); one for cpu or one cuda:N."""
    import torch

    if nproc == "auto":
        if device in ("auto", "cuda") and torch.cuda.is_available():
            return max(1, torch.cuda.device_count())
        return 1
    return int(nproc)


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the process group torchrun set up (or return a single-process `Ranks`)."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Ranks(device=device)
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(rank=rank, world=world, local_rank=local_rank, device=device, group=dist.group.WORLD)


def block_plan(n_blocks: int, world: int, rank: int) -> list[int]:
    """Rank r's contiguous run of block indices; earlier ranks take one extra block when it does not divide."""
    base, extra = divmod(n_blocks, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def merge_across_ranks(out: torch.Tensor, lse: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather every rank's partial attention (out, lse) for the same queries and merge them exactly."""
    import torch
    import torch.distributed as dist

    from starqa.attention import merge_attention

    world = dist.get_world_size(group)
    outs = [torch.empty_like(out) for _ in range(world)]
    lses = [torch.empty_like(lse) for _ in range(world)]
    dist.all_gather(outs, out.contiguous(), group=group)
    dist.all_gather(lses, lse.contiguous(), group=group)
    return merge_attention(list(zip(outs, lses)))


def token_from_query_host(tokens: list[int], ranks: Ranks) -> list[int]:
    """Every rank continues with the tokens the query host chose (one per question; they agree anyway; this makes
    it certain)."""
    import torch
    import torch.distributed as dist

    box = torch.tensor(tokens, dtype=torch.long, device=ranks.device if ranks.device.startswith("cuda") else "cpu")
    dist.broadcast(box, src=ranks.world - 1, group=ranks.group)
    return box.tolist()


def phase2_spread(ranks: Ranks) -> dict:
    """`StarEngine.generate`'s arguments that spread Phase 2 over the ranks (none for a single process)."""
    if not ranks.distributed:
        return {}
    return dict(keep_local=ranks.is_query_host,
                merge_across_ranks=lambda out, lse: merge_across_ranks(out, lse, ranks.group),
                sync_token=lambda tokens: token_from_query_host(tokens, ranks))


def broadcast_object(value, ranks: Ranks, src: int = 0):
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src, group=ranks.group)
    return box[0]


def gather_objects(value, ranks: Ranks) -> list:
    if not ranks.distributed:
        return [value]
    import torch.distributed as dist

    boxes = [None] * ranks.world
    dist.all_gather_object(boxes, value, group=ranks.group)
    return boxes


def agree(ranks: Ranks, what: str, error: BaseException | None) -> None:
    """A collective check-point: if any rank failed, every rank raises the same RankFailure naming it."""
    if not ranks.distributed:
        if error is not None:
            raise error
        return
    statuses = gather_objects(None if error is None else describe(error), ranks)
    for rank, status in enumerate(statuses):
        if status is not None:
            raise RankFailure(f"rank {rank} failed during {what}: {status}")


def share_outcome(ranks: Ranks, compute):
    """Run `compute()` on rank 0 only and give every rank its result, or raise its exception on every rank."""
    if not ranks.distributed:
        return compute()
    outcome = None
    if ranks.is_speaker:
        try:
            outcome = ("ok", compute())
        except StarqaError as exc:
            outcome = ("error", exc)
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            outcome = ("error", RankFailure(f"rank 0 failed: {describe(exc)}"))
    kind, value = broadcast_object(outcome, ranks)
    if kind == "error":
        raise value
    return value


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        ranks.group = None  # our reference would keep the C++ process group alive past destroy
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a torchrun rank without interpreter finalization (returns at once in a single process).

    Finalization can still find gloo's C++ worker threads touching Python objects; on Python 3.11 such a thread is
    killed by pthread_exit, and its forced unwind through C++ aborts the whole rank ("terminate called without an
    active exception", exit by SIGABRT) after the command had succeeded. Every file and lock is closed by then.
    """
    if not under_torchrun():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing left to say
    logging.shutdown()
    os._exit(code)


def launched_rank() -> bool:
    """Whether this process is a rank that `launch` started (its launcher reports for all ranks)."""
    return bool(os.environ.get(_STATUS_DIR_ENV))


def report_rank_error(ranks: Ranks, error: BaseException) -> bool:
    """Under `launch`, leave this rank's error for the launcher; returns True when the launcher will print it."""
    status_dir = os.environ.get(_STATUS_DIR_ENV)
    if not status_dir:
        return False
    message = describe(error) if isinstance(error, RankFailure) else f"rank {ranks.rank}: {describe(error)}"
    (Path(status_dir) / f"rank-{ranks.rank}.err").write_text(message)
    return True


def launch(nproc: int, argv: list[str], device: str = "auto") -> int:
    """Run `python -m starqa ARGV` on nproc local processes, as torchrun --standalone would; returns the exit code."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    uses_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if nproc > 1 and uses_cuda and torch.cuda.device_count() < nproc:
        raise UsageError(f"--nproc {nproc} asks for more processes than the {torch.cuda.device_count()} visible GPUs")
    # The elastic agent logs at length; the user gets one line from us instead.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    status_dir = Path(tempfile.mkdtemp(prefix="starqa-ranks-"))
    os.environ[_STATUS_DIR_ENV] = str(status_dir)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"starqa-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "starqa", *argv)
        return 0
    except ChildFailedError as failure:
        print(f"starqa: error: {_describe_failure(failure, status_dir)}", file=sys.stderr, flush=True)
        return _failure_exit_code(failure)
    except (KeyboardInterrupt, SignalException):  # the elastic agent turns SIGINT/SIGTERM into SignalException
        print("starqa: error: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        for path in status_dir.glob("*"):
            path.unlink(missing_ok=True)
        status_dir.rmdir()
        os.environ.pop(_STATUS_DIR_ENV, None)


def _failure_exit_code(failure) -> int:
    """The lowest failed rank's own exit code (2 for a usage error, as in one process); 1 if ranks were killed."""
    codes = [process.exitcode for _, process in sorted(failure.failures.items())
             if process.exitcode is not None and process.exitcode > 0]
    return codes[0] if codes else 1


def _describe_failure(failure, status_dir: Path) -> str:
    messages = {int(p.stem.split("-")[1]): p.read_text().strip() for p in status_dir.glob("rank-*.err")}
    if messages:
        return messages[min(messages)]  # every rank that saw a failure names the rank it came from
    rank, process = min(failure.failures.items())
    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"rank {rank} was killed by {name}{hint}; the other ranks were stopped"
    return f"rank {rank} exited with code {code}; the other ranks were stopped"
