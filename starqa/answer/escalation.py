"""Where hybrid answering sends an answer that is not grounded (`--escalate-to full|MODEL`, config `escalate_to`).

`full` (the default) answers it again with full attention on the document's own model (starqa.answer.hybrid). A MODEL (a
catalogue name, a .gguf file, an HF directory: what `--model` takes) answers it again with that model, a
FrugalGPT-style cascade: the small model answers every question, the larger one only those the small one could not
ground. The larger model answers from its own stored copy of the document:

    <root>/documents/<name>@<model>     e.g. contract@qwen2.5-coder-1.5b

a document like any other (versioned, written atomically, `starqa list` shows it), stored from the primary
document's stored text and page map on first need (so its quotes and pages are the primary's), or ahead of time
with `starqa ingest FILE --name <name>@<model> --model MODEL`. The primary document is never written. A copy whose
text is not the primary's current text (the primary was ingested again) or that was stored with other settings is
stored again on the next escalation, taking over the blocks that did not change.

How the larger model answers: TARGET_ATTENTION (see docs/hybrid.md, "Escalating to a larger model", for the
measurement that chose it). The escalated questions of one batch are answered together.

One process holds both models while it answers (the primary's engine and the target's); `starqa serve` escalates
only to full attention and refuses a model (HTTP 400): a CLI ask with `--escalate-to MODEL` answers in its own
process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass

from starqa import report
from starqa.errors import StarqaError, UsageError

FULL = "full"
# How the larger model answers an escalated question: "star" (its stored copy's KV: one Phase 1 per document, then
# cheap per question) or "full" (full attention over the stored text with the larger model).
TARGET_ATTENTION = "star"
COPY_SEPARATOR = "@"


def check_target(spec: str, settings, *, attention: str, explicit: bool) -> str:
    """Before any work: "full", or the target model's name as manifests record it (starqa.model.resolve.resolve_model).
    An unknown or not installed model is a usage error (one line, exit 2); so is an explicit --escalate-to with
    another mode than hybrid, or a model with several processes."""
    from starqa.store.root import store_root

    spec = spec.strip()
    if explicit and attention != "hybrid":
        raise UsageError(f"--escalate-to applies to --attention hybrid, not {attention}")
    if spec == FULL or attention != "hybrid":
        return FULL
    if str(settings.nproc) not in ("1", "auto"):
        raise UsageError("--escalate-to MODEL answers in one process; drop --nproc (or escalate to full)")
    from starqa.model.resolve import resolve_model

    return resolve_model(spec, store_root(settings.store) / "models").name


def copy_name(document_name: str, model_name: str) -> str:
    """The stored copy of `document_name` for `model_name`: `<name>@<model>` (a model given as a path: its file or
    folder name and a short hash of the path)."""
    if "/" in model_name or "\\" in model_name:
        stem = re.sub(r"\.gguf$", "", model_name.rstrip("/").rsplit("/", 1)[-1])
        slug = f"{stem}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}"
    else:
        slug = model_name
    slug = re.sub(r"[^\w.+-]+", "-", slug).strip("-.") or "model"
    return f"{document_name}{COPY_SEPARATOR}{slug}"


@dataclass
class Target:
    """The larger model's side of one document: its engine, its stored copy and that copy's context."""

    model: str
    engine: object
    document: object  # starqa.store.document_store.StoredDocument: the copy
    context: object  # ContextKV: the copy's stored KV (star) or its full-attention KV (full)
    phase1_s: float  # Phase 1 of the copy when this ask stored it, else 0

    def answer(self, questions: list[str], settings, each_token=None) -> list:
        """The larger model's replies (starqa.answer.ask.Reply) to these questions, in order (Star: decoded
        together); `each_token()` runs for every token, as in the first pass."""
        from starqa.answer import passes

        if TARGET_ATTENTION == "star":
            return passes.ask_star(self.engine, self.context, self.document, questions, settings, cache_hit=True,
                                   phase1_s=0.0, each_token=each_token)
        return passes.ask_full(self.engine, self.document, self.context, questions, settings, each_token=each_token)


class Escalation:
    """One ask's escalation target (`model`: a resolved model name, or None for full attention), loaded and
    opened per document on the first escalated question."""

    def __init__(self, model: str | None, engine_loader, store) -> None:
        self.model, self.engine_loader, self.store = model, engine_loader, store
        self._engine = None
        self._targets: dict[str, Target | None] = {}

    def target(self, opened, settings) -> Target | None:
        """The larger model's side of the opened document, or None: full attention on its own model (no target
        model, or the target is the document's own model)."""
        if self.model is None or self.model == opened.document.manifest.get("model"):
            return None
        key = str(opened.document.path)
        if key not in self._targets:
            self._targets[key] = self._open(opened, settings)
        return self._targets[key]

    def release(self) -> None:
        """Drop the documents' copies opened so far (their KV), keeping the model: the next document's turn."""
        self._targets.clear()

    def _open(self, opened, settings) -> Target | None:
        if self._engine is None:
            dtype = opened.document.manifest.get("dtype") if settings.dtype == "auto" else None
            self._engine = self.engine_loader(self.model, dtype)
        engine = self._engine
        if engine.model_fingerprint == opened.engine.model_fingerprint:
            return None  # the document's own model under another name: full attention
        document, phase1_s = stored_copy(self.store, opened.document, engine, settings)
        if TARGET_ATTENTION == "star":
            from starqa.answer.passes import load_context

            context = load_context(engine, self.store, document)
        else:
            from starqa.answer.passes import full_attention_kv, full_context_ids

            context = full_attention_kv(engine, document, full_context_ids(engine, document))
        return Target(engine.model_name, engine, document, context, phase1_s)


def stored_copy(store, document, engine, settings):
    """(the document's stored copy for `engine`'s model, Phase 1 seconds spent storing it now or 0.0): the copy
    kept when it holds the document's current text and pages and suits the engine, else stored (again) from the
    document's stored text, with the document's block and anchor sizes."""
    from starqa.engine.ingest import check_usable, ingest_text

    name = copy_name(document.name, engine.model_name)
    manifest = document.manifest
    copy_settings = dataclasses.replace(settings, block_size=manifest["block_size"],
                                        anchor_size=manifest["anchor_size"])
    if store.exists(name):
        try:
            copy = store.get(name)
            if _same_text(copy.manifest, manifest):
                check_usable(copy, engine, copy_settings, explicit_sizes=False)
                return copy, 0.0
            why = "it holds another version of the text"
        except StarqaError as exc:  # damaged, or stored with other settings: stored again
            why = str(exc)
        report.info(f"storing '{name}' again ({why:.120})")
    else:
        report.info(f"storing '{document.name}' for {engine.model_name} as '{name}' (once; later escalations "
                    "reuse it)")
    result = ingest_text(name, document.text(), document.pages(), manifest.get("source", {}), copy_settings,
                         engine, store)
    return store.get(name), result.phase1_s


def _same_text(copy: dict, primary: dict) -> bool:
    files, theirs = copy.get("files", {}), primary.get("files", {})
    return all(files.get(f, {}).get("sha256") == theirs.get(f, {}).get("sha256") is not None
               for f in ("text.txt", "pages.json"))


# ---------------------------------------------------------------- eval (starqa.eval.command)


def target_modes(modes: list) -> list:
    """The modes the escalation target runs on each eval case: TARGET_ATTENTION's (the Star configurations, or
    full attention)."""
    return [mode for mode in modes if (mode.name == "full") == (TARGET_ATTENTION == "full")]


def with_escalation(records: list[dict], target_records: list[dict], model: str) -> list[dict]:
    """`records` plus one hybrid record per case and Star configuration: the Star answer when grounded, else the
    target model's answer to the same case (its record in TARGET_ATTENTION, the same Star configuration where it
    has one) with both passes' seconds (starqa.answer.hybrid.compose_record)."""
    from starqa.answer.hybrid import compose_record

    by_case: dict[tuple, list[dict]] = {}
    by_question: dict[tuple, list[dict]] = {}  # a document's cases: their length is each tokenizer's own count
    for record in target_records:
        if (record["mode"] == "full") == (TARGET_ATTENTION == "full"):
            by_case.setdefault((record["task"], record["length"], record["index"]), []).append(record)
            by_question.setdefault((record["task"], record["index"]), []).append(record)
    result = []
    for record in records:
        result.append(record)
        theirs = by_case.get((record["task"], record["length"], record["index"]))
        if theirs is None and len({r["length"] for r in by_question.get((record["task"], record["index"]), [])}) == 1:
            theirs = by_question[(record["task"], record["index"])]
        if record["mode"] != "star" or "grounded" not in record or not theirs:
            continue
        same = [r for r in theirs if (r["block_size"], r["anchor_size"]) == (record["block_size"],
                                                                               record["anchor_size"])]
        result.append(compose_record(record, (same or theirs)[0], escalated_to=model))
    return result


def target_log_path(path, model: str):
    """The escalation target's own --resume log beside the given one (a log holds one model's records)."""
    from pathlib import Path

    path = Path(path)
    return path.with_name(f"{path.stem}{COPY_SEPARATOR}{copy_name('', model).lstrip(COPY_SEPARATOR)}{path.suffix}")
