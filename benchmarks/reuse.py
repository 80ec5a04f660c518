"""Benchmark (not a test): what `ingest --update` costs next to a fresh ingest of the same new file.

A ~5K-token document (the sample contract's words) is stored; ~20 % more text is appended to it, and the new file is
stored two ways per round: fresh (under a name with no earlier version: every block runs Phase 1) and by
`--update` over the stored first version (only the last, partial block and the new ones run Phase 1). The order
alternates between rounds, and the ratios come from the medians, since a shared machine is noisy. Both run in this
one process through `starqa.engine.ingest.ingest` (what `starqa ingest` calls) with one loaded engine, so neither pays
starting Python or loading the model, and the first forward pass (slow in a new process) is spent on a warm-up.
Phase 1 is timed twice: wall seconds (the manifest's phase1_s) and this process's CPU seconds, which other
programs on the machine disturb less. torch runs one thread by default (--threads): on a shared 2-core machine,
two threads wait at every barrier for whichever one the other programs delayed, and that waiting, not the work,
decided our first runs (2 threads: 0.46x over 5 rounds, single rounds from 0.23x to 0.74x). Between rounds the
document goes back to the first version with `--update` (one block re-encoded, not timed). Last,
`starqa ingest --update` runs as a command on the unchanged file: no extraction, no Phase 1.

    .venv/bin/python benchmarks/reuse.py --tokens 5000 --append 0.2 --block-size 512 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def document_text(words: list[str], first: int, count: int) -> str:
    """`count` words from word `first` on, 12 to a line (the contract's words, cycled)."""
    chosen = [words[(first + i) % len(words)] for i in range(count)]
    return "\n".join(" ".join(chosen[i:i + 12]) for i in range(0, len(chosen), 12)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=5000, help="context tokens of the first version (approx.)")
    parser.add_argument("--append", type=float, default=0.2, help="text appended, as a share of the first version")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--home", type=Path, default=None, help="store to use (default: a new temporary one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for Phase 1")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    import starqa.engine.ingest
    from starqa import report
    from starqa.config import load_settings
    from starqa.engine.star_engine import StarEngine
    from starqa.store.document_store import DocumentStore

    home = args.home or Path(tempfile.mkdtemp(prefix="starqa-bench-reuse-"))
    settings = load_settings(None, block_size=args.block_size, store=str(home), device="cpu")
    report.set_quiet(True)
    engine = StarEngine.from_settings(settings)  # converts the bundled model into the store on first use
    store = DocumentStore(home)
    for name in ("warm-up", "doc", "fresh"):  # left by an interrupted run in the same store
        if store.exists(name):
            store.remove(name)
    phase1_cpu: list[float] = []
    phase1 = starqa.engine.ingest._phase1

    def phase1_with_cpu_time(*positional, **named):  # the same Phase 1, its CPU seconds noted
        started = time.process_time()
        try:
            return phase1(*positional, **named)
        finally:
            phase1_cpu.append(time.process_time() - started)

    starqa.engine.ingest._phase1 = phase1_with_cpu_time

    def ingest(path: Path, name: str, **options):
        phase1_cpu.clear()
        result = starqa.engine.ingest.ingest(str(path), settings, engine, store, name=name, **options)
        return result, sum(phase1_cpu)

    folder = Path(tempfile.mkdtemp(prefix="starqa-bench-reuse-docs-"))
    words = (REPO / "samples" / "contract.txt").read_text(encoding="utf-8").split()
    first_words = int((args.tokens - 50) / 1.54)  # ~1.54 tokens per word here, after the prompt's ~50
    v1, v2 = folder / "v1.txt", folder / "v2.txt"
    v1.write_text(document_text(words, 0, first_words), encoding="utf-8")
    v2.write_text(v1.read_text(encoding="utf-8") + document_text(words, first_words, int(first_words * args.append)),
                  encoding="utf-8")

    ingest(v1, "warm-up")  # the first forward pass of a process is slow: not part of either figure
    store.remove("warm-up")
    first, _ = ingest(v1, "doc")
    print(f"cpu cores {os.cpu_count()}, torch threads {torch.get_num_threads()}; {engine.model_name}, "
          f"{engine.dtype}; block size {args.block_size} (anchor = block); store {home}", flush=True)
    fresh_wall, fresh_cpu, update_wall, update_cpu = [], [], [], []
    for round_number in range(args.rounds):
        for step in (("fresh", "update") if round_number % 2 == 0 else ("update", "fresh")):
            if step == "fresh":
                result, cpu = ingest(v2, "fresh")
                assert result.blocks_reused == 0
                fresh_wall.append(result.phase1_s)
                fresh_cpu.append(cpu)
                store.remove("fresh")
            else:
                result, cpu = ingest(v2, "doc", update=True)
                update_wall.append(result.phase1_s)
                update_cpu.append(cpu)
                reused, encoded = result.blocks_reused, result.blocks_encoded
                new_tokens = result.document.manifest["context_tokens"]
                ingest(v1, "doc", update=True)  # back to the first version: its last block encoded again
        print(f"round {round_number + 1}: Phase 1 fresh {fresh_wall[-1]:.2f} s (CPU {fresh_cpu[-1]:.2f} s), "
              f"--update {update_wall[-1]:.2f} s (CPU {update_cpu[-1]:.2f} s; {reused} blocks reused, "
              f"{encoded} encoded)", flush=True)

    ingest(v2, "doc", update=True)
    stored = store.get("doc").manifest
    env = dict(os.environ, STARQA_HOME=str(home), PYTHONPATH=str(REPO))
    started = time.perf_counter()
    command = subprocess.run([sys.executable, "-m", "starqa", "ingest", str(v2), "--name", "doc", "--update",
                              "--block-size", str(args.block_size), "--device", "cpu"],
                             capture_output=True, text=True, env=env, cwd=REPO)
    unchanged_wall = time.perf_counter() - started
    assert command.returncode == 0 and "is unchanged" in command.stderr, command.stderr
    assert store.get("doc").manifest["created"] == stored["created"]  # no new version was written

    median = statistics.median
    context = first.document.manifest["context_tokens"]
    print(f"\nfirst version {context:,} context tokens; appended to {new_tokens:,} "
          f"(+{(new_tokens - context) / context:.0%}); {reused} of {reused + encoded} blocks reused; "
          f"medians of {args.rounds} rounds:")
    print(f"  Phase 1, wall: fresh {median(fresh_wall):.2f} s, --update {median(update_wall):.2f} s: "
          f"{median(update_wall) / median(fresh_wall):.2f}x")
    print(f"  Phase 1, CPU:  fresh {median(fresh_cpu):.2f} s, --update {median(update_cpu):.2f} s: "
          f"{median(update_cpu) / median(fresh_cpu):.2f}x")
    print(f"  `starqa ingest --update` on the unchanged file: {unchanged_wall:.1f} s for the whole command "
          f"(one line: {command.stderr.strip().splitlines()[-1]!r}; no extraction, no Phase 1)")


if __name__ == "__main__":
    main()
