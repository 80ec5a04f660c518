"""The engine worker of `starqa serve`: one thread owns the model and the documents' KV kept in memory; asks wait
in one FIFO queue and are answered in turn, each sending its events to its own queue, so a client that reads
slowly (or not at all) never holds the worker up. An ask is answered by the code `starqa ask` runs in its own
process (starqa.answer.ask), so it gets the same events.

Asks of one question or a few (no more than the batch size) about the same document, with the same settings,
that wait at the same time are decoded together (engine.generate_batch): one read of the weights and of the KV per
step serves them all, and each is answered as if asked alone.

The engine thread also loads the model (`start`), so that one thread runs every parallel region, as in `starqa ask`'s
own process: each thread that starts OpenMP work gets its own team of threads, and with a second team (the model
loaded in the main thread) libgomp stops spinning between regions (its "throttled" mode, for more threads than
cores): decoding then ran at a different speed than in a process, slower on a quiet machine. An ask that is not
streamed (`stream: false`) is not decoded to text per token, and sends no event until its answer.

`prepare` runs before an ask is queued, in the HTTP layer's threads: it refuses what cannot be answered (a bad or
unknown name: 400/404) and says when this server cannot answer as `starqa ask` would in its own process (another
model or dtype than the one held, another device, several processes: 409), so the CLI answers it itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path

from starqa import report
from starqa.answer import ask, events, passes
from starqa.governance.audit import document_version
from starqa.engine.distributed import Ranks, requested_nproc
from starqa.errors import StarqaError, UsageError, describe
from starqa.serve import limits, protocol
from starqa.serve.kv_memory import KVMemory
from starqa.serve.protocol import AskRequest, RequestError

_ids = itertools.count(1)


class Cancelled(Exception):
    """The ask's client went away (or the server is stopping): stop decoding for it."""


class Job:
    """One queued ask. `deliver(event)` hands an event to the response that streams it (thread-safe, never
    blocks); `deliver(None)` ends it."""

    def __init__(self, request: AskRequest, deliver: Callable[[dict | None], None], peer: str = "",
                 recorder=None) -> None:
        self.id = next(_ids)
        self.request = request
        self.peer = peer
        # starqa.governance.audit.AskRecorder: sees every event; records the ask when it closes
        self.recorder = recorder
        self._deliver = deliver
        self.cancelled = threading.Event()
        self.queued_at = time.monotonic()
        self.closed = False
        self.deltas = 0  # pieces of answer text emitted (the log says how far a cancelled ask got)
        self.events = None  # the response's limits.EventQueue (its `merged` is counted when the ask ends)

    def emit(self, event: dict) -> None:
        """For an ask answered alone: its client gone, decoding stops (the exception unwinds the engine)."""
        if self.recorder is not None:
            self.recorder.observe(event)
        self.check()
        self.deltas += event.get("type") == "delta"
        self._offer(event)

    def check(self) -> None:
        """Raise Cancelled when the client went away (called per event, and per decoded token)."""
        if self.cancelled.is_set():
            raise Cancelled()

    def offer(self, event: dict) -> None:
        """For an ask decoded with others: its client gone, its events are dropped and the others go on."""
        if self.recorder is not None:
            self.recorder.observe(event)
        self._offer(event)

    def _offer(self, event: dict) -> None:
        if not self.cancelled.is_set():
            try:
                self._deliver(event)
            except RuntimeError:  # the event loop is closed: the server is going away
                self.cancelled.set()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.recorder is not None:
                try:
                    self.recorder.finish()
                except Exception as exc:  # noqa: BLE001 - the answer was given; the log says it was not recorded
                    report.warn(f"ask #{self.id}: no audit record written: {describe(exc)}")
            try:
                self._deliver(None)
            except RuntimeError:
                pass

    def summary(self) -> dict:
        request = self.request
        return {"id": self.id, "docs": list(request.docs) or ["--all"], "questions": len(request.questions),
                "waited_s": round(time.monotonic() - self.queued_at, 3)}


class Worker:
    """`load_engine()` makes the engine; `start` calls it in the engine thread, which then answers every ask."""

    def __init__(self, load_engine: Callable[[], object], settings, store, *, trust_remote_code: bool,
                 log: Callable[[str], None] = report.info, debug: bool = False) -> None:
        self._load_engine = load_engine
        self.engine = None  # set by start()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self.settings = settings  # the server's own: a request's defaults
        self.store = store
        self.trust_remote_code = trust_remote_code
        self.kv = KVMemory(settings.max_kv_memory)
        self.log, self.debug = log, debug
        self.started_at = time.time()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="starqa-engine", daemon=True)
        self.counts = {"received": 0, "answered": 0, "decoded_together": 0, "cancelled": 0, "failed": 0, "unserved": 0,
                       "refused_busy": 0, "events_merged": 0}

    # ------------------------------------------------------------------ the HTTP layer's side

    def start(self) -> None:
        """Start the engine thread and wait until it has loaded the model (its error, if it failed, is raised
        here)."""
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def prepare(self, request: AskRequest) -> None:
        """Refuse an ask that cannot be answered (RequestError 400/404), or that this server would answer
        differently from `starqa ask` in its own process (409). Store reads only: runs outside the worker."""
        settings = request.settings
        why = None
        if request.attention in ("star", "hybrid") and requested_nproc(settings.nproc, settings.device) > 1:
            why = f"this ask runs in {requested_nproc(settings.nproc, settings.device)} processes, the server in one"
        elif not _same_device(settings.device, self.engine.device):
            why = f"this ask runs on device {settings.device}, the server on {self.engine.device}"
        elif settings.attention_backend != self.settings.attention_backend:
            why = (f"this ask uses the {settings.attention_backend} attention backend, the server "
                   f"{self.settings.attention_backend}")
        elif settings.weights != self.settings.weights:  # what decoding reads: the answer may differ
            why = f"this ask decodes with --weights {settings.weights}, the server with {self.settings.weights}"
        elif settings.activations != self.settings.activations:
            why = (f"this ask decodes with --activations {settings.activations}, the server with "
                   f"{self.settings.activations}")
        elif request.trust_remote_code != self.trust_remote_code:
            why = "this ask and the server differ in --trust-remote-code"
        elif settings.max_new_tokens > self.engine.context_window:  # each answer preallocates its KV for this many
            why = (f"max_new_tokens {settings.max_new_tokens:,} is more than the model's context of "
                   f"{self.engine.context_window:,} tokens")
        elif request.attention in ("star", "hybrid") and settings.batch_size > protocol.MAX_BATCH_SIZE:
            why = (f"batch_size {settings.batch_size} is more than the server decodes at once "
                   f"({protocol.MAX_BATCH_SIZE})")
        if why is not None:
            raise _unserved(why)
        self.kv.forget_stale(self._linked)  # documents re-ingested or removed since the last ask
        try:
            targets = ask.resolve_documents(self.store, request.docs, request.all_documents, files=False)
        except UsageError as exc:
            raise RequestError(400, str(exc)) from None
        context_tokens = 0  # the longest document's, for full attention's decode buffer
        for target in targets:
            try:
                document = self.store.get(target)
            except UsageError as exc:
                if len(targets) > 1:
                    continue  # reported on its own line as the answers stream, as `starqa ask` reports it
                unknown = not self.store.exists(target) and _valid_name(target)
                raise RequestError(404 if unknown else 400, str(exc), "not_found" if unknown else "invalid_request",
                                   exc.exit_code) from None
            except StarqaError:
                continue  # a damaged document: the answer stream says so, as `starqa ask` would
            model, dtype = ask.engine_for(document.manifest, settings, request.explicit_model)
            if self.holds(model, dtype, settings) is False:
                raise _unserved(f"document '{target}' is answered with {model} ({dtype or settings.dtype}); the "
                                f"server holds {self.engine.model_name} ({_dtype_name(self.engine.dtype)})")
            context_tokens = max(context_tokens, int(document.manifest.get("context_tokens", 0)))
        needed = limits.decode_bytes(self.engine, settings, request.questions, request.attention, context_tokens)
        if needed > self.settings.max_decode_memory:
            raise limits.decode_refusal(needed, self.settings.max_decode_memory)

    def submit(self, job: Job) -> None:
        """Queue `job`; RequestError 429 when `max_waiting_asks` asks wait already."""
        with self._cond:
            if self._stopping:
                job.offer(protocol.unserved("the server is stopping"))
                job.close()
                return
            gone = [queued for queued in self._waiting if queued.cancelled.is_set()]
            for queued in gone:  # their clients went away: they hold their requests' memory for nothing
                self._waiting.remove(queued)
                self._finish_cancelled(queued)
            waiting = len(self._waiting)
            if waiting >= self.settings.max_waiting_asks:
                self.counts["refused_busy"] += 1
                raise RequestError(429, f"{waiting} ask(s) already waiting, the server's limit (max_waiting_asks): try "
                                        "again later", "too_many_requests", 1)
            self._waiting.append(job)
            self._cond.notify()

    def stop(self, cancel_running: bool = False) -> None:
        """No more asks: the waiting ones are told (the CLI then answers them itself); the running ones finish,
        or with `cancel_running` stop at their next token."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            running = list(self._running) if cancel_running else []
            self._cond.notify_all()
        for job in waiting:
            job.offer(protocol.unserved("the server is stopping"))
            job.close()
            self.counts["unserved"] += 1
        for job in running:
            job.cancelled.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def health(self) -> dict:
        with self._cond:
            waiting = [job.summary() for job in self._waiting if not job.cancelled.is_set()]
            running = [job.summary() for job in self._running]
            stopping = self._stopping
        return {"status": "stopping" if stopping else "ok", "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started_at)),
                "model": self.engine.model_name, "dtype": _dtype_name(self.engine.dtype),
                "device": str(self.engine.device), "store": str(self.store.root),
                "queue": {"waiting": len(waiting), "running": running, "asks": waiting, **self.counts},
                "kv_memory": self.kv.snapshot(), "peak_rss_bytes": int(report.peak_rss_mb() * 2**20),
                "limits": {**{key: getattr(self.settings, key) for key in limits.LIMIT_KEYS},
                           "kv_bytes_per_token": limits.kv_bytes_per_token(self.engine)}}

    # ------------------------------------------------------------------ the worker thread

    def _run(self) -> None:
        try:
            self.engine = self._load_engine()
        except BaseException as exc:  # noqa: BLE001 - raised again by start(), in the thread that started the server
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        self._loop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if not self._waiting:
                    return
                head = self._waiting.popleft()
                if head.cancelled.is_set():
                    self._finish_cancelled(head)
                    continue
                group = [head, *self._companions(head)]
                self._running = group
            try:
                self.kv.forget_stale(self._linked)  # a re-ingested or removed document: its old KV goes
                if len(group) == 1:
                    self._answer_alone(head)
                else:
                    self._answer_together(group)
            finally:
                for job in group:
                    job.close()
                    self.counts["events_merged"] += getattr(job.events, "merged", 0)
                with self._cond:
                    self._running = []

    def _companions(self, head: Job) -> list[Job]:
        """Waiting asks to decode with `head`: the same document and settings, all their questions in one batch
        (taken out of the queue in their order; the others keep their places)."""
        if not _batchable(head):
            return []
        key, room = _batch_key(head), head.request.settings.batch_size - len(head.request.questions)
        questions, taken = head.request.questions, []
        for job in list(self._waiting):
            if room <= 0:
                break
            if (not job.cancelled.is_set() and _batchable(job) and _batch_key(job) == key
                    and len(job.request.questions) <= room
                    and limits.decode_bytes(self.engine, head.request.settings, questions + job.request.questions,
                                            "star", 0) <= self.settings.max_decode_memory):
                self._waiting.remove(job)
                taken.append(job)
                room -= len(job.request.questions)
                questions += job.request.questions
        return taken

    def _answer_alone(self, job: Job) -> None:
        request, started = job.request, time.monotonic()
        try:
            code = ask.run(self._engine_loader(request), request.settings, self.store, docs=list(request.docs),
                           all_documents=request.all_documents, questions=list(request.questions),
                           attention=request.attention, name=None, explicit_model=request.explicit_model,
                           explicit_sizes=request.explicit_sizes, ranks=Ranks(), emit=job.emit,
                           stream=request.stream, files=False, load_kv=self._load_kv, each_token=job.check)
            job.emit(protocol.done(code))
            self.counts["answered"] += 1
            outcome = f"answered (exit {code})"
        except Cancelled:
            self.counts["cancelled"] += 1
            outcome = ("cancelled: the client went away" if not self._stopping else "cancelled: the server is stopping")
            outcome += f" (after {job.deltas} pieces of answer text)"
        except Exception as exc:  # noqa: BLE001 - the client hears of it; the server goes on
            outcome = self._failed([job], exc)
        self.log(f"ask #{job.id} {job.peer} {_what(request)}: {outcome} in {time.monotonic() - started:.2f} s")

    def _answer_together(self, group: list[Job]) -> None:
        head, started = group[0], time.monotonic()
        request, settings = head.request, head.request.settings
        ids = ", ".join(f"#{job.id}" for job in group)
        try:
            opened = ask.open_document(self._engine_loader(request), settings, self.store, doc=request.docs[0],
                                       attention="star", name=None, explicit_model=request.explicit_model,
                                       explicit_sizes=request.explicit_sizes, ranks=Ranks(), files=False,
                                       load_kv=self._load_kv)
            owners = [(job, number) for job in group for number in range(len(job.request.questions))]
            name = opened.document.name

            def stream(row: int, text: str) -> None:
                job, number = owners[row]
                if job.request.stream:
                    job.offer(events.delta(name, number, text))

            def each_token() -> None:
                if all(job.cancelled.is_set() for job in group):
                    raise Cancelled()

            questions = [question for job in group for question in job.request.questions]
            streamed = any(job.request.stream for job in group)
            replies = passes.ask_star(opened.engine, opened.context, opened.document, questions, settings,
                                      cache_hit=opened.cache_hit, phase1_s=opened.phase1_s,
                                      stream=stream if streamed else None, each_token=each_token)
            first = 0
            for job in group:
                mine = replies[first:first + len(job.request.questions)]
                first += len(mine)
                passes.emit_replies(job.offer, name, 0, mine, document_version(opened.document, opened.engine))
                job.offer(events.timings(*passes.timing_table([reply.answer for reply in mine], opened.engine,
                                                           opened.load_s, opened.document.kv_dtype,
                                                           together=len(questions))))
                job.offer(protocol.done(0))
            self.counts["answered"] += len(group)
            self.counts["decoded_together"] += len(group)
            outcome = f"answered together ({len(questions)} questions)"
        except Cancelled:
            self.counts["cancelled"] += len(group)
            outcome = "cancelled: every client went away"
        except Exception as exc:  # noqa: BLE001
            outcome = self._failed(group, exc)
        self.log(f"asks {ids} {_what(request)}: {outcome} in {time.monotonic() - started:.2f} s")

    def _failed(self, jobs: list[Job], exc: Exception) -> str:
        """Tell the clients of a failed ask what `starqa ask` would have printed; a line for the log."""
        self.counts["failed"] += len(jobs)
        if isinstance(exc, StarqaError):
            event, line = protocol.failed(str(exc), exc.exit_code), f"failed: {exc}"
        else:  # a bug: the traceback goes to the server's log, one line to the client
            if self.debug:
                traceback.print_exc()
            event, line = protocol.failed(describe(exc), 1, internal=True), f"internal error: {describe(exc)}"
        for job in jobs:
            job.offer(event)
            job.offer(protocol.done(event["exit_code"]))
        return line

    def _finish_cancelled(self, job: Job) -> None:
        self.counts["cancelled"] += 1
        job.close()
        self.log(f"ask #{job.id} {job.peer} {_what(job.request)}: cancelled before its turn: the client went away")

    # ------------------------------------------------------------------ the engine and the KV

    def holds(self, model: str | None, dtype: str | None, settings) -> bool | None:
        """Whether the engine held is the one `starqa ask` would load for (model, dtype); None when `model` is not
        a model at all (the ask then fails as it would in its own process)."""
        from starqa.engine.star_engine import resolve_dtype
        from starqa.model.resolve import resolve_model

        try:
            name = resolve_model(model or settings.model, Path(self.store.root) / "models").name
        except StarqaError:
            return None
        wanted = resolve_dtype(dtype or settings.dtype, self.engine.device)
        return name == self.engine.model_name and wanted == self.engine.dtype

    def _engine_loader(self, request: AskRequest):
        def load(model: str | None, dtype: str | None):
            if self.holds(model, dtype, request.settings):
                return self.engine
            # `prepare` found this ask's documents stored for the engine held; a document replaced meanwhile by
            # a version for another model (or a model that does not exist) is answered, or refused, as `starqa
            # ask` would: with that model, loaded for this ask only.
            from starqa.engine.star_engine import StarEngine

            settings = request.settings if dtype is None else dataclasses.replace(request.settings, dtype=dtype)
            return StarEngine.from_settings(settings, model, trust_remote_code=request.trust_remote_code,
                                            on_status=self.log)

        return load

    def _load_kv(self, engine, store, document):
        """The document's KV from memory, or read from the store and kept. Its block files are checked first, as
        a read from the store checks them (sizes; the checksum of a file changed since it was last hashed): a
        file damaged since is refused here too, though the KV in memory is intact."""
        store.check_files(document, only=[block["file"] for block in document.blocks])
        if engine is not self.engine:
            return passes.load_context(engine, store, document)
        key = (str(document.path), engine.model_name, str(engine.dtype), str(engine.device))
        context = self.kv.get(key)
        if context is None:
            self.kv.make_room(document.manifest.get("kv_bytes", 0))
            context = passes.load_context(engine, store, document)
            self.kv.put(key, document.name, context)
        return context

    def _linked(self, name: str) -> Path | None:
        link = Path(self.store.root) / "documents" / name
        try:
            return link.resolve(strict=True) if link.is_symlink() else None
        except OSError:
            return None


def _unserved(why: str) -> RequestError:
    return RequestError(409, f"{why}: ask it without the server (starqa ask --no-server)", "unserved", 1)


def _batchable(job: Job) -> bool:
    request = job.request
    return (request.attention == "star" and not request.all_documents and len(request.docs) == 1
            and not ask.is_glob(request.docs[0]) and len(request.questions) <= request.settings.batch_size)


def _batch_key(job: Job) -> tuple:
    request, settings = job.request, job.request.settings
    return (request.docs[0], request.explicit_model, request.explicit_sizes, request.trust_remote_code,
            settings.dtype, settings.device, settings.block_size, settings.anchor_size, settings.max_new_tokens,
            settings.temperature, settings.top_p, settings.seed)


def _same_device(asked: str, held) -> bool:
    from starqa.engine.star_engine import resolve_device

    device = resolve_device(asked)
    return device.type == held.type and (device.index is None or held.index is None or device.index == held.index)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _valid_name(name: str) -> bool:
    return ask.is_valid_name(name)


def _what(request: AskRequest) -> str:
    docs = "--all" if request.all_documents else ",".join(request.docs)
    count = len(request.questions)
    return f"{docs} ({count} question{'s' if count != 1 else ''}, {request.attention})"
