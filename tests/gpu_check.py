"""The one-call GPU check: what a lent GPU machine must run, as one command that ends within 8 minutes.

    python3 tests/gpu_check.py [--out DIR]     # DIR: $GPU_CHECK_OUT, else gpu-check-out/ (make gpu-check-device)

It runs with whatever python3 it is given (on the bare GPU machine: the image's, with the carried wheels of .whl/ on
PYTHONPATH; see docs/gpu.md) and needs no network, no venv and no install of starqa (its processes
get the repository root on PYTHONPATH, and TRITON_INTERPRET removed). Steps, each with its own time budget:

1. preflight (about 15 s): CUDA visible to torch, Triton installed, starqa's requirements met (torch, transformers,
   triton are required; the others are listed). Anything missing stops the check at once, exit 2: a CPU-only torch,
   or the image's transformers 5.17 without the carried 5.24 wheel.
2. tests/test_gpu.py under pytest with STARQA_GPU_CHECK=1, so a missing GPU is a collection error rather than 125
   skips and exit 0; parallel workers when pytest-xdist is there (Triton compiles each kernel variant once per
   process, and the compiles dominate). A skip fails the check, except the tests that need two GPUs: they are
   listed as not run.
3. benchmarks/attention.py --device cuda: the kernels against SDPA on Llama-3-8B shapes; a failed Triton row fails
   the check, a refused SDPA row is only reported.

Written to DIR: gpu-check.log (all output), gpu-check.json (every step's outcome and the figures: versions, the
kernels' worst error per dtype against the float64 reference, registers and spills per compiled kernel, the
benchmark rows), test_gpu.xml (JUnit), benchmark.json. Exit 0 only if every step passed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Seconds per step; with the wheels' install before it (about 20 s) the whole command stays under 8 minutes.
BUDGET_S = {"preflight": 60, "test_gpu": 270, "benchmark": 120}
REQUIRED = ("torch", "transformers", "triton")  # what the steps import; a mismatch there stops the check
MULTI_GPU_REASON = "needs 2 GPUs"  # tests/test_gpu.py's only accepted skip


class Check:
    """The log (stdout and DIR/gpu-check.log) and the JSON report, written after every step."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out_dir / "gpu-check.log", "w", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.report: dict = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "host": platform.node(), "steps": []}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log_file.write(text + "\n")
        self.log_file.flush()

    def step(self, name: str, status: str, seconds: float, **details) -> None:
        self.report["steps"].append({"name": name, "status": status, "seconds": round(seconds, 1),
                                     "budget_s": BUDGET_S[name], **details})
        self.say(f"== {name}: {status} ({seconds:.0f} s of {BUDGET_S[name]} s)")
        self.save()

    def save(self) -> None:
        (self.out_dir / "gpu-check.json").write_text(json.dumps(self.report, indent=1) + "\n")

    def run(self, name: str, command: list[str], env: dict[str, str]) -> tuple[int | None, float]:
        """Run `command`, its output into the log as it comes; killed (with its children) at the step's budget.
        Returns (exit code, or None if killed; seconds)."""
        self.say(f"== {name}: {' '.join(command)}")
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", start_new_session=True)
        killed = threading.Event()

        def kill_at_budget() -> None:
            if process.poll() is None:
                killed.set()
                os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(BUDGET_S[name], kill_at_budget)
        timer.start()
        try:
            for line in process.stdout:
                self.say(line.rstrip("\n"))
            process.wait()
        finally:
            timer.cancel()
        seconds = time.monotonic() - started
        if killed.is_set():
            self.say(f"== {name}: killed at its budget of {BUDGET_S[name]} s")
            return None, seconds
        return process.returncode, seconds

    def finish(self, ok: bool) -> int:
        self.report["passed"] = ok
        self.save()
        self.say("")
        self.say(f"{'step':12s} {'status':40s} {'seconds':>8s}")
        for step in self.report["steps"]:
            self.say(f"{step['name']:12s} {step['status'][:40]:40s} {step['seconds']:8.0f}")
        self.say(f"GPU CHECK {'PASSED' if ok else 'FAILED'}; report: {self.out_dir / 'gpu-check.json'}")
        self.log_file.close()
        return 0 if ok else 1


def child_env(out_dir: Path) -> dict[str, str]:
    env = dict(os.environ, STARQA_GPU_CHECK="1", GPU_CHECK_OUT=str(out_dir), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the kernels must be compiled
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(path + ([str(REPO)] if str(REPO) not in path else []))
    return env


def requirements_table() -> list[dict]:
    """starqa's requirements (pyproject.toml) against what this python has."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    text = (REPO / "pyproject.toml").read_text()
    block = text[text.index("dependencies = [") : text.index("]", text.index("dependencies = ["))]
    rows = []
    for spec in re.findall(r'^\s*"([^"]+)"', block, flags=re.MULTILINE):
        try:
            from packaging.requirements import Requirement

            requirement = Requirement(spec)
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            name, specifier = requirement.name, requirement.specifier
        except ImportError:  # no packaging: names only
            name, specifier = re.split(r"[<>=!~; ]", spec, maxsplit=1)[0], None
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        ok = installed is not None and (specifier is None or specifier.contains(installed, prereleases=True))
        rows.append({"name": name, "wants": str(specifier or ""), "installed": installed, "ok": ok})
    return rows


def preflight(check: Check) -> bool:
    started = time.monotonic()
    problems, facts = [], {"python": sys.version.split()[0], "executable": sys.executable}
    if os.environ.get("TRITON_INTERPRET") == "1":
        check.say("note: TRITON_INTERPRET=1 is set here; the check's own processes run without it")
    try:
        import torch
    except ImportError as error:
        problems.append(f"torch does not import: {error}")
    else:
        facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                     gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if not torch.cuda.is_available():
            problems.append(f"CUDA is not available to torch {torch.__version__} (built for CUDA "
                            f"{torch.version.cuda}): this check needs a GPU")
        else:
            facts["devices"] = []
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                facts["devices"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                                         "memory_gib": round(props.total_memory / 2**30, 1),
                                         "multiprocessors": props.multi_processor_count})
    if importlib.util.find_spec("triton") is None:
        problems.append("triton is not installed")
    facts["requirements"] = requirements_table()
    for row in facts["requirements"]:
        if not row["ok"] and row["name"] in REQUIRED:
            problems.append(f"{row['name']} {row['installed'] or 'missing'} does not meet {row['wants']!r}"
                            + (" (the image's transformers is too old: carry .whl/, see docs/gpu.md)"
                               if row["name"] == "transformers" else ""))
    facts["pytest_xdist"] = importlib.util.find_spec("xdist") is not None
    facts["pytest_timeout"] = importlib.util.find_spec("pytest_timeout") is not None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    check.report["preflight"] = facts
    for key in ("python", "torch", "torch_cuda", "gpus", "devices", "nvidia_smi", "pytest_xdist"):
        check.say(f"{key}: {facts.get(key)}")
    for row in facts["requirements"]:
        check.say(f"  {row['name']:14s} {row['wants']:14s} {str(row['installed']):14s} {'ok' if row['ok'] else 'NO'}")
    for problem in problems:
        check.say(f"error: {problem}")
    check.step("preflight", "ok" if not problems else "failed: " + problems[0], time.monotonic() - started,
               problems=problems)
    return not problems


def junit_summary(path: Path) -> dict:
    """Counts, failures and skips of a pytest JUnit file (xdist merges its workers into one)."""
    if not path.exists():
        return {"error": "no JUnit file (pytest did not finish)"}
    summary = {"passed": 0, "failed": [], "skipped_allowed": [], "skipped_not_allowed": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            summary["failed"].append({"test": name, "message": (failure.get("message") or "")[:500]})
        elif skipped is not None:
            reason = skipped.get("message") or ""
            key = "skipped_allowed" if MULTI_GPU_REASON in reason else "skipped_not_allowed"
            summary[key].append({"test": name, "reason": reason[:300]})
        else:
            summary["passed"] += 1
    return summary


def run_gpu_tests(check: Check, env: dict[str, str]) -> bool:
    facts = check.report["preflight"]
    junit = check.out_dir / "test_gpu.xml"
    junit.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "tests/test_gpu.py",
               f"--junitxml={junit}"]
    if facts.get("pytest_xdist"):
        command += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    if facts.get("pytest_timeout"):
        command += ["--timeout", "200"]
    for stale in check.out_dir.glob("attention-errors.*.json"):
        stale.unlink()
    code, seconds = check.run("test_gpu", command, env)
    summary = junit_summary(junit)
    # The workers' measured errors: merged into the report (the files would only add to what comes back).
    worst: dict = {}
    for part in sorted(check.out_dir.glob("attention-errors.*.json")):
        for dtype, seen in json.loads(part.read_text())["worst"].items():
            before = worst.get(dtype, {"out": 0.0, "lse": 0.0, "checks": 0})
            worst[dtype] = {"out": max(before["out"], seen["out"]), "lse": max(before["lse"], seen["lse"]),
                            "checks": before["checks"] + seen["checks"]}
        part.unlink()
    check.report["attention_errors_worst"] = worst
    registers = check.out_dir / "kernel-registers.json"
    if registers.exists():
        check.report["kernel_registers"] = json.loads(registers.read_text())
        registers.unlink()
    for skip in summary.get("skipped_allowed", []):
        check.say(f"note: not run on this machine ({skip['reason']}): {skip['test']}")
    for skip in summary.get("skipped_not_allowed", []):
        check.say(f"error: skipped on a GPU: {skip['test']}: {skip['reason']}")
    for dtype, seen in worst.items():
        check.say(f"worst error vs float64, {dtype}: out {seen['out']:.3g} of its rows' scale, lse {seen['lse']:.3g} "
                  f"({seen['checks']} checks)")
    ok = code == 0 and "error" not in summary and not summary["skipped_not_allowed"] and summary["passed"] > 0
    status = ("ok" if ok else "killed at its budget" if code is None else
              summary.get("error") or f"failed: {len(summary['failed'])} failed, "
              f"{len(summary['skipped_not_allowed'])} skipped (pytest exit {code})")
    check.step("test_gpu", status, seconds, pytest_exit=code, tests=summary)
    return ok


def run_benchmark(check: Check, env: dict[str, str]) -> bool:
    figures = check.out_dir / "benchmark.json"
    figures.unlink(missing_ok=True)
    code, seconds = check.run("benchmark", [sys.executable, "benchmarks/attention.py", "--device", "cuda", "--json",
                                            str(figures)], env)
    rows = json.loads(figures.read_text())["rows"] if figures.exists() else []
    failed_triton = [row for row in rows if "error" in row and row["impl"] == "triton"]
    check.report["benchmark"] = rows
    ok = code == 0 and bool(rows) and not failed_triton
    status = ("ok" if ok else "killed at its budget" if code is None else
              f"failed: {len(failed_triton)} Triton rows failed" if failed_triton else f"failed (exit {code})")
    check.step("benchmark", status, seconds, exit=code,
               failed_rows=[f"{row['shape']} / {row['impl']}: {row['error']}" for row in rows if "error" in row])
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT") or REPO / "gpu-check-out"),
                        help="folder for the log and the figures (default: $GPU_CHECK_OUT, else gpu-check-out/)")
    args = parser.parse_args()
    out_dir = args.out.resolve()
    check = Check(out_dir)
    if not preflight(check):
        check.finish(False)
        return 2
    env = child_env(out_dir)
    tests_ok = run_gpu_tests(check, env)
    benchmark_ok = run_benchmark(check, env)
    return check.finish(tests_ok and benchmark_ok)


if __name__ == "__main__":
    sys.exit(main())
