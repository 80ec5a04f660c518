"""The audit log: one JSON line per answer under the store's `audit/` folder, hash-chained, one file per month.

    <root>/audit/2026-12.jsonl   records of December 2026 (UTC), 0600, in a 0700 folder
    <root>/audit/.lock           held (flock) by a writer for read-last-record + append + fsync

Every record holds `prev`, the SHA-256 of the line before it (the first line of a month file chains onto the last
line of the month before; the very first record onto GENESIS), and `seq`, one more than the record before. A
removed, edited or reordered record breaks the chain at the record after it, which `verify` reports; the last
record can only be checked against a head hash noted elsewhere (`verify` prints it).

Writers (every `starqa ask` process and a server's threads) take an exclusive lock around reading the last record,
appending and fsync, so lines never interleave; a writer killed mid-append leaves a torn last line, which the next
writer cuts off and replaces by a `repair` record (its length and SHA-256), never chaining onto it.

Retention never drops a record on its own: `prune` drops the records older than a cutoff (after exporting them if
asked), says how many, and starts the log with an `anchor` record that holds the dropped records' count and the hash
of the last one, so the records kept still verify. torch-free: the `audit` commands import only this.

Test hook: STARQA_TEST_AUDIT_PAUSE=mid-append makes a writer write half its bytes, fsync, create the file named by
STARQA_TEST_AUDIT_MARK and sleep (120 s at most), so a test can SIGKILL it mid-append.
"""

from __future__ import annotations

import calendar
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from starqa.errors import StarqaError, UsageError

LEVELS = ("off", "metadata", "full")
GENESIS = "0" * 64  # the `prev` of the first record of a log
FOLDER = "audit"
_FILE = re.compile(r"^(\d{4})-(\d{2})\.jsonl$")
_DIR_MODE, _FILE_MODE = 0o700, 0o600
_PAUSE_ENV, _MARK_ENV = "STARQA_TEST_AUDIT_PAUSE", "STARQA_TEST_AUDIT_MARK"
_THREAD_LOCK = threading.Lock()  # flock excludes other processes; this, other threads of a server


def audit_dir(root: Path | str) -> Path:
    return Path(root) / FOLDER


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def line_hash(line: bytes) -> str:
    """The `prev` a record following `line` must hold (the line's bytes without its newline)."""
    return hashlib.sha256(line).hexdigest()


def utc_time(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def parse_time(text: str) -> float:
    """Seconds since the epoch from a record's time, a date (2026-12-01), or a date and time (UTC)."""
    text = text.strip()
    for form in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M",
                 "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            parsed = time.strptime(text, form)
        except ValueError:
            continue
        fraction = float("0." + text.rsplit(".", 1)[1].rstrip("Z")) if form.startswith("%Y-%m-%dT%H:%M:%S.") else 0
        return calendar.timegm(parsed) + fraction
    raise UsageError(f"'{text}' is not a date: give YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (UTC), or a number of days "
                     "such as 7d")


def since_time(text: str, now: float | None = None) -> float:
    """--since: a date/time (UTC) or a number of days back (`7d`, `30`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*d?\s*", text)
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * 86400
    return parse_time(text)


def _month_file(folder: Path, now: float) -> Path:
    return folder / time.strftime("%Y-%m.jsonl", time.gmtime(now))


def log_files(folder: Path) -> list[Path]:
    """The month files, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if _FILE.match(path.name) and path.is_file())


def _dumps(record: dict) -> bytes:
    # ASCII only: any text (a question with a lone surrogate from the command line) is one valid line.
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _loads(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def link_after(line: bytes, record: dict | None) -> tuple[str, int]:
    """(prev, seq) that the record following `line` continues from: an anchor stands for the records it dropped."""
    if record is not None and record.get("event") == "anchor":
        return str(record.get("head")), _int(record.get("seq"))
    return line_hash(line), _int(record.get("seq") if record else 0)


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _ensure_folder(folder: Path) -> None:
    folder.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    if (folder.stat().st_mode & 0o777) != _DIR_MODE:
        os.chmod(folder, _DIR_MODE)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Locked:
    """The audit folder's exclusive lock (other processes: flock; other threads: a process-wide lock)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> "_Locked":
        _THREAD_LOCK.acquire()
        try:
            _ensure_folder(self.folder)
            self.fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, _FILE_MODE)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            _THREAD_LOCK.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        finally:
            _THREAD_LOCK.release()


def _last_line(path: Path) -> tuple[bytes | None, bytes, int]:
    """(last complete line or None, torn bytes after it, offset where the torn bytes start)."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return None, b"", 0
        chunk, position, tail = 1 << 14, size, b""
        while position > 0:
            step = min(chunk, position)
            position -= step
            handle.seek(position)
            tail = handle.read(step) + tail
            # the last newline ends the last complete line; the one before it starts it
            last_newline = tail.rfind(b"\n")
            if last_newline == -1:
                continue
            before = tail.rfind(b"\n", 0, last_newline)
            if before != -1 or position == 0:
                start = before + 1
                return tail[start:last_newline], tail[last_newline + 1:], position + last_newline + 1
        return None, tail, 0  # no newline at all: the file holds only a torn line


def _chain_head(folder: Path, now: float) -> tuple[Path, str, int, tuple[Path, int, bytes] | None]:
    """Where the next record goes, its (prev, seq), and a torn tail to cut off (file, offset, bytes) if any."""
    files = log_files(folder)
    target = _month_file(folder, now)
    if files and files[-1].name > target.name:  # the clock went back a month: keep appending to the newest file
        target = files[-1]
    torn = None
    for path in reversed([p for p in files if p.name <= target.name]):
        line, tail, offset = _last_line(path)
        if tail and path == files[-1]:
            torn = (path, offset, tail)
        if line is not None:
            prev, seq = link_after(line, _loads(line))
            return target, prev, seq, torn
    return target, GENESIS, 0, torn


def _append(path: Path, data: bytes) -> None:
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
    try:
        if os.environ.get(_PAUSE_ENV) == "mid-append":
            _pause_mid_append(fd, data)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        os.chmod(path, _FILE_MODE)
        _fsync_dir(path.parent)


def _pause_mid_append(fd: int, data: bytes) -> None:
    half = len(data) // 2
    os.write(fd, data[:half])
    os.fsync(fd)
    mark = os.environ.get(_MARK_ENV)
    if mark:
        Path(mark).write_text(str(os.getpid()))
    time.sleep(120)


def append(root: Path | str, records: Sequence[dict], now: float | None = None) -> list[dict]:
    """Chain `records` (dicts without `seq`/`prev`) onto the log and append them in one locked write with one
    fsync. A torn last line left by a killed writer is cut off first and recorded as a `repair` record. Returns
    the records as written."""
    folder = audit_dir(root)
    now = time.time() if now is None else now
    with _Locked(folder):
        target, prev, seq, torn = _chain_head(folder, now)
        lines, written = [], []
        if torn is not None:
            path, offset, tail = torn
            with path.open("r+b") as handle:
                handle.truncate(offset)
                handle.flush()
                os.fsync(handle.fileno())
            repair = {"event": "repair", "time": utc_time(now), "file": path.name, "torn_bytes": len(tail),
                      "torn_sha256": hashlib.sha256(tail).hexdigest(),
                      "note": "a writer was stopped mid-append; its partial record was cut off"}
            records = [repair, *records]
        for record in records:
            seq += 1
            full = {"seq": seq, **{k: v for k, v in record.items() if k not in ("seq", "prev")}, "prev": prev}
            line = _dumps(full)
            lines.append(line)
            written.append(full)
            prev = line_hash(line)
        _append(target, b"".join(line + b"\n" for line in lines))
    return written


# ------------------------------------------------------------------------------------------- reading

@dataclass
class Line:
    path: Path
    number: int  # 1-based within its file
    raw: bytes
    record: dict | None  # None: not a JSON object

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.number}"


def read_lines(root: Path | str) -> tuple[list[Line], tuple[Path, bytes] | None]:
    """Every complete line of the log, oldest first, and the torn tail of the newest file (if any)."""
    lines: list[Line] = []
    torn = None
    files = log_files(audit_dir(root))
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StarqaError(f"cannot read the audit log {path}: {exc.strerror or exc}") from None
        parts = data.split(b"\n")
        if parts[-1]:
            torn = (path, parts[-1])
        for number, raw in enumerate(parts[:-1], start=1):
            lines.append(Line(path, number, raw, _loads(raw)))
    return lines, torn


def records(root: Path | str) -> Iterator[dict]:
    """The answer records (not repair or anchor records), oldest first."""
    for line in read_lines(root)[0]:
        if line.record is not None and "event" not in line.record:
            yield line.record


@dataclass
class Verdict:
    records: int = 0
    files: int = 0
    breaks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    head: str = GENESIS
    last_seq: int = 0


def verify(root: Path | str) -> Verdict:
    """Check the chain: one line per break (edited, removed or reordered records), notes for what is not a break
    (a repair after a crash, an anchor left by `prune`, a torn last line not yet repaired)."""
    lines, torn = read_lines(root)
    verdict = Verdict(files=len(log_files(audit_dir(root))))
    position = {line_hash(line.raw): index for index, line in enumerate(lines)}
    expected, last_seq, max_seq = GENESIS, 0, 0
    for index, line in enumerate(lines):
        record = line.record
        if record is None:
            verdict.breaks.append(f"{line.where}: not a JSON record (edited or damaged)")
            expected, last_seq = line_hash(line.raw), last_seq + 1
            continue
        seq, prev = _int(record.get("seq")), record.get("prev")
        if record.get("event") == "anchor":
            if index == 0 or record.get("head") == expected:
                verdict.notes.append(f"{line.where}: anchor: {record.get('dropped_total', record.get('dropped'))} "
                                     f"earlier records were pruned (through {record.get('dropped_until', '?')})")
                expected, last_seq = link_after(line.raw, record)
                max_seq = max(max_seq, last_seq)
                continue
        if prev != expected:
            earlier = position.get(prev) if isinstance(prev, str) else None
            if earlier is not None and earlier > index:
                verdict.breaks.append(f"{line.where}: out of order: it chains onto {lines[earlier].where}, which "
                                      "comes after it (records were reordered)")
            elif seq <= max_seq or earlier is not None:
                verdict.breaks.append(f"{line.where}: out of order: seq {seq} after seq {last_seq} (records were "
                                      "reordered)")
            elif seq > last_seq + 1:
                missing = f"seq {last_seq + 1}" + (f" to {seq - 1}" if seq - 1 > last_seq + 1 else "")
                verdict.breaks.append(f"{line.where}: {missing} missing before it (records were removed)")
            else:
                before = lines[index - 1].where if index else "the start of the log"
                verdict.breaks.append(f"{line.where}: does not chain onto {before} (one of them was edited)")
        elif seq != last_seq + 1:
            verdict.breaks.append(f"{line.where}: seq {seq} where {last_seq + 1} was expected (edited)")
        if record.get("event") == "repair":
            verdict.notes.append(f"{line.where}: repair: a writer was stopped mid-append; its partial record "
                                 f"({record.get('torn_bytes')} bytes) was cut off, so that answer is not recorded")
        elif "event" not in record:
            verdict.records += 1
        expected, last_seq = link_after(line.raw, record)
        max_seq = max(max_seq, seq)
    if torn is not None:
        verdict.notes.append(f"{torn[0].name}: a torn last line ({len(torn[1])} bytes): a writer was stopped "
                             "mid-append; the next record written cuts it off and records the repair")
    verdict.head, verdict.last_seq = expected, last_seq
    return verdict


# ------------------------------------------------------------------------------------------- filters and export

@dataclass(frozen=True)
class Filter:
    doc: str | None = None  # a glob over document names
    since: float | None = None  # seconds since the epoch
    user: str | None = None  # an OS user name or uid
    key: str | None = None  # an API key's name

    def matches(self, record: dict) -> bool:
        if self.doc is not None and not fnmatch.fnmatchcase(str(record.get("doc", "")), self.doc):
            return False
        if self.since is not None and _record_time(record) < self.since:
            return False
        who = record.get("who") or {}
        if self.user is not None and self.user not in (str(who.get("user")), str(who.get("uid"))):
            return False
        if self.key is not None and self.key != who.get("key"):
            return False
        return True


def _record_time(record: dict) -> float:
    try:
        return parse_time(str(record.get("time", "")))
    except UsageError:
        return 0.0


def export(root: Path | str, since: float | None, write: Callable[[bytes], None]) -> int:
    """Write every stored line (answers, repairs, anchors) from `since` on, byte for byte as stored (so an export
    of the whole log verifies like the log). Returns the number of lines."""
    count = 0
    for line in read_lines(root)[0]:
        if since is not None and line.record is not None and _record_time(line.record) < since:
            continue
        write(line.raw + b"\n")
        count += 1
    return count


def write_private_file(path: Path, data: bytes) -> None:
    """`data` as a new file (0600) put in place atomically."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@dataclass
class Pruned:
    dropped: int  # answer records dropped
    lines: int  # lines dropped (answers, repairs, an earlier anchor)
    first_time: str | None
    last_time: str | None
    head: str
    exported: Path | None


def prune(root: Path | str, older_than: float, export_to: Path | None = None, now: float | None = None) -> Pruned:
    """Drop the records older than `older_than` (the oldest ones, a prefix of the chain), after writing them to
    `export_to` if given; the first file kept starts with an anchor record standing for them."""
    folder = audit_dir(root)
    now = time.time() if now is None else now
    with _Locked(folder):
        lines, torn = read_lines(root)
        cut = 0
        while cut < len(lines) and lines[cut].record is not None and _record_time(lines[cut].record) < older_than:
            cut += 1
        dropped_lines = lines[:cut]
        answers = [line for line in dropped_lines if "event" not in line.record]
        previous = sum(_int(line.record.get("dropped_total")) for line in dropped_lines
                       if line.record.get("event") == "anchor")
        if not dropped_lines or not answers:
            return Pruned(0, 0, None, None, "", None)
        if export_to is not None:  # first: a failed export drops nothing
            write_private_file(export_to, b"".join(line.raw + b"\n" for line in dropped_lines))
        head, last_seq = link_after(dropped_lines[-1].raw, dropped_lines[-1].record)
        anchor = {"seq": last_seq, "event": "anchor", "time": utc_time(now), "dropped": len(answers),
                  "dropped_total": previous + len(answers), "dropped_from": answers[0].record.get("time"),
                  "dropped_until": answers[-1].record.get("time"), "head": head, "prev": GENESIS}
        kept = lines[cut:]
        keep_file = kept[0].path if kept else dropped_lines[-1].path
        body = _dumps(anchor) + b"\n" + b"".join(line.raw + b"\n" for line in kept if line.path == keep_file)
        if torn is not None and torn[0] == keep_file:
            body += torn[1]  # left for the next writer to repair, as it would have
        # The kept file is rewritten first (atomically); the older files go after: a crash in between leaves
        # them before an anchor whose head they match, which verifies.
        write_private_file(keep_file, body)
        for path in log_files(folder):
            if path.name < keep_file.name:
                path.unlink()
        _fsync_dir(folder)
    return Pruned(len(answers), len(dropped_lines), answers[0].record.get("time"), answers[-1].record.get("time"),
                  head, export_to)


def older_than_retention(root: Path | str, days: int | None, now: float | None = None) -> int:
    """How many answer records are older than `days` (0 when no retention is set)."""
    if not days:
        return 0
    cutoff = (time.time() if now is None else now) - days * 86400
    return sum(1 for record in records(root) if _record_time(record) < cutoff)


# ------------------------------------------------------------------------------------------- recording asks

def os_user() -> dict:
    """Who runs this process: the OS user's name and uid."""
    return {"user": user_name(os.getuid()), "uid": os.getuid()}


def user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def document_version(document, engine) -> dict:
    """The exact stored version that answered (goes into the answer event, then into the record)."""
    manifest = document.manifest
    return {"object": Path(document.path).name, "version": manifest.get("version", 1),
            "source_sha256": manifest.get("source", {}).get("sha256"), "model": getattr(engine, "model_name", None),
            "dtype": str(getattr(engine, "dtype", "")).removeprefix("torch.") or None, "kv_dtype": document.kv_dtype}


class AskRecorder:
    """Watches one ask's events (starqa.answer.events and a server's failed/done/unserved) and, when the ask ends,
    appends its records: one per answer, and one per question of a document (or of the whole ask) that failed."""

    def __init__(self, root: Path | str, level: str, *, who: dict, via: str, questions: Sequence[str],
                 docs: Sequence[str], attention: str, endpoint: str | None = None) -> None:
        self.root, self.level, self.who, self.via, self.endpoint = root, level, who, via, endpoint
        self.questions, self.docs, self.attention = list(questions), list(docs), attention
        self.started = time.perf_counter()
        self.answers: list[dict] = []
        self.failed: dict[str, str] = {}  # document -> error message
        self.current: str | None = None
        self.answered_docs: set[str] = set()
        self.error: str | None = None
        self.exit_code: int | None = None
        self.unserved = False
        self.closed = False
        self.cost_s = 0.0  # time spent recording (the benchmark reports it)

    def observe(self, event: dict) -> None:
        started = time.perf_counter()
        kind = event.get("type")
        if kind == "answer":
            self.answers.append(event)
            self.answered_docs.add(event.get("doc"))
        elif kind == "document":
            self.current = event.get("doc")
        elif kind == "error":
            doc = self.current
            if doc is not None and doc not in self.answered_docs and doc not in self.failed:
                message = str(event.get("message", ""))
                self.failed[doc] = message.removeprefix(f"{doc}: ")
        elif kind == "failed":
            self.error, self.exit_code = str(event.get("message")), _int(event.get("exit_code")) or 1
        elif kind == "done":
            self.exit_code = _int(event.get("exit_code"))
        elif kind == "unserved":
            self.unserved = True
        self.cost_s += time.perf_counter() - started

    def wrap(self, emit: Callable[[dict], None]) -> Callable[[dict], None]:
        def emit_and_observe(event: dict) -> None:
            self.observe(event)
            emit(event)

        return emit_and_observe

    def finish(self, exit_code: int | None = None, error: str | None = None) -> list[dict]:
        """Append the ask's records (once). `exit_code` None: the one a `done` event gave, else 130 (cancelled)."""
        if self.closed:
            return []
        self.closed = True
        if self.unserved and not self.answers:
            return []  # nothing was done here: whoever answers it records it
        started = time.perf_counter()
        if exit_code is None:
            exit_code = self.exit_code if self.exit_code is not None else 130
        error = error or self.error or ("cancelled" if exit_code == 130 and self.exit_code is None else None)
        wall_s = round(time.perf_counter() - self.started, 4)
        rows = [self._answer_record(event, exit_code, wall_s) for event in self.answers]
        for doc, message in self.failed.items():
            rows += [self._failure_record(doc, question, exit_code, message, wall_s) for question in self.questions]
        if not rows and exit_code != 0:
            doc = ",".join(self.docs) or "--all"
            rows = [self._failure_record(doc, question, exit_code, error or f"exit code {exit_code}", wall_s)
                    for question in self.questions]
        written = append(self.root, rows) if rows else []
        self.cost_s += time.perf_counter() - started
        return written

    def _base(self) -> dict:
        base = {"time": utc_time(time.time()), "who": self.who, "via": self.via}
        if self.endpoint:
            base["endpoint"] = self.endpoint
        return base

    def _texts(self, question: str, answer: str | None) -> dict:
        fields = {"level": self.level, "question_sha256": sha256_text(question), "question_chars": len(question)}
        if answer is not None:
            fields.update(answer_sha256=sha256_text(answer), answer_chars=len(answer))
        if self.level == "full":
            fields["question"] = question
            if answer is not None:
                fields["answer"] = answer
        return fields

    def _answer_record(self, event: dict, exit_code: int, wall_s: float) -> dict:
        row, version = event.get("answer") or {}, event.get("version") or {}
        pages = sorted({quote.get("page") for quote in row.get("evidence") or [] if isinstance(quote, dict)
                        and isinstance(quote.get("page"), int)})
        source_pages = sorted({page for source in row.get("sources") or [] if isinstance(source, dict)
                               for page in source.get("pages") or [] if isinstance(page, int)})
        return {**self._base(), "doc": event.get("doc"), **version, "attention": row.get("attention"),
                **self._texts(str(row.get("question", "")), str(row.get("answer", ""))),
                "grounded": row.get("grounded"), "pages": pages, "source_pages": source_pages,
                "cache_hit": row.get("cache_hit"),
                "tokens": {"context": row.get("context_tokens"), "query": row.get("query_tokens"),
                           "answer": row.get("answer_tokens")},
                "timings": {"wall_s": wall_s, "phase1_s": row.get("phase1_s"), "prefill_s": row.get("prefill_s"),
                            "ttft_s": row.get("ttft_s"), "decode_tokens_per_s": row.get("decode_tokens_per_s")},
                "exit_code": exit_code}

    def _failure_record(self, doc: str, question: str, exit_code: int, message: str, wall_s: float) -> dict:
        return {**self._base(), "doc": doc, "attention": self.attention, **self._texts(question, None),
                "error": message[:500], "timings": {"wall_s": wall_s}, "exit_code": exit_code}


def recorder(settings, *, who: dict, via: str, questions: Sequence[str], docs: Sequence[str], attention: str,
             endpoint: str | None = None) -> AskRecorder | None:
    """The recorder of one ask under `settings` (None with `audit: off`)."""
    if settings.audit == "off":
        return None
    from starqa.store.root import store_root

    return AskRecorder(store_root(settings.store), settings.audit, who=who, via=via, questions=questions, docs=docs,
                       attention=attention, endpoint=endpoint)


# ------------------------------------------------------------------------------------------- printing

def record_line(record: dict) -> str:
    """One record as `starqa audit` prints it."""
    who = record.get("who") or {}
    person = who.get("key") and f"key:{who['key']}" or who.get("user") or f"uid:{who.get('uid', '?')}"
    version = f"@v{record['version']}" if record.get("version") is not None else ""
    status = "error" if record.get("error") else ("grounded" if record.get("grounded") else "not grounded")
    pages = record.get("pages") or []
    parts = [str(record.get("time", "?")), f"{person} ({record.get('via', '?')})",
             f"{record.get('doc')}{version}", str(record.get("attention")), status]
    if pages:
        parts.append("p. " + ",".join(str(page) for page in pages))
    parts.append(f"{(record.get('timings') or {}).get('wall_s', 0):.2f} s")
    parts.append(f"exit {record.get('exit_code')}")
    if "question" in record:
        parts.append(f"Q: {record['question']!r}")
        if "answer" in record:
            parts.append(f"A: {record['answer']!r}")
    else:
        parts.append(f"Q: sha256:{str(record.get('question_sha256'))[:12]} ({record.get('question_chars')} chars)")
    if record.get("error"):
        parts.append(f"error: {record['error']}")
    return "  ".join(parts)
