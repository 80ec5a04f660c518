"""RULER-style benchmark of Star Attention against full attention, via `starqa eval`: the configuration
docs/performance.md reports.

    python benchmarks/ruler.py                 # docs/performance.md's run: hours on a CPU, minutes on a GPU
    python benchmarks/ruler.py --smoke         # a small version to check the set-up (a few minutes on a CPU)
    python benchmarks/ruler.py --dry-run       # print the command and exit
    python benchmarks/ruler.py -- --device cuda --model /models/Llama-3.1-8B-Instruct   # extra `starqa eval` flags

docs/performance.md's configuration: the bundled model (SmolLM2-135M-Instruct) at 2K, 4K and 8K tokens, 20 samples per task
and length, all RULER-style tasks, Star Attention with block = anchor = 1/4 of the length (as in the paper) and with
block 1024 / anchor 256. It runs the exact `starqa eval` command it prints (same code as users run), writing:

    benchmarks/results/ruler.json        the --json report
    benchmarks/results/ruler.png         accuracy and speed-up against length
    benchmarks/results/ruler-cases.jsonl per-case results; rerunning continues an interrupted run (--resume)

To stop a run and keep its report, interrupt or terminate the `starqa eval` process it started (Ctrl-C in a terminal,
or `kill` / SIGTERM: a background job started from a script ignores SIGINT); docs/performance.md's tables are then printed by
`python benchmarks/ruler_tables.py benchmarks/results/ruler.json`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

FULL_RUN = ["--suite", "ruler", "--lengths", "2048,4096,8192", "--samples", "20", "--pairs", "L/4:L/4,1024:256"]
SMOKE_RUN = ["--suite", "ruler", "--lengths", "1024", "--samples", "2", "--tasks", "niah_single_1,vt",
             "--pairs", "L/4:L/4,1024:256"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="A small run (1K tokens, 2 samples, 2 tasks).")
    parser.add_argument("--dry-run", action="store_true", help="Print the command and exit.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Folder for the results (default: %(default)s).")
    parser.add_argument("extra", nargs="*", help="More `starqa eval` flags, after `--`.")
    args = parser.parse_args()

    name = "ruler-smoke" if args.smoke else "ruler"
    report_path, plot_path, cases_path = (args.out / f"{name}.json", args.out / f"{name}.png",
                                          args.out / f"{name}-cases.jsonl")
    command = [sys.executable, "-m", "starqa", "eval", *(SMOKE_RUN if args.smoke else FULL_RUN),
               "--plot", str(plot_path), "--resume", str(cases_path), "--json", *args.extra]
    print(f"{shlex.join(command)} > {shlex.quote(str(report_path))}", flush=True)
    if args.dry_run:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    partial = report_path.with_name(report_path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        code = subprocess.call(command, stdout=out, cwd=REPO)
    if partial.stat().st_size:
        partial.replace(report_path)  # an interrupted run's report holds the cases finished so far
        print(f"report: {report_path}\nplot:   {plot_path}\ncases:  {cases_path} (rerun to continue)")
    else:
        partial.unlink()
    return code


if __name__ == "__main__":
    sys.exit(main())
