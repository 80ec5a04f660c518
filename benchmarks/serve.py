"""The fixed cost of an `ask` through a running `starqa serve` against one in its own process (`--no-server`).

    python benchmarks/serve.py                  # the default model, samples/contract.pdf, 6 rounds, a temporary store

An ask's fixed cost is its wall time (the whole `starqa ask` command, start to exit) minus the Phase 2 work it
reports in its `--json` object: the time to its first token (`ttft_s`: the prefill of the question and its first
token) and its decoding (`(answer_tokens - 1) / decode_tokens_per_s`). What remains is starting Python, importing,
loading the model and the document's KV (in its own process), or talking to the server. Both kinds of ask run
alternately (which goes first alternates too) on the same stored document and question; the medians are compared
in one run, so a busy machine slows both alike. The answers must be the same.

The store is new and temporary unless --home names one (the document is then stored with `ingest --update`: an
unchanged contract is not encoded again): a new store converts the model first (minutes for the 1.5B; once).
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


def starqa(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "starqa", *args], capture_output=True, text=True, env=env, cwd=REPO)


def timed_ask(env: dict, max_new_tokens: int, *extra: str) -> dict:
    started = time.perf_counter()
    result = starqa("ask", "--doc", "contract", QUESTION, "--json", "--max-new-tokens", str(max_new_tokens), *extra,
                    env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"ask {' '.join(extra)} failed: {result.stderr}")
    row = json.loads(result.stdout)
    rate = row["decode_tokens_per_s"]
    decode = (row["answer_tokens"] - 1) / rate if rate > 0 else 0.0
    phase2 = row["ttft_s"] + decode
    return {"wall": wall, "ttft": row["ttft_s"], "decode": decode, "phase2": phase2, "fixed": wall - phase2,
            "answer": row["answer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--home", type=Path, help="A store to use (default: a new temporary one, removed after).")
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="starqa-serve-bench-"))
    env = dict(os.environ, STARQA_HOME=str(home))
    server = None
    try:
        ingested = starqa("ingest", "samples/contract.pdf", "--name", "contract", "--update", env=env)
        if ingested.returncode != 0:
            raise SystemExit(f"ingest failed: {ingested.stderr}")
        log = open(home / "serve-bench.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "starqa", "serve"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=log)
        socket_path = home / "serve.sock"
        deadline = time.monotonic() + 300
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://starqa") as client:
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {(home / 'serve-bench.log').read_text()}")
                try:
                    health = client.get("/health").json()
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
        timed_ask(env, args.max_new_tokens)  # first asks: the server reads the KV once, the OS caches files
        timed_ask(env, args.max_new_tokens, "--no-server")

        runs: dict[str, list[dict]] = {"server": [], "in-process": []}
        for round_number in range(args.rounds):
            order = ["server", "in-process"] if round_number % 2 == 0 else ["in-process", "server"]
            for mode in order:
                runs[mode].append(timed_ask(env, args.max_new_tokens, *(["--no-server"] if mode == "in-process"
                                                                         else [])))
        answers = {run["answer"] for mode in runs for run in runs[mode]}

        print(f"starqa ask --doc contract {QUESTION!r} --json --max-new-tokens {args.max_new_tokens}: "
              f"{args.rounds} rounds, alternating; {health.get('model', 'the default model')} ({health['dtype']}, "
              f"{health['device']}), "
              "samples/contract.pdf")
        print(f"{'':12}{'wall s':>9}{'ttft s':>9}{'decode s':>10}{'fixed s':>9}   (medians; fixed = wall - ttft - "
              "decode)")
        medians = {}
        for mode, rows in runs.items():
            medians[mode] = {key: statistics.median(row[key] for row in rows)
                             for key in ("wall", "ttft", "decode", "fixed")}
            m = medians[mode]
            print(f"{mode:12}{m['wall']:9.3f}{m['ttft']:9.3f}{m['decode']:10.3f}{m['fixed']:9.3f}")
        print(f"fixed cost through the server / in its own process: "
              f"{medians['server']['fixed'] / medians['in-process']['fixed']:.2f}x; "
              f"wall time: {medians['server']['wall'] / medians['in-process']['wall']:.2f}x")
        print(f"the same answer every time: {'yes' if len(answers) == 1 else 'NO: ' + repr(answers)}")
        if len(answers) != 1:
            raise SystemExit(1)
    finally:
        if server is not None:
            server.terminate()
            server.wait(120)
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
