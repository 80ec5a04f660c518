"""`starqa eval`: Star Attention against full attention, side by side: accuracy, speed, memory.

    starqa eval --doc contract --qa samples/contract-qa.jsonl
    starqa eval --suite ruler --lengths 2048,4096,8192 --samples 20
    starqa eval --suite ruler --lengths 8192 --block-size 1024,2048 --anchor-size 256,1024
    starqa eval ... --json > report.json

Wiring only: options -> settings and engine -> cases (tasks.py) -> runner.py -> summary.py. Registered in cli.py with
`app.command("eval")(eval_command)`.
"""

from __future__ import annotations

import dataclasses

import json
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from starqa import report
from starqa.errors import Interrupted, StarqaError, UsageError

DEFAULT_LENGTHS = (4096,)
DEFAULT_SAMPLES = 20


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_lengths(text: str | None) -> list[int]:
    if text is None:
        return list(DEFAULT_LENGTHS)
    lengths = []
    for part in _split(text):
        if not part.isdigit() or int(part) <= 0:
            raise UsageError(f"--lengths takes positive token counts separated by commas, e.g. 2048,4096; not {part!r}")
        lengths.append(int(part))
    if not lengths:
        raise UsageError("--lengths is empty")
    return sorted(set(lengths))


def parse_attention(text: str | None) -> list[str]:
    """--attention: the modes to report, in the order star, full, hybrid (each measured case runs star and full;
    hybrid is composed from them)."""
    from starqa.answer.hybrid import ATTENTION_MODES

    if text is None:
        return list(ATTENTION_MODES)
    modes = _split(text)
    unknown = [mode for mode in modes if mode not in ATTENTION_MODES]
    if unknown or not modes:
        raise UsageError(f"--attention takes star, full and/or hybrid, comma-separated; not {', '.join(unknown) or text!r}")
    return [mode for mode in ATTENTION_MODES if mode in modes]


def parse_tasks(text: str | None) -> list[str]:
    from starqa.eval.tasks import TASK_NAMES

    if text is None:
        return list(TASK_NAMES)
    tasks = _split(text)
    unknown = [task for task in tasks if task not in TASK_NAMES]
    if unknown or not tasks:
        raise UsageError(f"unknown task {', '.join(unknown) or '(none)'}; tasks: {', '.join(TASK_NAMES)}")
    return list(dict.fromkeys(tasks))


def parse_star_specs(block_size: str | None, anchor_size: str | None, pairs: str | None):
    """The Star configurations: --pairs as given, else the --block-size x --anchor-size grid (default L/4 each)."""
    from starqa.eval.runner import QUARTER, SizeSpec, StarSpec

    if pairs is not None:
        if block_size is not None or anchor_size is not None:
            raise UsageError("--pairs gives block:anchor pairs itself; drop --block-size / --anchor-size")
        specs = []
        for part in _split(pairs):
            block, colon, anchor = part.partition(":")
            if not colon:
                raise UsageError(f"--pairs takes BLOCK:ANCHOR items, e.g. L/4:L/4,1024:256; not {part!r}")
            specs.append(StarSpec(SizeSpec.parse(block), SizeSpec.parse(anchor)))
        if not specs:
            raise UsageError("--pairs is empty")
        return list(dict.fromkeys(specs))
    if block_size is None and anchor_size is None:
        return [QUARTER]
    blocks = [SizeSpec.parse(part) for part in _split(block_size)] if block_size is not None else [QUARTER.block]
    anchors = [SizeSpec.parse(part) for part in _split(anchor_size)] if anchor_size is not None else None
    if not blocks or anchors == []:
        raise UsageError("--block-size and --anchor-size need at least one size each")
    if anchors is None:  # anchor = block, as everywhere in starqa
        return list(dict.fromkeys(StarSpec(block, block) for block in blocks))
    return list(dict.fromkeys(StarSpec(block, anchor) for block in blocks for anchor in anchors))


def _load_engine(settings, model: str | None, trust_remote_code: bool):
    from starqa.engine.star_engine import StarEngine  # torch is imported only once the input has been checked

    return StarEngine.from_settings(settings, model, trust_remote_code=trust_remote_code, on_status=report.info)


def _document_text(doc: str, settings, password: str | None = None) -> tuple[str, str, dict | None]:
    """(name, text, manifest) of --doc: a stored document (with its manifest), or a file extracted the way `ingest`
    extracts it (manifest None)."""
    from starqa.store.document_store import DocumentStore, validate_name

    store = DocumentStore(settings.store)
    try:
        validate_name(doc)
        stored = store.exists(doc)
    except UsageError:
        stored = False
    if stored:
        document = store.get(doc)
        return doc, document.text(), document.manifest
    path = Path(doc)
    if not path.is_file():
        raise UsageError(f"--doc {doc!r} is neither a stored document (see `starqa list`) nor a file")
    try:
        from starqa.documents.extraction import extract_document
    except ImportError:
        raise StarqaError("document extraction (starqa.documents.extraction) is not available in this installation") from None
    extracted = extract_document(path, password=password)
    for warning in extracted.warnings:
        report.warn(warning)
    return path.stem, extracted.text, None


def eval_command(
    doc: Optional[str] = typer.Option(None, "--doc", help="A stored document name, or a file (PDF, .txt, .md)."),
    qa: Optional[Path] = typer.Option(None, "--qa", help='Questions for --doc, JSONL: {"question": ..., "answers": [...]} per line.'),
    suite: Optional[str] = typer.Option(None, "--suite", help="ruler: the synthetic long-context suite (generated locally)."),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Prompt lengths in tokens, comma-separated (suite; default 4096)."),
    samples: Optional[int] = typer.Option(None, "--samples", help=f"Samples per task and length (suite; default {DEFAULT_SAMPLES})."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated subset of the suite's tasks (default: all)."),
    block_size: Optional[str] = typer.Option(None, "--block-size", help="Block sizes, comma-separated: tokens or L/N (default L/4)."),
    anchor_size: Optional[str] = typer.Option(None, "--anchor-size", help="Anchor sizes, comma-separated (default: the block size)."),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="Explicit BLOCK:ANCHOR pairs, e.g. L/4:L/4,1024:256, instead of the grid."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the generated cases (default: the config's seed)."),
    attention: Optional[str] = typer.Option(None, "--attention", help="Modes reported, comma-separated: star, full, hybrid (default: all three; hybrid is Star, answered again with full attention where not grounded)."),
    escalate_to: Optional[str] = typer.Option(None, "--escalate-to", help="Hybrid rows: full (default) or a MODEL whose answer to the same case replaces an ungrounded Star answer (docs/hybrid.md)."),
    models: Optional[str] = typer.Option(None, "--models", help="PoC report: several models, comma-separated, each mode of each in its own process (with --doc, --qa, --report)."),
    report_path: Optional[Path] = typer.Option(None, "--report", help="PoC report: write it to this .html or .md file (with --models or --model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw accuracy and speed-up against length into this file (.png, .svg or .pdf)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="JSONL results log: each finished case is appended; cases already in it are skipped."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Answer budget (default: per task as in RULER; the config's for --doc)."),
    model: Optional[str] = typer.Option(None, "--model", help="A catalogue model (`starqa models`), a local HF model dir, a .gguf file, or a "
                                         "cached HF id."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: auto, float32, bfloat16 or float16 (default: auto, from the config: bfloat16 on CUDA and on CPUs with native bfloat16 (AMX, AVX512-BF16), else float32)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights decoding reads: auto, bfloat16, int8 or int4 (see docs/quantized-decoding.md)."),
    activations: Optional[str] = typer.Option(None, "--activations", help="What 4/8-bit decoding multiplies the weights with: bfloat16 (exact) or int8 (faster; see docs/quantized-decoding.md)."),
    password: Optional[str] = typer.Option(None, "--password", help="With --doc FILE: password of an encrypted PDF."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a model directory's own Python code to run."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file layered over configs/default.yaml."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the JSON (with --json) and errors; no progress or tables."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
) -> None:
    """Compare Star Attention with full attention: accuracy, speed and memory, on your document or a RULER-style suite."""
    options = dict(locals())
    with _termination_interrupts():  # SIGTERM at any point acts as Ctrl-C
        _eval(**options)


def _eval(doc, qa, suite, lengths, samples, tasks, block_size, anchor_size, pairs, seed, attention, escalate_to,
          models, report_path, as_json, plot, resume, max_new_tokens, model, dtype, device, weights, activations,
          password, trust_remote_code, config, quiet, debug) -> None:
    from starqa.config import load_settings
    from starqa.eval import summary
    from starqa.eval.runner import ResultLog

    report.set_quiet(quiet)
    settings = load_settings(config, model=model, dtype=dtype, device=device, max_new_tokens=max_new_tokens,
                             weights=weights, activations=activations, escalate_to=escalate_to)
    modes = parse_attention(attention)
    from starqa.answer.escalation import FULL, check_target

    target = check_target(settings.escalate_to, settings, attention="hybrid" if "hybrid" in modes else attention,
                          explicit=escalate_to is not None)  # an unknown or missing model: before anything runs
    if models is not None or report_path is not None:
        from starqa.eval import poc_report

        poc_report.run(settings, doc=doc, qa=qa, suite=suite, models=models, model=model, modes=modes,
                       report_path=report_path, resume=resume, as_json=as_json, options=dict(
                           lengths=lengths, samples=samples, tasks=tasks, block_size=block_size,
                           anchor_size=anchor_size, pairs=pairs, plot=plot, password=password, dtype=dtype,
                           device=device, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code,
                           config=config, quiet=quiet, weights=weights, activations=activations),
                       escalate_to=None if target == FULL else target)
        return
    if (doc is None) == (suite is None):
        raise UsageError("give --doc NAME --qa FILE (your document) or --suite ruler (synthetic), not both or neither")
    if suite is not None and suite != "ruler":
        raise UsageError(f"--suite must be ruler, not {suite!r}")
    if doc is not None:
        if qa is None:
            raise UsageError("--doc needs --qa FILE: questions with their answers, one JSON object per line")
        given = [flag for flag, value in (("--lengths", lengths), ("--samples", samples), ("--tasks", tasks))
                 if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to --suite ruler; --doc uses the whole document")
    elif qa is not None:
        raise UsageError("--qa goes with --doc; the suite brings its own questions")
    if samples is not None and samples <= 0:
        raise UsageError(f"--samples must be positive, not {samples}")
    specs = parse_star_specs(block_size, anchor_size, pairs)
    if plot is not None:
        summary.check_plot_path(plot)
    log = ResultLog(resume) if resume is not None else None
    seed = settings.seed if seed is None else seed

    if doc is not None:
        from starqa.eval.qa_file import load_qa_file

        pairs_asked = load_qa_file(qa)
        name, text, manifest = _document_text(doc, settings, password)
        if not text.strip():
            raise UsageError(f"--doc {doc!r} has no text")
        if manifest is not None:  # a stored document is evaluated with the model (and dtype) it was stored with
            from starqa.answer.ask import engine_for

            model, stored_dtype = engine_for(manifest, settings, model)
            if stored_dtype is not None:
                settings = dataclasses.replace(settings, dtype=stored_dtype)
        engine = _load_engine(settings, model, trust_remote_code)
        build_cases = lambda engine: _document_cases(engine, name, text, pairs_asked,  # noqa: E731
                                                     max_new_tokens or settings.max_new_tokens)
        cases = build_cases(engine)
        origin = {"document": name, "suite": None}
    else:
        task_names = parse_tasks(tasks)
        length_list = parse_lengths(lengths)
        qa_source = _suite_qa_source(task_names, explicit=tasks is not None)
        if qa_source is None:
            task_names = [task for task in task_names if task != "qa"]
        engine = _load_engine(settings, model, trust_remote_code)
        build_cases = lambda engine: _suite_cases(engine, task_names, length_list,  # noqa: E731
                                                  samples or DEFAULT_SAMPLES, seed, qa_source)
        cases = build_cases(engine)
        origin = {"document": None, "suite": "ruler", "tasks": task_names, "seed": seed}

    if target != FULL and target == engine.model_name:
        raise UsageError(f"--escalate-to {settings.escalate_to} is the model evaluated; drop it to escalate to "
                         "full attention")
    stopped, skipped, runner = _run(engine, cases, specs, settings, max_new_tokens, log)
    interrupted = isinstance(stopped, KeyboardInterrupt)
    records = runner.records
    if "hybrid" in modes and target != FULL and stopped is None:
        # the escalation target answers the same cases (its own --resume log), and hybrid takes its answers
        from starqa.answer.escalation import target_log_path, target_modes, with_escalation

        target_engine = _load_engine(settings, target, trust_remote_code)
        target_log = ResultLog(target_log_path(resume, target)) if resume is not None else None
        stopped, _, target_runner = _run(target_engine, build_cases(target_engine), specs, settings, max_new_tokens,
                                         target_log, keep=target_modes)
        records = with_escalation(records, target_runner.records, target)
    elif "hybrid" in modes:
        from starqa.answer.hybrid import with_hybrid

        records = with_hybrid(records)
    rows, overall = summary.summarize(records)
    rows, overall = summary.only_modes(rows, modes), summary.only_modes(overall, modes)
    label = f"{engine.model_name or 'model'} on {engine.device.type}, {str(engine.dtype).removeprefix('torch.')}"
    title = f"Star Attention vs full attention — {label}"
    if stopped is not None:
        title += " — interrupted: partial results" if interrupted else " — failed: partial results"
    if rows:
        summary.print_table(rows, overall, title=title)
    else:
        report.info("nothing was measured")
    if as_json:
        print(json.dumps(summary.document(
            engine.model_name, rows, overall, dtype=str(engine.dtype).removeprefix("torch."),
            device=str(engine.device), **origin, interrupted=interrupted, peak_rss_scope=runner.peak_rss_scope,
            resumed=runner.resumed, skipped=skipped, **({"failed": True} if stopped and not interrupted else {})),
            indent=2), flush=True)
    if plot is not None and overall:
        series = [("full", None)] + [(spec.label, spec) for spec in specs]
        summary.plot(overall, plot, title=title, series=series)
        report.info(f"plot written to {plot}")
    if interrupted:
        raise Interrupted("interrupted: the report holds the cases finished so far (--resume FILE continues a run)")
    if stopped is not None:
        raise stopped  # reported (one line, its exit code) after the partial report


def _suite_qa_source(task_names: list[str], *, explicit: bool):
    from starqa.eval.qa_file import bundled_sample

    if "qa" not in task_names:
        return None
    source = bundled_sample()
    if source is None:
        message = "the qa task needs samples/contract.txt and samples/contract-qa.jsonl, which are not here"
        if explicit:
            raise UsageError(message)
        report.warn(f"{message}; qa skipped")
    return source


def _suite_cases(engine, task_names, lengths, samples, seed, qa_source):
    from starqa.eval.haystack import LengthError
    from starqa.eval.prompts import PromptBuilder
    from starqa.eval.tasks import generate_cases, spread_order

    window = engine.context_window
    for length in lengths:
        if window and length > window:
            report.warn(f"length {length:,} is beyond {engine.model_name}'s context window ({window:,} tokens)")
    prompts = PromptBuilder(engine.hf_tokenizer)
    report.info(f"generating {len(task_names) * len(lengths) * samples} cases")
    cases = []
    for length in lengths:
        for task in task_names:
            try:
                cases += generate_cases(task, length, samples, seed, prompts.count, qa_source=qa_source)
            except LengthError as exc:
                raise UsageError(f"{exc}; choose a larger --lengths value") from None
    # Sample by sample over every task and length, depths spread out first: a run stopped part-way (hours on a CPU)
    # holds a balanced, depth-spread share of every row instead of every sample of the first rows only.
    rank = {index: position for position, index in enumerate(spread_order(samples))}
    return sorted(cases, key=lambda case: rank[case.index])


def _document_cases(engine, name, text, pairs, max_new_tokens):
    from starqa.eval.prompts import PromptBuilder
    from starqa.eval.tasks import document_cases

    context_tokens = len(PromptBuilder(engine.hf_tokenizer).context_ids(text))
    report.info(f"'{name}': {context_tokens:,} context tokens, {len(pairs)} questions")
    window = engine.context_window
    if window and context_tokens > window:
        report.warn(f"'{name}' ({context_tokens:,} tokens) is longer than {engine.model_name}'s context window "
                    f"({window:,} tokens): expect weak answers from both modes")
    return document_cases(name, text, pairs, context_tokens, max_new_tokens=max_new_tokens)


def _run(engine, cases, specs, settings, max_new_tokens, log, keep=None):
    """Run every case in every mode (`keep(modes)`: those of them to run). Ctrl-C, SIGTERM or a failure (out of
    memory, a full disk) stops the run and keeps what was measured: returns (the exception that stopped it or None,
    skipped-mode notes, the runner)."""
    from starqa.eval.runner import EvalRunner, modes_for

    plan, skipped = [], []
    for case in cases:
        modes, notes = modes_for(case.length, specs)
        modes = keep(modes) if keep is not None else modes
        plan.append((case, modes))
        skipped += [note for note in notes if note not in skipped]
    for note in skipped:
        report.warn(note)
    stopped = None
    with report.progress() as bar:
        progress_id = bar.add_task("eval", total=sum(len(modes) for _, modes in plan))
        runner = EvalRunner(engine, phase1_batch=settings.phase1_batch, max_new_tokens=max_new_tokens, log=log,
                            on_record=lambda record: bar.advance(progress_id),
                            full_attention_block_size=settings.block_size)
        if runner.previous:
            runner.check_log(plan)  # before hours of measuring, not when the first mismatching case comes up
            report.info(f"resuming: {len(runner.previous)} results already in {log.path}")
        try:
            for case, modes in plan:
                bar.update(progress_id, description=f"{case.task} {case.length:,} #{case.index}")
                runner.run_case(case, modes)
        except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - re-raised once the report is out
            stopped = exc
    return stopped, skipped, runner


@contextmanager
def _termination_interrupts():
    """SIGTERM (`kill`, a batch scheduler's time limit) stops the run as Ctrl-C does: the report keeps what was
    measured, and every finished case is already in the --resume file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
