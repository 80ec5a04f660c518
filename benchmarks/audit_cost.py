"""Benchmark (not a test): what the audit log adds to an ask, `audit: metadata` vs `audit: off`, in one run.

One process loads the model once, ingests samples/contract.txt into a temporary store, then answers the same
question --repeat times in each mode, alternating (off, metadata, metadata, off, ...), through the code `starqa ask`
runs (starqa.answer.ask.run with the audit hook of starqa.governance.commands). Each ask is timed around the whole call, the audit
record's append and fsync included; the process start-up of a CLI ask (several seconds) is left out, which makes
the share reported larger than a user's. Prints:

  (1) the recorder's own time per ask (watching the events, hashing, the locked append and its fsync), as a share
      of the ask's wall time: the precise figure;
  (2) the paired difference of the two modes' wall times (median ask with metadata / median ask off - 1), which
      also holds the machine's noise.

    .venv/bin/python benchmarks/audit_cost.py                       # smollm2-135m, float32, 48 new tokens
    .venv/bin/python benchmarks/audit_cost.py --model /work/gguf/qwen2.5-coder-0.5b.gguf --repeat 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
QUESTION = "Which law governs this agreement?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--store", default=None, help="STARQA_HOME to use (default: a temporary one; a GGUF model "
                        "is converted into it first)")
    parser.add_argument("--repeat", type=int, default=6, help="asks per mode")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from starqa.answer import ask as asking
    from starqa.governance import audit
    from starqa.config import load_settings
    from starqa.engine.distributed import Ranks
    from starqa.engine.star_engine import StarEngine
    from starqa.governance.commands import audited_ask
    from starqa.engine.ingest import ingest
    from starqa.store.document_store import DocumentStore

    with tempfile.TemporaryDirectory() as scratch:
        home = Path(args.store).expanduser() if args.store else Path(scratch) / "home"
        base = load_settings(None, model=args.model, dtype=args.dtype, device="cpu", store=str(home),
                             max_new_tokens=args.max_new_tokens, nproc=1)
        store = DocumentStore(home)
        print(f"loading {args.model} ({args.dtype}) and ingesting samples/contract.txt (not timed) ...", file=sys.stderr)
        engine = StarEngine.from_settings(base, None)
        if not store.exists("contract"):
            ingest(str(REPO / "samples" / "contract.txt"), base, engine, store, name="contract")

        costs: list[float] = []

        def one_ask(level: str) -> float:
            settings = dataclasses.replace(base, audit=level)
            started = time.perf_counter()

            def run(wrap):
                emit = wrap(lambda event: None)
                return asking.run(lambda model, dtype: engine, settings, store, docs=["contract"], questions=[QUESTION],
                                  attention="star", name=None, explicit_model=None, explicit_sizes=False,
                                  ranks=Ranks(), emit=emit, stream=False)

            recorder = audit.recorder(settings, who=audit.os_user(), via="cli", questions=[QUESTION],
                                      docs=["contract"], attention="star")
            code = audited_ask(recorder, run) if recorder is not None else run(lambda emit: emit)
            wall = time.perf_counter() - started
            assert code == 0
            return wall

        # the recorder's own time (AskRecorder.cost_s: its observe calls and its finish), collected at finish
        original_finish = audit.AskRecorder.finish

        def finish(self, *a, **k):
            result = original_finish(self, *a, **k)
            costs.append(self.cost_s)
            return result

        audit.AskRecorder.finish = finish
        one_ask("off")  # warm-up (page cache, first-call costs), not counted
        one_ask("metadata")
        costs.clear()
        before = sum(1 for _ in audit.records(home))
        walls: dict[str, list[float]] = {"off": [], "metadata": []}
        for index in range(args.repeat):
            for level in (("off", "metadata") if index % 2 == 0 else ("metadata", "off")):
                walls[level].append(one_ask(level))
        recorded = sum(1 for _ in audit.records(home)) - before
        audit.AskRecorder.finish = original_finish

        off, meta = statistics.median(walls["off"]), statistics.median(walls["metadata"])
        shares = [cost / wall for cost, wall in zip(costs, walls["metadata"])]
        print(f"model {args.model}, dtype {args.dtype}, {args.max_new_tokens} new tokens at most, {args.repeat} asks "
              f"per mode (alternated); {recorded} records written with metadata, none with off")
        print(f"(1) recorder time per ask: median {statistics.median(costs) * 1000:.2f} ms (max "
              f"{max(costs) * 1000:.2f} ms) = {statistics.median(shares) * 100:.3f} % of the ask's wall time "
              f"(max {max(shares) * 100:.3f} %)")
        print(f"(2) ask wall time: off median {off:.3f} s (range {min(walls['off']):.3f}-{max(walls['off']):.3f}), "
              f"metadata median {meta:.3f} s (range {min(walls['metadata']):.3f}-{max(walls['metadata']):.3f}): "
              f"ratio {meta / off:.4f} (noise included)")


if __name__ == "__main__":
    main()
