"""The `starqa` command line: thin wiring of documents, engine, store and report. No logic of its own lives here."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Optional

import click
import typer

from starqa import report
from starqa.errors import StarqaError, UsageError, describe


def _flags_show_no_type() -> None:
    """Typer 0.29's Rich help shows a type after every flag (`--force <bool>`), as if it took a value: its options
    panel prints each option's `display_type_rich`, which its plain help (`TyperOption.get_help_record`) rightly
    leaves out for flags. Here a flag or counter has none, so both agree; options that take a value keep theirs
    (`--block-size <int>`)."""
    option = getattr(typer.core, "TyperOption", None)
    display_type = getattr(option, "display_type_rich", None)
    if display_type is None:
        return  # an older Typer, whose help shows no type after a flag

    def display_type_rich(self, ctx):
        return None if self.is_flag or self.count else display_type(self, ctx)

    option.display_type_rich = display_type_rich


_flags_show_no_type()
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Answer questions about long documents with a local LLM, using Star Attention.")

# Options shared by several commands (Typer has no option groups; these keep the signatures short).
ConfigOpt = typer.Option(None, "--config", help="YAML file layered over configs/default.yaml.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Only answers and errors; no progress or tables.")
DebugOpt = typer.Option(False, "--debug", help="Show the full traceback of an error.")
ModelOpt = typer.Option(None, "--model", help="A catalogue model (`starqa models`), a local HF model dir, a .gguf file, or "
                        "a cached HF id.")
DtypeOpt = typer.Option(None, "--dtype", help="Compute dtype: auto, float32, bfloat16 or float16 (auto: bfloat16 on CUDA "
                        "and on CPUs with native bfloat16 (AMX, AVX512-BF16), else float32; a stored document: its own).")
KvDtypeOpt = typer.Option(None, "--kv-dtype", help="Precision of the stored KV: auto (the compute dtype), bfloat16, "
                          "float16 or int8.")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.")
WeightsOpt = typer.Option(None, "--weights", help="Weights decoding reads: auto (a GGUF's own 4/8-bit values), "
                          "bfloat16, int8 or int4 (see docs/quantized-decoding.md).")
ActivationsOpt = typer.Option(None, "--activations", help="What 4/8-bit decoding multiplies the weights with: "
                              "bfloat16 (exact) or int8 (rounded per 32 inputs; faster with AVX512-VNNI).")
BlockOpt = typer.Option(None, "--block-size", help="Phase 1 block size in tokens, or auto (a quarter of the "
                        "document, to the nearest multiple of 1,024, at least 1,024).")
AnchorOpt = typer.Option(None, "--anchor-size", help="Anchor size in tokens (default: the block size).")
TrustOpt = typer.Option(False, "--trust-remote-code", help="Allow a model directory's own Python code to run.")
NprocOpt = typer.Option(None, "--nproc", help="Processes (GPUs) for Phase 1/2: a number or auto (visible GPUs).")


class _Relaunched(Exception):
    """Raised after the command ran under torchrun in child processes; carries their exit code."""

    def __init__(self, exit_code: int) -> None:
        self.exit_code = exit_code


# Set for the ranks of our own relaunch: a file holding the questions the launching process read from stdin.
_QUESTIONS_ENV = "STARQA_STDIN_QUESTIONS"


def _launch_if_asked(settings, stdin_questions: list[str] | None = None) -> None:
    """Relaunch this command under torchrun when more than one process is asked for (and we are not under it)."""
    from starqa.engine import distributed

    nproc = distributed.requested_nproc(settings.nproc, settings.device)
    if nproc <= 1 or distributed.under_torchrun():
        return
    argv = sys.argv[1:] if _ARGV is None else _ARGV
    if stdin_questions is None:
        raise _Relaunched(distributed.launch(nproc, argv, settings.device))
    # Standard input is read once, here; the ranks read the questions from a private file instead.
    fd, handoff = tempfile.mkstemp(prefix="starqa-questions-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(stdin_questions) + "\n")
        os.environ[_QUESTIONS_ENV] = handoff
        raise _Relaunched(distributed.launch(nproc, argv, settings.device))
    finally:
        os.environ.pop(_QUESTIONS_ENV, None)
        os.unlink(handoff)


def _ranks(settings):
    from starqa.engine import distributed

    ranks = distributed.setup(settings.device)
    _RANKS[0] = ranks
    if not ranks.is_speaker:
        report.set_quiet(True)  # one rank talks; the others only compute
    return ranks


def _settings(config: Optional[Path], quiet: bool, **overrides):
    from starqa.config import load_settings

    report.set_quiet(quiet)
    return load_settings(config, **overrides)


def _store(settings):
    from starqa.store.document_store import DocumentStore

    return DocumentStore(settings.store)


def _load_engine(settings, model: str | None = None, trust_remote_code: bool = False, ranks=None,
                 dtype: str | None = None):
    from starqa.engine.star_engine import StarEngine

    if dtype is not None:  # a stored document's own compute dtype
        settings = dataclasses.replace(settings, dtype=dtype)
    device = ranks.device if ranks is not None and ranks.distributed else None  # a rank loads onto its own GPU
    return StarEngine.from_settings(settings, model, device=device, trust_remote_code=trust_remote_code,
                                    on_status=report.info)


@app.command()
def ingest(
    files: list[str] = typer.Argument(..., help="PDF, .txt or .md files (or - for stdin)."),
    name: Optional[str] = typer.Option(None, "--name", help="Document name (default: the file's stem)."),
    force: bool = typer.Option(False, "--force", help="Replace a stored document of the same name (blocks that "
                               "did not change are taken over, not encoded)."),
    update: bool = typer.Option(False, "--update", help="Skip files stored unchanged (same content and settings); "
                                "replace changed ones, encoding only the blocks that changed; ingest new ones."),
    allow_long: bool = typer.Option(False, "--allow-long", help="Encode documents longer than the model's context."),
    password: Optional[str] = typer.Option(None, "--password", help="Password of an encrypted PDF."),
    model: Optional[str] = ModelOpt, dtype: Optional[str] = DtypeOpt, kv_dtype: Optional[str] = KvDtypeOpt,
    device: Optional[str] = DeviceOpt, block_size: Optional[str] = BlockOpt, anchor_size: Optional[int] = AnchorOpt,
    nproc: Optional[str] = NprocOpt, trust_remote_code: bool = TrustOpt,
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Extract documents, run Phase 1 and store their KV caches (one document per file)."""
    from starqa.engine.ingest import expand_sources
    from starqa.engine.ingest import ingest as ingest_one

    settings = _settings(config, quiet, model=model, dtype=dtype, kv_dtype=kv_dtype, device=device,
                         block_size=block_size, anchor_size=anchor_size, nproc=nproc)
    if update and force:
        raise UsageError("--update skips unchanged files and --force replaces them: pass one of the two")
    files = expand_sources(files)  # quoted globs: "docs/*.pdf"
    if name is not None and len(files) > 1:
        flag = "--update with --name" if update else "--name"
        raise UsageError(f"{flag} names one document, but {len(files)} files were given; drop --name to ingest "
                         "several files (each takes its stem)")
    _check_sources(files, name)  # usage errors before loading a model (or converting one, ~20 s)
    _launch_if_asked(settings)
    ranks = _ranks(settings)
    store = _store(settings)
    engine = _load_engine(settings, None, trust_remote_code, ranks)
    failed = 0
    with report.progress() as bar:
        files_task = bar.add_task("files", total=len(files)) if len(files) > 1 else None
        for source in files:
            try:
                ingest_one(source, settings, engine, store, name=name, force=force, update=update,
                           allow_long=allow_long, password=password, ranks=ranks)
            except Exception as exc:  # noqa: BLE001 - one file's failure is reported; the others go on
                if len(files) == 1:
                    raise
                failed += 1
                if ranks.is_speaker:
                    report.error(f"{source}: {describe(exc)}")
            if files_task is not None:
                bar.advance(files_task)
    if failed:
        report.error(f"{failed} of {len(files)} files failed")
        raise typer.Exit(1)


def _check_sources(files: list[str], name: str | None) -> None:
    from starqa.store.document_store import validate_name

    if name is not None:
        validate_name(name)
    for source in files:
        path = Path(source)
        if source != "-" and not path.exists():
            raise UsageError(f"'{path}' does not exist: check the path (use - to read standard input)")
        if source != "-" and path.is_dir():
            raise UsageError(f"'{path}' is a directory, not a file: give the path of a PDF or text file")
    if name is None and len(files) > 1:
        # Each file is stored under its stem: two files with one stem would replace one another (with --force).
        from starqa.store.document_store import name_from_path

        first: dict[str, str] = {}
        for source in files:
            other = first.setdefault(name_from_path(source), source)
            if other != source:
                raise UsageError(f"'{other}' and '{source}' would both be stored as '{name_from_path(source)}': "
                                 "ingest them one at a time with --name")


@app.command()
def ask(
    question: Optional[str] = typer.Argument(None, help="The question (or use --questions)."),
    doc: Optional[list[str]] = typer.Option(None, "--doc", help="A stored document name, a glob over stored names "
                                            "('contract-*'), or a file to ingest first; may be repeated."),
    all_documents: bool = typer.Option(False, "--all", help="Ask every stored document."),
    questions: Optional[Path] = typer.Option(None, "--questions", help="File with one question per line."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per question on stdout."),
    attention: str = typer.Option("star", "--attention", help="star (over the stored KV), full (the stored "
                                  "text encoded again in one causal pass per ask) or hybrid (star; an answer not "
                                  "grounded is answered again with full attention)."),
    escalate_to: Optional[str] = typer.Option(None, "--escalate-to", help="With --attention hybrid: full (full "
                                              "attention, the default) or a larger MODEL that answers again what "
                                              "is not grounded (docs/hybrid.md)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Questions decoded together against the "
                                             "document's KV (--questions; default from the config: 8)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 = greedy."),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    name: Optional[str] = typer.Option(None, "--name", help="Name to store --doc FILE under."),
    force: bool = typer.Option(False, "--force", help="With --doc FILE: replace a stored document of that name."),
    allow_long: bool = typer.Option(False, "--allow-long", help="With --doc FILE: encode it even if longer than "
                                    "the model's context."),
    password: Optional[str] = typer.Option(None, "--password", help="With --doc FILE: password of an encrypted PDF."),
    model: Optional[str] = ModelOpt, dtype: Optional[str] = DtypeOpt, kv_dtype: Optional[str] = KvDtypeOpt,
    device: Optional[str] = DeviceOpt, block_size: Optional[str] = BlockOpt, anchor_size: Optional[int] = AnchorOpt,
    nproc: Optional[str] = NprocOpt, trust_remote_code: bool = TrustOpt, weights: Optional[str] = WeightsOpt,
    activations: Optional[str] = ActivationsOpt,
    no_server: bool = typer.Option(False, "--no-server", help="Answer in this process even if `starqa serve` is "
                                   "running on this store."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Answer questions about a document from its stored KV cache (Phase 2 only); through `starqa serve` if it runs."""
    from starqa.answer.events import EventPrinter, ignore

    settings = _settings(config, quiet, model=model, dtype=dtype, kv_dtype=kv_dtype, device=device,
                         block_size=block_size, anchor_size=anchor_size, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, temperature=temperature, top_p=top_p, seed=seed, nproc=nproc,
                         weights=weights, activations=activations, escalate_to=escalate_to)
    from starqa.answer.escalation import check_target
    from starqa.answer.hybrid import check_attention

    check_attention(attention)
    check_target(settings.escalate_to, settings, attention=attention, explicit=escalate_to is not None)
    if not doc and not all_documents:
        raise UsageError("give --doc NAME (a stored document, a glob over stored names, or a file), or --all")
    if doc and all_documents:
        raise UsageError("--all asks every stored document; drop --doc, or drop --all")
    asked = _read_questions(question, questions)
    printer = EventPrinter(as_json)
    if not no_server:
        # A running `starqa serve` on this store answers, unless this ask must run here: see starqa.serve.client.
        from starqa.serve import client

        code = client.ask(settings, printer, docs=doc or [], all_documents=all_documents, questions=asked,
                          attention=attention, stream=not as_json, model=model, block_size=block_size,
                          anchor_size=anchor_size, trust_remote_code=trust_remote_code, debug=debug,
                          ingest_flags=bool(name is not None or force or allow_long or password is not None))
        if code is not None:
            if code:
                raise typer.Exit(code)
            return
    from starqa.answer import ask as asking

    from_stdin = questions is not None and str(questions) == "-"
    if attention == "full" and str(settings.nproc) != "1":
        # Full attention is one pass over the whole prompt: more ranks would each repeat it. A document given as a
        # file is then ingested in this one process as well.
        settings = dataclasses.replace(settings, nproc=1)
    _launch_if_asked(settings, asked if from_stdin else None)
    ranks = _ranks(settings)
    if from_stdin and ranks.distributed:
        from starqa.engine.distributed import broadcast_object

        asked = broadcast_object(asked, ranks)  # under a hand-launched torchrun only rank 0 read standard input
    from starqa.governance.commands import AuditedAsk

    asking = AuditedAsk(asking, settings, questions=asked, docs=doc or [], attention=attention,
                        speaker=ranks.is_speaker)  # its run() records the ask in the store's audit log
    code = asking.run(lambda model_name, dtype: _load_engine(settings, model_name, trust_remote_code, ranks, dtype),
                      settings, _store(settings), docs=doc or [], all_documents=all_documents, questions=asked,
                      attention=attention, name=name, emit=printer if ranks.is_speaker else ignore,
                      stream=not as_json and ranks.is_speaker,
                      ingest_options=dict(force=force, allow_long=allow_long, password=password),
                      explicit_model=model, explicit_sizes=block_size is not None or anchor_size is not None,
                      ranks=ranks)
    if code:
        raise typer.Exit(code)


def _torchrun_follower() -> bool:
    from starqa.engine import distributed

    return distributed.under_torchrun() and os.environ.get("RANK", "0") != "0"


def _read_questions(question: str | None, questions: Path | None) -> list[str]:
    if (question is None) == (questions is None):
        raise UsageError("give one question as an argument, or --questions FILE (one question per line)")
    if question is not None:
        if not question.strip():
            raise UsageError("the question is empty")
        return [question]
    try:
        if str(questions) != "-":
            lines = questions.read_text(encoding="utf-8").splitlines()
        elif os.environ.get(_QUESTIONS_ENV):  # a rank of our own relaunch: the launching process read stdin
            lines = Path(os.environ[_QUESTIONS_ENV]).read_text(encoding="utf-8").splitlines()
        elif _torchrun_follower():
            return []  # under a hand-launched torchrun, rank 0 reads standard input and shares the questions
        else:
            lines = sys.stdin.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read questions file {questions}: {exc.__class__.__name__}") from None
    asked = [line.strip() for line in lines if line.strip()]
    if not asked:
        raise UsageError(f"questions file {questions} has no questions")
    return asked


@app.command("list")
def list_documents(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per document."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """List stored documents."""
    from starqa.store.listing import document_line, document_row
    from starqa.store.document_store import DamagedDocument

    settings = _settings(config, quiet)
    store = _store(settings)
    documents = []
    for stored_name in store.names():
        try:
            documents.append(store.get(stored_name))
        except DamagedDocument as exc:  # listed on stderr; the readable documents are still listed
            report.warn(str(exc))
    if as_json:
        for document in documents:
            print(json.dumps(document_row(document)))
        return
    if not documents:
        report.info(f"no documents stored in {store.root}")
        return
    for document in documents:
        print(document_line(document))


@app.command("models")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per catalogue model."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """List the model catalogue: installed or not, how to install, size, context window, KV per token, disk."""
    from starqa.model.catalogue import model_rows

    settings = _settings(config, quiet)
    rows = model_rows(_store(settings).root / "models", settings.model)
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    for row in rows:
        state = "installed" if row["installed"] else "not installed"
        converted = f", converted: {', '.join(row['converted'])}" if row["converted"] else ""
        print(f"{row['name']}{' (default)' if row['default'] else ''}: {row['title']}; {state}{converted}")
        print(f"    {row['parameters'] / 1e9:.2f}B parameters, {row['context_window']:,}-token context, "
              f"{row['kv_bytes_per_token']:,} bytes of bfloat16 KV per token, "
              f"{report.human_bytes(row['disk_bytes'])} in the store; {row['note']}")
        if not row["installed"]:
            print(f"    install: {row['install']}")
    if not any(row["name"] == settings.model for row in rows):
        print(f"default model: {settings.model} (not a catalogue model)")


@app.command()
def info(
    name: str = typer.Argument(..., help="Document name."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Show what is stored for a document."""
    settings = _settings(config, quiet)
    document = _store(settings).get(name)
    m = document.manifest
    if as_json:
        print(json.dumps(dict(m, kv_dtype=document.kv_dtype, kv_bytes_per_token=round(document.kv_bytes_per_token, 1)),
                         indent=2))
        return
    rows = [("name", document.name), ("source", m["source"]["path"]), ("source sha256", m["source"]["sha256"][:16]),
            ("model", m["model"]), ("model fingerprint", m["model_fingerprint"]),
            ("tokenizer", f"{m['tokenizer_fingerprint']} ({m.get('tokenizer_engine', 'hf')} engine)"),
            *([("why not tiktoken", m["tokenizer_engine_reason"])] if m.get("tokenizer_engine_reason") else []),
            ("pages", str(m["pages"])), ("context tokens", f"{m['context_tokens']:,}"),
            ("blocks", str(len(m["blocks"]))), ("block / anchor size", f"{m['block_size']} / {m['anchor_size']}"),
            ("reused / encoded", f"{m.get('blocks_reused', 0)} / {m.get('blocks_encoded', len(m['blocks']))} blocks"),
            ("dtype", m["dtype"]), ("KV dtype", document.kv_dtype), ("Phase 1", f"{m.get('phase1_s', 0):.2f} s"),
            ("KV on disk", f"{m['kv_bytes']:,} bytes ({document.kv_bytes_per_token:,.0f} per token)"),
            ("updated", f"{m['created']} (version {m.get('version', 1)}, "
                        f"first stored {m.get('first_created', m['created'])})"),
            ("stored in", str(document.path))]
    for number, version in enumerate(m.get("history", [])[1:], start=1):  # the versions this one replaced
        rows.append(("previous versions" if number == 1 else "", _version_line(version)))
    for label, value in rows:
        print(f"{label + ':' if label else '':22}{value}")


def _version_line(version: dict) -> str:
    """One earlier version of a document, from its manifest's history."""
    return (f"{version['created']}: {version['context_tokens']:,} tokens, {version['blocks']} blocks "
            f"({version['blocks_reused']} reused, {version['blocks_encoded']} encoded), "
            f"{version['kv_bytes']:,} bytes of KV, Phase 1 {version['phase1_s'] or 0:.2f} s")


@app.command()
def rm(
    names: list[str] = typer.Argument(..., help="Document names."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Remove stored documents completely."""
    settings = _settings(config, quiet)
    store = _store(settings)
    names = list(dict.fromkeys(names))  # `rm a a` removes a once
    for name in names:
        store.object_path(name)  # fail before removing anything if any name is unknown (a damaged one is removed)
    for name in names:
        freed = store.remove(name)
        report.info(f"removed '{name}' ({report.human_bytes(freed)})")


@app.command()
def verify(
    name: str = typer.Argument(..., help="Document name."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Check every stored file of a document against its SHA-256."""
    settings = _settings(config, quiet)
    store = _store(settings)
    document = store.get(name)
    store.check_files(document, full=True)
    report.info(f"'{name}': {len(document.manifest['files'])} files match their checksums")


@app.command()
def gc(config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt) -> None:
    """Remove leftovers of interrupted ingests and report the bytes freed."""
    settings = _settings(config, quiet)
    removed, freed = _store(settings).collect_garbage()
    report.info(f"removed {removed} leftover item(s), freed {report.human_bytes(freed)}")


@app.command()
def serve(
    max_kv_memory: Optional[str] = typer.Option(None, "--max-kv-memory", help="Documents' KV kept in memory, least "
                                                "recently used dropped first: 4GiB, 512MiB, 0 (default: config)."),
    host: Optional[str] = typer.Option(None, "--host", help="Also listen on TCP at this address (with --port; "
                                       "requires an API key)."),
    port: Optional[int] = typer.Option(None, "--port", help="Also listen on TCP at this port (default host: "
                                       "127.0.0.1)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Key that TCP requests must send as "
                                          "'Authorization: Bearer KEY' (or set STARQA_API_KEY, which `ps` does "
                                          "not show)."),
    max_request_bytes: Optional[str] = typer.Option(None, "--max-request-bytes", help="Largest request body "
                                                    "accepted (default: config, 1MiB)."),
    max_questions_per_request: Optional[int] = typer.Option(None, "--max-questions-per-request", help="Most "
                                                            "questions in one request (default: config, 64)."),
    max_waiting_asks: Optional[int] = typer.Option(None, "--max-waiting-asks", help="Most asks waiting for the "
                                                   "engine; more get HTTP 429 (default: config, 32)."),
    max_connections: Optional[int] = typer.Option(None, "--max-connections", help="Most open connections; a "
                                                  "request beyond gets HTTP 429 (default: config, 64)."),
    max_queued_events: Optional[int] = typer.Option(None, "--max-queued-events", help="Events held for a client "
                                                    "that reads slowly, beyond which its text is merged "
                                                    "(default: config, 1024)."),
    max_decode_memory: Optional[str] = typer.Option(None, "--max-decode-memory", help="Decode buffers of the asks "
                                                    "decoded at once; an ask needing more gets HTTP 413 (default: "
                                                    "config, 1GiB)."),
    model: Optional[str] = ModelOpt, dtype: Optional[str] = DtypeOpt, device: Optional[str] = DeviceOpt,
    nproc: Optional[str] = NprocOpt, trust_remote_code: bool = TrustOpt, weights: Optional[str] = WeightsOpt,
    activations: Optional[str] = ActivationsOpt,
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Keep the model and recently used documents' KV in memory; answer `starqa ask` and HTTP on the store's socket."""
    from starqa.serve.server import serve as run_server

    settings = _settings(config, quiet, model=model, dtype=dtype, device=device, nproc=nproc,
                         max_kv_memory=max_kv_memory, max_request_bytes=max_request_bytes,
                         max_questions_per_request=max_questions_per_request, max_waiting_asks=max_waiting_asks,
                         max_connections=max_connections, max_queued_events=max_queued_events,
                         max_decode_memory=max_decode_memory, weights=weights, activations=activations)
    if settings.escalate_to != "full":  # a server holds one model: its hybrid answers escalate to full attention
        report.info(f"escalate_to {settings.escalate_to} applies to `starqa ask` in its own process; this server "
                    "answers hybrid asks again with full attention")
        settings = dataclasses.replace(settings, escalate_to="full")
    code = run_server(settings, trust_remote_code=trust_remote_code, host=host, port=port,
                      api_key=api_key or os.environ.get("STARQA_API_KEY") or None, debug=debug)
    if code:
        raise typer.Exit(code)


from starqa.eval.command import eval_command  # noqa: E402  (the eval command lives in its own package)
app.command("eval")(eval_command)
# the audit log and scoped keys: docs/governance.md
from starqa.governance.commands import audit_app, keys_app  # noqa: E402
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")


_ARGV: list[str] | None = None  # the arguments main() runs, re-used to relaunch under torchrun
_RANKS: list = [None]  # this process's Ranks once a command has set them up


def _report_failure(message: str, exc: BaseException) -> None:
    from starqa.engine import distributed

    ranks = _RANKS[0]
    if ranks is not None and ranks.distributed:
        if distributed.report_rank_error(ranks, exc):
            return  # the launcher prints one line for all ranks
        if not ranks.is_speaker and isinstance(exc, distributed.RankFailure):
            return  # rank 0 prints the same line
        if not ranks.is_speaker:
            message = f"[rank {ranks.rank}] {message}"
    report.error(message)


def _report_interrupt() -> None:
    from starqa.engine import distributed

    if not distributed.launched_rank():  # under `--nproc` the launcher says it once for every rank
        report.error("interrupted")


def _click_classes(name: str) -> tuple[type, ...]:
    """click's exception `name`, and the copy in the click that newer Typer versions vendor (typer._click)."""
    classes = [getattr(click.exceptions, name, None)]
    try:
        from typer._click import exceptions as vendored

        classes.append(getattr(vendored, name, None))
    except ImportError:
        pass
    return tuple(cls for cls in classes if cls is not None)


def main(argv: list[str] | None = None) -> int:
    global _ARGV
    args = sys.argv[1:] if argv is None else argv
    _ARGV = list(args)
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="starqa", standalone_mode=False)
        if result == 130:  # Typer turns Ctrl-C (KeyboardInterrupt) into this exit code, silently
            _report_interrupt()
        return result if isinstance(result, int) else 0
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    except _click_classes("NoArgsIsHelpError"):
        return 2  # `starqa` alone: the help was printed; no error line to add
    except _click_classes("UsageError") as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        report.error(f"{exc.format_message()}{hint}")
        return 2
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        _report_interrupt()
        return 130
    except _Relaunched as relaunched:
        return relaunched.exit_code
    except StarqaError as exc:
        if debug:
            traceback.print_exc()  # then the same one line and exit code as without --debug
        _report_failure(str(exc), exc)
        return exc.exit_code
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a bug, or an environment problem we did not foresee
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        _report_failure(f"{describe(exc)}{hint}", exc)
        return 1
    finally:
        if _RANKS[0] is not None:
            from starqa.engine import distributed

            distributed.shutdown(_RANKS[0])
            _RANKS[0] = None


def run() -> None:
    """The `starqa` command and `python -m starqa` (what torchrun starts on every rank)."""
    from starqa.engine import distributed

    code = main()
    distributed.exit_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
