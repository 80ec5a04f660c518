"""The proof-of-concept report: `starqa eval --doc FILE --qa QA.jsonl --models A,B --attention star,full,hybrid
--report poc.html` (or .md; --json prints the same data).

Every model answers every question of the QA file in every mode through the real `starqa` commands, each in its
own process, so each row's peak memory is that process's own (os.wait4's ru_maxrss; one process's high-water mark
would hide the smaller modes): per model one `starqa ingest` (Phase 1 time, KV bytes on disk), then one
`starqa ask --json --no-server` per mode. Rows: accuracy with its 95 % interval (and, for star and hybrid, the paired
difference from the same model's full attention), share grounded, share answered again (hybrid), time to first
token, seconds per answer, decode speed, Phase 1 time, KV bytes, peak memory; then the answers side by side per
question with their first evidence quote; then the machine and versions. `--resume FILE` keeps each finished
(model, mode) run as a JSON line and does not run it again. With `--escalate-to MODEL`, every other model gets a
`hybrid→MODEL` row too (the target's copy of the document ingested ahead of time in its own process). This process
never imports torch.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from starqa import report
from starqa.config import AUTO_BLOCK_SIZE
from starqa.errors import StarqaError, UsageError

Z95 = 1.959964


def run(settings, *, doc, qa, suite, models, model, modes, report_path, resume, as_json, options: dict,
        escalate_to: str | None = None) -> None:
    """Check everything first (one line, exit 2), then run each model x mode and write the report. With
    `escalate_to` (a resolved model name) every other model with hybrid among the modes gets one more row,
    `hybrid→MODEL`: its ungrounded Star answers answered again by that model from its own stored copy."""
    from starqa.eval.qa_file import load_qa_file

    if suite is not None or doc is None or qa is None:
        raise UsageError("the PoC report (--models / --report) takes --doc FILE --qa QA.jsonl; not --suite")
    unsupported = [f"--{name.replace('_', '-')}" for name in ("lengths", "samples", "tasks", "anchor_size", "pairs",
                                                              "plot", "password") if options.get(name) is not None]
    if unsupported:
        raise UsageError(f"{', '.join(unsupported)} do not apply to the PoC report (--models / --report)")
    block_size = options.get("block_size")
    if block_size is not None and not (str(block_size).isdigit() or block_size == AUTO_BLOCK_SIZE):
        raise UsageError(f"--block-size for the PoC report is one number of tokens or auto (the ingest's), "
                         f"not {block_size!r}")
    if report_path is None and not as_json:
        raise UsageError("--models needs --report FILE (.html or .md) or --json")
    if report_path is not None:
        if report_path.suffix.lower() not in (".html", ".htm", ".md"):
            raise UsageError(f"--report writes .html or .md files, not {report_path.name!r}")
        if not report_path.parent.is_dir():
            raise UsageError(f"cannot write the report {report_path}: folder {report_path.parent} does not exist")
    source = Path(doc)
    if not source.is_file():
        raise UsageError(f"--doc {doc!r}: the PoC report needs the document's file (PDF, .txt or .md)")
    pairs = load_qa_file(qa)
    names = _model_list(models, model, settings)
    resolved = _check_installed(names, settings)
    target_mode = escalation_mode(escalate_to) if escalate_to is not None and "hybrid" in modes else None
    report_modes = [*modes, *([target_mode] if target_mode is not None else [])]
    log = _RunLog(resume) if resume is not None else None

    key = {"doc_sha256": _sha256(source.read_bytes()), "qa_sha256": _sha256(Path(qa).read_bytes()),
           "max_new_tokens": options.get("max_new_tokens"), "block_size": block_size, "dtype": options.get("dtype")}
    runs, previous = [], log.load() if log is not None else {}
    with tempfile.TemporaryDirectory(prefix="starqa-poc-") as scratch:
        questions_file = Path(scratch) / "questions.txt"
        questions_file.write_text("".join(pair.question + "\n" for pair in pairs), encoding="utf-8")
        for name in names:
            stored = None
            escalates = target_mode is not None and resolved[name] != escalate_to  # to itself: the hybrid row
            for mode in (report_modes if escalates else modes):
                record_key = _run_key(name, mode, key)
                if record_key in previous:
                    report.info(f"{name} / {mode}: in {log.path}, not run again")
                    runs.append(previous[record_key])
                    continue
                if stored is None:
                    stored = _ingest(name, source, settings, options)
                if mode == target_mode:
                    record = _ask_escalating(name, escalate_to, stored, source, questions_file, pairs, settings,
                                             options)
                else:
                    record = _ask(name, mode, stored, questions_file, pairs, settings, options)
                record.update(key=record_key, **key)
                runs.append(record)
                if log is not None:
                    log.append(record)
    document = build(runs, pairs, source=str(source), qa=str(qa),
                     modes=report_modes, models=names)
    if report_path is not None:
        text = markdown(document) if report_path.suffix.lower() == ".md" else to_html(document)
        report_path.write_text(text, encoding="utf-8")
        report.info(f"report written to {report_path}")
    if as_json:
        print(json.dumps(document, indent=2, ensure_ascii=False), flush=True)


# ---------------------------------------------------------------- checks


def _model_list(models: str | None, model: str | None, settings) -> list[str]:
    if models is not None and model is not None:
        raise UsageError("give --models A,B (the PoC report) or --model, not both")
    names = [part.strip() for part in (models or model or settings.model).split(",") if part.strip()]
    if not names:
        raise UsageError("--models is empty")
    return list(dict.fromkeys(names))


def _check_installed(names: list[str], settings) -> dict[str, str]:
    """Every model must resolve here without downloading (starqa.model.resolve.resolve_model), before anything runs;
    each name as given -> the name it resolves to (a folder or file: its absolute path)."""
    from starqa.model.resolve import resolve_model
    from starqa.store.root import store_root

    root = store_root(settings.store) / "models"
    resolved = {}
    for name in names:
        try:
            resolved[name] = resolve_model(name, root).name
        except StarqaError as exc:
            raise UsageError(f"model {name!r} is not installed: {exc}") from None
    return resolved


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run_key(model: str, mode: str, key: dict) -> str:
    return _sha256(json.dumps([model, mode, key], sort_keys=True).encode())[:24]


class _RunLog:
    """--resume for the PoC report: one JSON line per finished (model, mode) run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir() or not self.path.parent.is_dir():
            raise UsageError(f"--resume needs a file in an existing folder, not {self.path}")

    def load(self) -> dict[str, dict]:
        records = {}
        if self.path.exists():
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    record = json.loads(line)
                    records[record["key"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    report.warn(f"{self.path} line {number} is not a complete run; it will be run again")
        return records

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# ---------------------------------------------------------------- running the commands, one process each


def _starqa(args: list[str], settings, options: dict, what: str) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS MiB) of `starqa ARGS` in its own process; a failure is a StarqaError naming
    `what` ("MODEL: ingest") with the child's last stderr line."""
    if options.get("config") is not None:
        args = [*args, "--config", str(options["config"])]
    code, out, err, wall, peak = run_process(["-m", "starqa", *args], _child_environment(settings))
    if code != 0:
        raise StarqaError(f"{what} failed: {_last_line(err)}")
    return out, wall, peak


# Runs `python -m MODULE ARGS` and writes the process's own VmHWM (kB) to a file at exit.
# A child's ru_maxrss (os.wait4) would not do: Linux carries the parent's resident size across fork and exec into it.
_PEAK_WRAPPER = """import atexit, runpy, sys
path, target = sys.argv[1:3]
sys.argv = [target, *sys.argv[3:]]
def peak():
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith('VmHWM:'):
                with open(path, 'w') as out:
                    out.write(line.split()[1])
atexit.register(peak)
runpy.run_module(target, run_name='__main__', alter_sys=True)
"""


def run_process(python_args: list[str], environment: dict | None = None) -> tuple[int, str, str, float, float]:
    """(exit code, stdout, stderr, wall seconds, peak RSS MiB) of `python -m MODULE ...` in a process of its own:
    the peak is that process's own high-water mark (VmHWM, written by the process as it exits), not one inherited
    from this process or shared with earlier children."""
    kind, target, *rest = python_args
    if kind != "-m":
        raise ValueError(f"run_process runs a module (-m MODULE ...), not {kind!r}")
    with tempfile.NamedTemporaryFile(prefix="starqa-peak-", delete=False) as peak_file:
        peak_path = Path(peak_file.name)
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            started = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-c", _PEAK_WRAPPER, str(peak_path), target, *rest],
                                       stdout=out, stderr=err, env=environment)
            try:
                _, status, usage = os.wait4(process.pid, 0)
            except BaseException:  # Ctrl-C: the child gets it too; do not leave it behind
                process.kill()
                process.wait()
                raise
            process.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - started
            out.seek(0)
            err.seek(0)
            written = peak_path.read_text().strip()
            peak = int(written) / 1024 if written.isdigit() else usage.ru_maxrss / 1024  # kB / KiB
            return (process.returncode, out.read().decode("utf-8", "replace"),
                    err.read().decode("utf-8", "replace"), wall, peak)
    finally:
        peak_path.unlink(missing_ok=True)


def _child_environment(settings) -> dict:
    environment = dict(os.environ)
    if settings.store is not None:
        environment["STARQA_HOME"] = str(settings.store)
    return environment


def _common(settings, options: dict) -> list[str]:
    args = []
    for flag, key in (("--dtype", "dtype"), ("--device", "device")):
        if options.get(key) is not None:
            args += [flag, str(options[key])]
    if options.get("trust_remote_code"):
        args.append("--trust-remote-code")
    return args


def _decoding(options: dict) -> list[str]:
    """An ask's flags for what decoding reads, where the eval command was given them (else the config's apply)."""
    return [item for flag, key in (("--weights", "weights"), ("--activations", "activations"))
            if options.get(key) is not None for item in (flag, str(options[key]))]


def stored_name(source: Path, model: str) -> str:
    """The PoC's document name for one model: the file's stem and the model's (the store keeps one model's KV per
    name)."""
    model_stem = Path(model).stem if model.endswith(".gguf") or os.sep in model else model
    slug = re.sub(r"[^a-z0-9.]+", "-", model_stem.lower()).strip("-")[:40]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem)[:60]
    return f"{stem}-poc-{slug}"


def escalation_mode(target: str) -> str:
    """The row of hybrid answering that escalates to the model `target` (the plain `hybrid` row: to full attention)."""
    return f"hybrid→{_short(target)}"


def _ingest(model: str, source: Path, settings, options: dict, name: str | None = None) -> dict:
    name = name or stored_name(source, model)
    args = ["ingest", str(source), "--name", name, "--update", "--model", model, *_common(settings, options)]
    if options.get("block_size") is not None:
        args += ["--block-size", str(options["block_size"])]
    report.info(f"{model}: ingesting {source.name} as '{name}' (its own process)")
    _, wall, peak = _starqa(args, settings, options, f"{model}: ingest")
    out, _, _ = _starqa(["info", name, "--json"], settings, options, f"{model}: info")
    manifest = json.loads(out)
    return {"name": name, "phase1_s": manifest.get("phase1_s"), "kv_bytes": manifest.get("kv_bytes"),
            "context_tokens": manifest.get("context_tokens"), "block_size": manifest.get("block_size"),
            "dtype": manifest.get("dtype"), "kv_dtype": manifest.get("kv_dtype"), "ingest_wall_s": wall,
            "ingest_peak_rss_mb": peak}


def _ask(model: str, mode: str, stored: dict, questions_file: Path, pairs, settings, options: dict,
         escalate_to: str = "full") -> dict:
    from starqa.eval.scoring import score

    attention = "hybrid" if mode.startswith("hybrid") else mode
    args = ["ask", "--doc", stored["name"], "--questions", str(questions_file), "--attention", attention, "--json",
            "--no-server", "--model", model, *_common(settings, options), *_decoding(options)]
    if attention == "hybrid":  # named, so that a configuration file's escalate_to cannot change the row
        args += ["--escalate-to", escalate_to]
    if options.get("max_new_tokens") is not None:
        args += ["--max-new-tokens", str(options["max_new_tokens"])]
    report.info(f"{model} / {mode}: asking {len(pairs)} questions (their own process)")
    out, wall, peak = _starqa(args, settings, options, f"{model} / {mode}: ask")
    answers = [json.loads(line) for line in out.splitlines() if line.strip()]
    if len(answers) != len(pairs):
        raise StarqaError(f"{model} / {mode}: {len(answers)} answers for {len(pairs)} questions")
    for answer, pair in zip(answers, pairs):
        answer["score"] = score("part", answer["answer"], pair.answers)
        answer["answer_s"] = _answer_seconds(answer)
    return {"model": model, "mode": mode, "answers": answers, "wall_s": wall, "peak_rss_mb": peak,
            "phase1_s": stored["phase1_s"] if mode != "full" else None,
            "kv_bytes": stored["kv_bytes"] if mode != "full" else None, "context_tokens": stored["context_tokens"],
            "block_size": stored["block_size"], "dtype": stored["dtype"], "kv_dtype": stored["kv_dtype"],
            "ingest_peak_rss_mb": stored["ingest_peak_rss_mb"]}


def _ask_escalating(model: str, target: str, stored: dict, source: Path, questions_file: Path, pairs, settings,
                    options: dict) -> dict:
    """The `hybrid→TARGET` row: the target's copy of the document stored ahead of time in its own process (as a user
    would, `starqa ingest FILE --name NAME@MODEL`), then one hybrid ask escalating to it, which holds both models.
    Phase 1 and KV on disk are the two copies' together: what the cascade costs."""
    from starqa.answer.escalation import copy_name

    copy = _ingest(target, source, settings, options, name=copy_name(stored["name"], target))
    record = _ask(model, escalation_mode(target), stored, questions_file, pairs, settings, options,
                  escalate_to=target)
    record.update(escalated_to=target, phase1_s=_sum(stored["phase1_s"], copy["phase1_s"]),
                  kv_bytes=_sum(stored["kv_bytes"], copy["kv_bytes"]),
                  ingest_peak_rss_mb=max(stored["ingest_peak_rss_mb"], copy["ingest_peak_rss_mb"]))
    return record


def _sum(first, second):
    return None if first is None or second is None else first + second


def _answer_seconds(answer: dict) -> float:
    """Seconds from the prompt's prefill to the answer's last token (a hybrid answer given again: both passes)."""
    hybrid = answer.get("hybrid") or {}
    if hybrid.get("escalated"):
        return hybrid["star_s"] + hybrid["full_s"]
    rate = answer["decode_tokens_per_s"]
    return answer["ttft_s"] + (max(answer["answer_tokens"] - 1, 0) / rate if rate > 0 else 0.0)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("starqa: error: ") if lines else "no output"


# ---------------------------------------------------------------- the report's data


def build(runs: list[dict], pairs, *, source: str, qa: str, modes, models) -> dict:
    """The report as data (what --json prints): rows, answers per question, machine and versions."""
    full_by_model = {run["model"]: run for run in runs if run["mode"] == "full"}
    rows = [_row(run, full_by_model.get(run["model"])) for run in runs]
    questions = []
    for index, pair in enumerate(pairs):
        questions.append({"question": pair.question, "answers": list(pair.answers), "by_run": [
            {"model": run["model"], "mode": run["mode"], "answer": run["answers"][index]["answer"],
             "correct": run["answers"][index]["score"] > 0, "grounded": run["answers"][index]["grounded"],
             "attention": run["answers"][index]["attention"],
             "escalated": bool((run["answers"][index].get("hybrid") or {}).get("escalated")),
             "escalated_to": (run["answers"][index].get("hybrid") or {}).get("escalated_to"),
             "evidence": (run["answers"][index].get("evidence") or [{}])[0]} for run in runs]})
    return {"document": source, "qa": qa, "questions_count": len(pairs), "models": list(models), "modes": list(modes),
            "rows": rows, "questions": questions, "machine": machine()}


def _row(run: dict, full: dict | None) -> dict:
    answers = run["answers"]
    scores = [answer["score"] for answer in answers]
    n = len(scores)
    accuracy = sum(scores) / n
    row = {"model": run["model"], "mode": run["mode"], "questions": n,
           "accuracy": round(100 * accuracy, 1), "accuracy_ci95": round(100 * _half_width(scores), 1),
           "delta_vs_full": None, "delta_ci95": None,
           "grounded": round(100 * sum(bool(a["grounded"]) for a in answers) / n, 1),
           "escalated": (round(100 * sum(bool((a.get("hybrid") or {}).get("escalated")) for a in answers) / n, 1)
                         if run["mode"].startswith("hybrid") else None),
           "ttft_s": round(sum(a["ttft_s"] for a in answers) / n, 3),
           "answer_s": round(sum(a["answer_s"] for a in answers) / n, 3),
           "decode_tokens_per_s": round(sum(a["decode_tokens_per_s"] for a in answers) / n, 1),
           "phase1_s": None if run["phase1_s"] is None else round(run["phase1_s"], 2),
           "kv_bytes": run["kv_bytes"], "peak_rss_mb": round(run["peak_rss_mb"], 0),
           "ingest_peak_rss_mb": round(run["ingest_peak_rss_mb"], 0), "process_wall_s": round(run["wall_s"], 1),
           "context_tokens": run["context_tokens"], "block_size": run["block_size"], "dtype": run["dtype"],
           "kv_dtype": run["kv_dtype"]}
    if full is not None and full is not run:
        differences = [a["score"] - f["score"] for a, f in zip(answers, full["answers"])]
        row["delta_vs_full"] = round(100 * sum(differences) / n, 1)
        row["delta_ci95"] = round(100 * _half_width(differences), 1)
    return row


def _half_width(values: list[float]) -> float:
    """95 % half-width of a mean (normal approximation; 0 under 2 values)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Z95 * math.sqrt(variance / n)


def machine() -> dict:
    """The machine and the versions the report was made with (read without importing torch)."""
    from importlib import metadata

    from starqa import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {"starqa": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "os": platform.platform(),
            "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ---------------------------------------------------------------- rendering

_COLUMNS = (("model", "model"), ("mode", "mode"), ("accuracy % (±95 %)", None), ("Δ vs full (±95 %)", None),
            ("grounded %", "grounded"), ("answered again %", "escalated"), ("TTFT s", "ttft_s"),
            ("s / answer", "answer_s"), ("decode tok/s", "decode_tokens_per_s"), ("Phase 1 s", "phase1_s"),
            ("KV on disk", None), ("peak RSS MiB", "peak_rss_mb"))


def _cells(row: dict) -> list[str]:
    cells = []
    for header, key in _COLUMNS:
        if header.startswith("accuracy"):
            cells.append(f"{row['accuracy']:.1f} ± {row['accuracy_ci95']:.1f}")
        elif header.startswith("Δ"):
            cells.append("–" if row["delta_vs_full"] is None else f"{row['delta_vs_full']:+.1f} ± {row['delta_ci95']:.1f}")
        elif header == "KV on disk":
            cells.append("–" if row["kv_bytes"] is None else report.human_bytes(row["kv_bytes"]))
        else:
            value = row[key]
            cells.append("–" if value is None else (f"{value:,.0f}" if key == "peak_rss_mb" else str(value)))
    return cells


def _answer_mode(answer: dict) -> str:
    """The mode of one answer as the report shows it; one answered again names what answered ("hybrid → full")."""
    if not answer["escalated"]:
        return answer["mode"]
    return f"hybrid → {_short(answer.get('escalated_to') or 'full')}"


def _short(model: str) -> str:
    return Path(model).name if os.sep in model else model


def markdown(document: dict) -> str:
    machine_info = document["machine"]
    lines = [f"# starqa proof of concept: {Path(document['document']).name}", "",
             f"{document['questions_count']} questions from `{document['qa']}`; every model x mode ran in its own "
             "process (peak RSS is that process's own). Accuracy: a reference answer appears in the answer; ±: 95 % "
             "interval (normal approximation). Δ vs full: paired difference from the same model's full attention. "
             "s / answer: prefill to last token, the document already stored (Phase 1 is paid once, at ingest).", "",
             "| " + " | ".join(header for header, _ in _COLUMNS) + " |",
             "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    for row in document["rows"]:
        cells = _cells(dict(row, model=_short(row["model"])))
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", "## Answers side by side", ""]
    for number, item in enumerate(document["questions"], start=1):
        lines += [f"### {number}. {item['question']}", "", f"Reference: {' / '.join(item['answers'])}", "",
                  "| model | mode | answer | correct | grounded | evidence |", "|---|---|---|---|---|---|"]
        for answer in item["by_run"]:
            evidence = answer["evidence"]
            quote = f"p. {evidence['page']}: “{' '.join(evidence['text'].split())}”" if evidence.get("text") else "–"
            mode = _answer_mode(answer)
            lines.append("| " + " | ".join(_md(cell) for cell in (
                _short(answer["model"]), mode, answer["answer"], "yes" if answer["correct"] else "no",
                "yes" if answer["grounded"] else "no", quote)) + " |")
        lines.append("")
    versions = ", ".join(f"{name} {version}" for name, version in machine_info["versions"].items())
    lines += ["## Machine", "", f"- CPU: {machine_info['cpu']} ({machine_info['cores']} cores), "
              f"{machine_info['memory_gib']} GiB memory; {machine_info['os']}", f"- versions: {versions}",
              f"- made: {machine_info['date']}", ""]
    return "\n".join(lines)


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def to_html(document: dict) -> str:
    e = html.escape
    machine_info = document["machine"]
    head = "".join(f"<th>{e(header)}</th>" for header, _ in _COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in _cells(dict(row, model=_short(row["model"]))))
                   + "</tr>" for row in document["rows"])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>starqa PoC: "
             f"{e(Path(document['document']).name)}</title><style>body{{font-family:sans-serif;max-width:80em;"
             "margin:auto}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .5em;"
             "vertical-align:top}.no{color:#b00}.yes{color:#070}</style></head><body>",
             f"<h1>starqa proof of concept: {e(Path(document['document']).name)}</h1>",
             f"<p>{document['questions_count']} questions from <code>{e(document['qa'])}</code>; every model × mode "
             "ran in its own process (peak RSS is that process's own). Accuracy: a reference answer appears in the "
             "answer; ±: 95 % interval. Δ vs full: paired difference from the same model's full attention. "
             "s / answer: prefill to last token, the document already stored (Phase 1 is paid once, at ingest).</p>",
             f"<table><tr>{head}</tr>{body}</table>", "<h2>Answers side by side</h2>"]
    for number, item in enumerate(document["questions"], start=1):
        parts.append(f"<h3>{number}. {e(item['question'])}</h3><p>Reference: {e(' / '.join(item['answers']))}</p>"
                     "<table><tr><th>model</th><th>mode</th><th>answer</th><th>correct</th><th>grounded</th>"
                     "<th>evidence</th></tr>")
        for answer in item["by_run"]:
            evidence = answer["evidence"]
            quote = f"p. {evidence['page']}: “{' '.join(evidence['text'].split())}”" if evidence.get("text") else "–"
            mode = _answer_mode(answer)
            parts.append(f"<tr><td>{e(_short(answer['model']))}</td><td>{e(mode)}</td><td>{e(answer['answer'])}</td>"
                         f"<td class='{'yes' if answer['correct'] else 'no'}'>{'yes' if answer['correct'] else 'no'}"
                         f"</td><td>{'yes' if answer['grounded'] else 'no'}</td><td>{e(quote)}</td></tr>")
        parts.append("</table>")
    versions = ", ".join(f"{name} {version}" for name, version in machine_info["versions"].items())
    parts.append(f"<h2>Machine</h2><ul><li>CPU: {e(machine_info['cpu'])} ({machine_info['cores']} cores), "
                 f"{machine_info['memory_gib']} GiB memory; {e(machine_info['os'])}</li><li>versions: {e(versions)}"
                 f"</li><li>made: {e(machine_info['date'])}</li></ul></body></html>")
    return "\n".join(parts)
