"""An `ask` through a running `starqa serve` against one in its own process (`--no-server`): decoding speed, time to
first token and fixed cost, side by side, per model and `--weights`.

    python benchmarks/serve.py                                   # the default model, --weights auto, 6 rounds
    python benchmarks/serve.py --case smollm2-135m:auto --case qwen2.5-coder-1.5b:bfloat16 \\
        --case qwen2.5-coder-1.5b:auto --rounds 4 --home STORE

Each case starts a server holding that model with those weights, stores samples/contract.pdf with that model
(`ingest --update`: an unchanged contract is not encoded again), and asks the same question through the server and
with `--no-server`, alternately (which goes first alternates too), after one warm-up ask of each. Each ask's `--json`
object gives its decode rate (`decode_tokens_per_s`, the steps after the first token) and its time to first token
(`ttft_s`: the Phase 2 prefill of the question and the first token); both are measured by the same engine code in
the server's process and in the ask's own. The fixed cost is the rest of the command's wall time: starting Python,
importing, loading the model and the KV (in its own process), or talking to the server. Medians per mode, compared
in one run as ratios (server / in-process), so a busy machine slows both alike; the answers must be the same.

The store is new and temporary unless --home names one; a new store converts the models first (minutes for the
1.5B; once). The server and every ask inherit this environment: `OMP_WAIT_POLICY=passive python benchmarks/serve.py`
compares both with passive OpenMP waiting (see docs/serve.md, "Decoding speed").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
QUESTION = "Which law governs this agreement?"
MODES = ("server", "in-process")


def starqa(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "starqa", *args], capture_output=True, text=True, env=env, cwd=REPO)


def timed_ask(env: dict, doc: str, question: str, max_new_tokens: int, weights: str, *extra: str) -> dict:
    started = time.perf_counter()
    result = starqa("ask", "--doc", doc, question, "--json", "--max-new-tokens", str(max_new_tokens),
                    "--weights", weights, *extra, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"ask {' '.join(extra)} failed: {result.stderr}")
    if "answering here" in result.stderr and "--no-server" not in extra:
        raise SystemExit(f"the server did not answer: {result.stderr}")
    row = json.loads(result.stdout)
    rate = row["decode_tokens_per_s"]
    decode = (row["answer_tokens"] - 1) / rate if rate > 0 else 0.0
    return {"wall": wall, "ttft": row["ttft_s"], "rate": rate, "decode": decode,
            "fixed": wall - row["ttft_s"] - decode, "answer": row["answer"], "tokens": row["answer_tokens"]}


def start_server(env: dict, home: Path, model: str, weights: str) -> tuple[subprocess.Popen, dict]:
    log = open(home / "serve-bench.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "starqa", "serve", "--model", model, "--weights", weights],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 600
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(home / "serve.sock")), base_url="http://starqa") as client:
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit(f"the server did not start: {(home / 'serve-bench.log').read_text()}")
            try:
                return server, client.get("/health").json()
            except httpx.TransportError:
                time.sleep(0.2)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def measure(env: dict, home: Path, model: str, weights: str, rounds: int, max_new_tokens: int,
            question: str) -> dict:
    doc = f"contract-{model}"
    ingested = starqa("ingest", "samples/contract.pdf", "--name", doc, "--model", model, "--update", env=env)
    if ingested.returncode != 0:
        raise SystemExit(f"ingest failed: {ingested.stderr}")
    server, health = start_server(env, home, model, weights)
    try:
        for mode in MODES:  # first asks: the server reads the KV once, the OS caches the files
            timed_ask(env, doc, question, max_new_tokens, weights, *(["--no-server"] if mode == "in-process" else []))
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for round_number in range(rounds):
            for mode in MODES if round_number % 2 == 0 else reversed(MODES):
                runs[mode].append(timed_ask(env, doc, question, max_new_tokens, weights,
                                            *(["--no-server"] if mode == "in-process" else [])))
    finally:
        stop_server(server)
    medians = {mode: {key: statistics.median(row[key] for row in rows) for key in ("wall", "ttft", "rate", "fixed")}
               for mode, rows in runs.items()}
    return {"model": health.get("model", model), "dtype": health["dtype"], "weights": weights,
            "tokens": runs["server"][0]["tokens"], "medians": medians, "runs": runs,
            "answers": {row["answer"] for rows in runs.values() for row in rows}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", metavar="MODEL:WEIGHTS",
                        help="A model of the catalogue and its --weights (repeatable; default: the default model, "
                             "auto).")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--home", type=Path, help="A store to use (default: a new temporary one, removed after).")
    parser.add_argument("--question", default=QUESTION, help="The question (default: %(default)r, a 14-token answer "
                        "with the 1.5B; 'Summarise the termination clauses of this agreement.' runs to any budget).")
    args = parser.parse_args()
    cases = [tuple(case.split(":", 1)) if ":" in case else (case, "auto")
             for case in args.case or ["qwen2.5-coder-1.5b:auto"]]

    home = args.home or Path(tempfile.mkdtemp(prefix="starqa-serve-bench-"))
    env = dict(os.environ, STARQA_HOME=str(home))
    started = time.monotonic()
    try:
        results = [measure(env, home, model, weights, args.rounds, args.max_new_tokens, args.question)
                   for model, weights in cases]
    finally:
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)

    print(f"starqa ask --doc contract-MODEL {args.question!r} --json --max-new-tokens {args.max_new_tokens} --weights W "
          f"(samples/contract.pdf): through `starqa serve --model MODEL --weights W` and with --no-server, "
          f"{args.rounds} rounds alternating, medians; {time.monotonic() - started:.0f} s in all")
    print(f"{'model':20}{'weights':10}{'mode':12}{'decode tok/s':>13}{'ttft s':>9}{'wall s':>9}{'fixed s':>9}")
    failed = False
    for result in results:
        for mode in MODES:
            m = result["medians"][mode]
            print(f"{result['model']:20}{result['weights']:10}{mode:12}{m['rate']:13.2f}{m['ttft']:9.3f}"
                  f"{m['wall']:9.3f}{m['fixed']:9.3f}")
        server, alone = result["medians"]["server"], result["medians"]["in-process"]
        decode, ttft = server["rate"] / alone["rate"], server["ttft"] / alone["ttft"]
        same = len(result["answers"]) == 1
        failed |= not same
        print(f"{'':20}{'':10}{'server / in-process: decode':28} {decode:.2f}x, time to first token {ttft:.2f}x, "
              f"fixed cost {server['fixed'] / alone['fixed']:.2f}x; within 10 %: "
              f"{'yes' if abs(decode - 1) <= 0.1 and abs(ttft - 1) <= 0.1 else 'NO'}; "
              f"{result['tokens']} answer tokens, the same answer every time: "
              f"{'yes' if same else 'NO: ' + repr(result['answers'])}")
        for mode in MODES:
            rows = result["runs"][mode]
            rates = ", ".join(f"{row['rate']:.1f}" for row in rows)
            ttfts = ", ".join(f"{row['ttft']:.3f}" for row in rows)
            print(f"{'':30}{mode:12}decode tok/s per round {rates}; ttft s {ttfts}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
