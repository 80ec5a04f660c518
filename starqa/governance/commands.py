"""The `starqa audit` and `starqa keys` commands (the audit log: starqa.governance.audit; scoped keys:
starqa.governance.keys), and the audit hook of an ask answered in its own process. torch-free, like the modules they
use."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from starqa import report
from starqa.errors import StarqaError, UsageError, describe

ConfigOpt = typer.Option(None, "--config", help="YAML file layered over configs/default.yaml.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Only results and errors.")
DebugOpt = typer.Option(False, "--debug", help="Show the full traceback of an error.")
SinceOpt = typer.Option(None, "--since", help="From this time on: YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS] (UTC), or a "
                        "number of days back (7d).")

audit_app = typer.Typer(invoke_without_command=True, no_args_is_help=False, add_completion=False,
                        help="List the audit log's records (who asked what about which document version); "
                             "verify, export and prune it.")
keys_app = typer.Typer(no_args_is_help=True, add_completion=False,
                       help="API keys for `starqa serve` over TCP, each limited to the documents its globs match.")


def _root(config: Optional[Path], quiet: bool = False):
    from starqa.config import load_settings
    from starqa.store.root import store_root

    report.set_quiet(quiet)
    settings = load_settings(config)
    return settings, store_root(settings.store)


# ------------------------------------------------------------------------------------------- the ask's hook

class AuditedAsk:
    """starqa.answer.ask as `starqa ask` uses it in its own process, with the audit hook: `run(...)` answers as
    starqa.answer.ask.run does, its events watched by an audit recorder (starqa.governance.audit.AskRecorder), and
    appends the ask's records when it ends, whatever the outcome. A record that cannot be written is a warning: the
    answers were given. Only the speaking rank of several processes records."""

    def __init__(self, asking, settings, *, questions: list[str], docs: list[str], attention: str,
                 speaker: bool = True) -> None:
        from starqa.governance import audit

        self.asking = asking
        self.recorder = audit.recorder(settings, who=audit.os_user(), via="cli", questions=questions, docs=docs,
                                       attention=attention) if speaker else None

    def run(self, *args, emit, **kwargs) -> int:
        if self.recorder is None:
            return self.asking.run(*args, emit=emit, **kwargs)
        return audited_ask(self.recorder, lambda wrap: self.asking.run(*args, emit=wrap(emit), **kwargs))


def audited_ask(recorder, run_ask: Callable[[Callable], int]) -> int:
    """`run_ask(wrap)` (wrap: what to put around the ask's emit), then the records of its outcome."""
    try:
        code = run_ask(recorder.wrap)
    except StarqaError as exc:
        _finish(recorder, exc.exit_code, str(exc))
        raise
    except KeyboardInterrupt:
        _finish(recorder, 130, "interrupted")
        raise
    except Exception as exc:
        _finish(recorder, 1, describe(exc))
        raise
    _finish(recorder, code)
    return code


def _finish(recorder, exit_code: int, error: str | None = None) -> None:
    if recorder is None:
        return
    try:
        recorder.finish(exit_code, error)
    except (OSError, StarqaError) as exc:
        report.warn(f"no audit record written: {describe(exc)}")


# ------------------------------------------------------------------------------------------- starqa audit

@audit_app.callback()
def audit_list(
    ctx: typer.Context,
    doc: Optional[str] = typer.Option(None, "--doc", help="Only this document (a name or a glob)."),
    since: Optional[str] = SinceOpt,
    user: Optional[str] = typer.Option(None, "--user", help="Only asks by this OS user (name or uid)."),
    key: Optional[str] = typer.Option(None, "--key", help="Only asks made with this API key (its name)."),
    as_json: bool = typer.Option(False, "--json", help="The records as stored, one JSON object per line."),
    last: Optional[int] = typer.Option(None, "--last", help="Only the last N matching records."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """List the audit log's records, oldest first (filters combine)."""
    if ctx.invoked_subcommand is not None:
        return
    from starqa.governance import audit

    settings, root = _root(config, quiet)
    wanted = audit.Filter(doc=doc, since=audit.since_time(since) if since else None, user=user, key=key)
    if last is not None and last <= 0:
        raise UsageError(f"--last must be a positive number of records, not {last}")
    found = [record for record in audit.records(root) if wanted.matches(record)]
    if last is not None:
        found = found[-last:]
    for record in found:
        print(json.dumps(record, ensure_ascii=False) if as_json else audit.record_line(record))
    if not found:
        report.info(f"no audit records{' match' if any((doc, since, user, key)) else ''} in {audit.audit_dir(root)}"
                    + ("" if settings.audit != "off" else " (audit: off in the config: asks are not recorded)"))
    _retention_note(root, settings)


def _retention_note(root: Path, settings) -> None:
    from starqa.governance import audit

    old = audit.older_than_retention(root, settings.audit_retention_days)
    if old:
        report.warn(f"{old} records are older than audit_retention_days ({settings.audit_retention_days}): "
                    "`starqa audit prune` drops them (add --export FILE to keep a copy); nothing drops them until then")


@audit_app.command("verify")
def audit_verify(config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt) -> None:
    """Check the hash chain: one line per break (an edited, removed or reordered record) and exit 1."""
    from starqa.governance import audit

    settings, root = _root(config, quiet)
    verdict = audit.verify(root)
    for note in verdict.notes:
        report.info(note)
    for line in verdict.breaks:
        print(line)
    if verdict.breaks:
        report.error(f"the audit chain is broken in {len(verdict.breaks)} place(s) ({verdict.records} records in "
                     f"{verdict.files} files, {audit.audit_dir(root)})")
        raise typer.Exit(1)
    report.info(f"audit chain intact: {verdict.records} records in {verdict.files} files; last seq "
                f"{verdict.last_seq}, head sha256 {verdict.head} (keep it elsewhere: it also proves the last record "
                "unchanged)")
    _retention_note(root, settings)


@audit_app.command("export")
def audit_export(
    since: Optional[str] = SinceOpt,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file (0600, replaced "
                                          "atomically) instead of standard output."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """The records as stored (JSON lines, byte for byte: an export of the whole log verifies like the log)."""
    from starqa.governance import audit

    _, root = _root(config, quiet)
    start = audit.since_time(since) if since else None
    if output is None:
        count = audit.export(root, start, sys.stdout.buffer.write)
        sys.stdout.buffer.flush()
    else:
        if output.is_dir():
            raise UsageError(f"--output {output} is a folder: give a file name")
        chunks: list[bytes] = []
        count = audit.export(root, start, chunks.append)
        try:
            audit.write_private_file(output, b"".join(chunks))
        except OSError as exc:
            raise StarqaError(f"cannot write {output}: {exc.strerror or exc}") from None
    report.info(f"exported {count} lines" + (f" to {output}" if output else ""))


@audit_app.command("prune")
def audit_prune(
    older_than: Optional[int] = typer.Option(None, "--older-than", help="Days (default: audit_retention_days)."),
    export_to: Optional[Path] = typer.Option(None, "--export", help="First write the records dropped to this "
                                             "file (nothing is dropped if that fails)."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Drop the records older than the retention, saying how many; the log then starts with an anchor record
    (their count and the last one's hash), so what is kept still verifies."""
    from starqa.governance import audit

    settings, root = _root(config, quiet)
    days = older_than if older_than is not None else settings.audit_retention_days
    if days is None:
        raise UsageError("nothing to prune: audit_retention_days is not set; set it in a --config file or pass "
                         "--older-than DAYS")
    if days <= 0:
        raise UsageError(f"--older-than must be a positive number of days, not {days}")
    if export_to is not None and export_to.is_dir():
        raise UsageError(f"--export {export_to} is a folder: give a file name")
    cutoff = time.time() - days * 86400
    try:
        pruned = audit.prune(root, cutoff, export_to)
    except OSError as exc:
        raise StarqaError(f"nothing dropped: {exc.strerror or exc} ({getattr(exc, 'filename', '')})") from None
    if not pruned.dropped:
        report.info(f"no records older than {days} days; nothing dropped")
        return
    saved = f"; they were exported to {pruned.exported}" if pruned.exported else ""
    print(f"dropped {pruned.dropped} records older than {days} days ({pruned.first_time} to {pruned.last_time})"
          f"{saved}; the log now starts with an anchor record (last dropped sha256 {pruned.head})")


# ------------------------------------------------------------------------------------------- starqa keys

@keys_app.command("add")
def keys_add(
    name: str = typer.Argument(..., help="The key's name (audit records name it)."),
    docs: list[str] = typer.Option(..., "--docs", help="Documents the key may see and ask: a name or a glob "
                                   "('contract-*'); repeat it or separate with commas."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Make a key and print it once (only its SHA-256 is stored)."""
    from starqa.governance import keys

    _, root = _root(config, quiet)
    secret = keys.add_key(root, name, docs)
    print(secret)
    report.info(f"key '{name}' may ask {', '.join(keys.read_keys(root)[-1].docs)}: it is shown once, now; the store "
                f"keeps only its SHA-256 ({keys.keys_path(root)}). Send it as 'Authorization: Bearer KEY' to "
                "`starqa serve --port`")


@keys_app.command("list")
def keys_list(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per key (its SHA-256, never the key)."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """List the keys: name, document globs, created, revoked."""
    from starqa.governance import keys

    _, root = _root(config, quiet)
    found = keys.read_keys(root)
    for key in found:
        if as_json:
            print(json.dumps(key.row()))
        else:
            state = f"revoked {key.revoked}" if key.revoked else "active"
            print(f"{key.name:20} {','.join(key.docs):30} created {key.created}  {state}  sha256 {key.sha256[:12]}")
    if not found:
        report.info(f"no keys in {keys.keys_path(root)}; `starqa keys add NAME --docs GLOB` makes one")


@keys_app.command("revoke")
def keys_revoke(
    name: str = typer.Argument(..., help="The key's name."),
    config: Optional[Path] = ConfigOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Revoke a key: a running server refuses it (401) from its next request on."""
    from starqa.governance import keys

    _, root = _root(config, quiet)
    key = keys.revoke_key(root, name)
    report.info(f"key '{key.name}' revoked on {key.revoked}")
