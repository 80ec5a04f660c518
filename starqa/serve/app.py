"""The HTTP routes of `starqa serve` (Starlette, run by uvicorn): they parse, authenticate, queue and stream; the
engine work happens in the worker (starqa.serve.worker). Every request is untrusted: bodies are limited in size
(`max_request_bytes`), checked field by field (starqa.serve.protocol), and every refusal is a JSON error,
`{"error": {"message", "type", "code", "exit_code"}}`, with one line in the server's log.

    GET  /health               the model, the queue, the KV held in memory
    GET  /v1/documents         the stored documents, one `starqa list --json` object per line
    GET  /v1/documents/NAME    one of them
    GET  /v1/models            the stored documents as OpenAI models (a document's name is the model)
    GET  /v1/models/NAME       one of them
    POST /v1/ask               the fields of `starqa ask`; newline-delimited JSON events (starqa.answer.events)
    POST /v1/chat/completions  OpenAI-compatible: model = a document's name, the last user message the question

Requests over TCP need `Authorization: Bearer <key>` (compared in constant time): the `--api-key` key (every
document) or a scoped key of the store (`starqa keys add`: only the documents its globs match, see
starqa.serve.access); over the store's Unix socket, which only the store's owner can open, they need none. Every
answer is recorded in the store's audit log (starqa.governance.audit) with who asked: the socket peer's uid, or the
key's name. """

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from starqa.serve import limits, protocol
from starqa.serve.access import IDENTITY, identify, identity_of, peer, scoped_ask
from starqa.serve.protocol import RequestError
from starqa.serve.worker import Job, Worker


def create_app(worker: Worker, *, api_key: str | None, log: Callable[[str], None], keys=None,
               open_connections: Callable[[], int] | None = None) -> Starlette:
    """The app; with `open_connections` (uvicorn's count), requests beyond `max_connections` are refused."""
    settings = worker.settings
    limit = settings.max_request_bytes

    def refuse(request: Request, error: RequestError) -> JSONResponse:
        log(f"{peer(request.scope)} {request.method} {request.url.path} {error.status}: {error.message}")
        return JSONResponse(error.body(), status_code=error.status)

    async def health(request: Request) -> Response:
        health = worker.health()
        if identity_of(request.scope).key is not None:  # a scoped key learns nothing of other documents
            health = {key: health[key] for key in ("status", "model", "dtype", "device")}
        return JSONResponse(health)

    async def documents(request: Request) -> Response:
        allows = identity_of(request.scope).allows
        rows = await run_in_threadpool(_document_rows, worker, log, allows)
        return Response("".join(json.dumps(row) + "\n" for row in rows), media_type=protocol.NDJSON)

    async def document(request: Request) -> Response:
        name = request.path_params["name"]
        rows = await run_in_threadpool(_document_rows, worker, log, lambda stored: stored == name
                                       and identity_of(request.scope).allows(stored))
        if not rows:
            return refuse(request, _no_document(name))
        return JSONResponse(rows[0])

    async def models(request: Request) -> Response:
        allows = identity_of(request.scope).allows
        names = await run_in_threadpool(worker.store.names)
        return JSONResponse({"object": "list", "data": [_model(name) for name in names if allows(name)]})

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        names = await run_in_threadpool(worker.store.names)
        if name not in names or not identity_of(request.scope).allows(name):
            return refuse(request, _no_document(name))
        return JSONResponse(_model(name))

    async def ask(request: Request) -> Response:
        worker.counts["received"] += 1
        ask_request = None
        try:
            ask_request = protocol.parse_ask(await _read_json(request, limit), settings, worker.trust_remote_code)
            ask_request = scoped_ask(identity_of(request.scope), ask_request, worker.store.names)
            await run_in_threadpool(worker.prepare, ask_request)
            job, queue = _submit(worker, ask_request, peer(request.scope), request)
        except RequestError as error:
            await run_in_threadpool(_record_refusal, worker, request, ask_request, error, log)
            return refuse(request, error)
        return StreamingResponse(_ndjson(job, queue), media_type=protocol.NDJSON)

    async def chat_completions(request: Request) -> Response:
        worker.counts["received"] += 1
        chat = None
        try:
            chat = protocol.parse_chat(await _read_json(request, limit), settings, worker.trust_remote_code)
            chat = dataclasses.replace(chat, ask=scoped_ask(identity_of(request.scope), chat.ask, worker.store.names))
            await run_in_threadpool(worker.prepare, chat.ask)
            job, queue = _submit(worker, chat.ask, peer(request.scope), request)
        except RequestError as error:
            await run_in_threadpool(_record_refusal, worker, request, chat.ask if chat else None, error, log)
            return refuse(request, error)
        reply = _ChatReply(chat, job)
        if chat.stream:
            return StreamingResponse(reply.chunks(queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await reply.whole(queue, request))
        except RequestError as error:
            return refuse(request, error)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        error = RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                             "not_found" if exc.status_code == 404 else "invalid_request")
        return refuse(request, error)

    async def internal(request: Request, exc: Exception) -> Response:  # a bug: uvicorn logs its traceback
        error = RequestError(500, f"internal error: {exc.__class__.__name__}: {exc}"[:300], "internal", 1)
        return refuse(request, error)

    routes = [Route("/health", health), Route("/v1/documents", documents),
              Route("/v1/documents/{name:path}", document), Route("/v1/models", models),
              Route("/v1/models/{name:path}", model),
              Route("/v1/ask", ask, methods=["POST"]), Route("/v1/chat/completions", chat_completions,
                                                             methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal})
    if open_connections is not None:
        app = limits.ConnectionLimit(app, settings.max_connections, open_connections, log)
    return _RequireKey(app, api_key, log, keys)


class _RequireKey:
    """Requests that did not come through the Unix socket need `Authorization: Bearer <key>`: the `--api-key` key
    or a scoped key of the store (`keys`, a starqa.governance.keys.KeyRing read again whenever its file changes). The
    request's Identity (starqa.serve.access) goes into its scope."""

    def __init__(self, app, api_key: str | None, log: Callable[[str], None], keys=None) -> None:
        self.app, self.log, self.keys = app, log, keys
        self.expected = ("Bearer " + api_key).encode() if api_key else None  # None: no all-documents key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # a websocket (no route takes one), or anything else: refused (fail closed)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        identity = identify(scope, self.expected, self.keys)
        if isinstance(identity, str):
            self.log(f"{peer(scope)} {scope.get('method')} {scope.get('path')} 401: {identity}")
            body = protocol.error_body(identity, "unauthorized", 1)
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        scope[IDENTITY] = identity
        await self.app(scope, receive, send)



async def _read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, refused beyond `limit` bytes (before reading it, when it says its length)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, "the Content-Length header is not a number")
        if int(length) > limit:
            raise RequestError(413, f"the request body is {int(length):,} bytes; the limit is {limit:,} "
                                    "(max_request_bytes)", "too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"the request body is over the limit of {limit:,} bytes (max_request_bytes)",
                               "too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON ({str(exc)[:80]})") from None
    except RecursionError:
        raise RequestError(400, "the request body nests too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    problem = _untrusted_structure(data)
    if problem is not None:
        raise RequestError(400, f"the request body {problem}")
    return data


# No request of this API nests deeper than a few levels (chat content parts: 4); a deeper body is refused before
# anything walks it recursively (a repr, a settings check), which could exhaust Python's recursion limit.
MAX_DEPTH = 32


def _untrusted_structure(data) -> str | None:
    """Why a parsed body cannot be handled, or None. Walked iteratively: a lone surrogate such as "\\ud800" is
    valid JSON but no text (it could not even be sent back in an error message), and nesting is limited."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "holds a string that is not valid Unicode (a lone surrogate)"
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return f"nests deeper than {MAX_DEPTH} levels"
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    return None


def _submit(worker: Worker, request: protocol.AskRequest, peer: str,
            http: Request | None = None) -> tuple[Job, limits.EventQueue]:
    """Queue an ask (RequestError 429 when too many wait); its events arrive in the returned queue (None ends
    them). The worker never waits for a client: events wait in this queue, up to `max_queued_events` of them,
    and beyond that the answer text is merged into fewer events (limits.EventQueue). The ask is recorded in the
    audit log (who: the identity of the `http` request) when it ends."""
    from starqa.governance import audit

    queue = limits.EventQueue(asyncio.get_running_loop(), worker.settings.max_queued_events)
    identity = identity_of(http.scope) if http is not None else None
    recorder = audit.recorder(worker.settings, who=identity.who if identity else {"user": "unknown"},
                              via=identity.via if identity else "unix", questions=request.questions,
                              docs=request.docs, attention=request.attention,
                              endpoint=http.url.path if http is not None else None)
    job = Job(request, queue.put, peer, recorder)
    job.events = queue
    worker.submit(job)
    return job, queue


async def _events(job: Job, queue: limits.EventQueue) -> AsyncIterator[dict]:
    """The ask's events until it ends; a client that goes away (the response is cancelled) cancels the ask."""
    try:
        while True:
            event = await queue.get()
            if event is None:
                return
            yield event
    finally:
        job.cancelled.set()  # no-op once answered: the worker is done with it


async def _ndjson(job: Job, queue: limits.EventQueue) -> AsyncIterator[bytes]:
    async for event in _events(job, queue):
        if event["type"] == "delta" and not job.request.stream:
            continue
        yield protocol.ndjson(event)


class _ChatReply:
    """An ask's events as an OpenAI chat completion: streamed chunks (server-sent events) or one object. The
    text is the answer's, stripped as in `ask --json` (streamed chunks hold back leading and trailing white
    space, so they add up to it); `starqa` carries the whole `ask --json` object."""

    def __init__(self, chat: protocol.ChatRequest, job: Job) -> None:
        self.chat, self.job = chat, job
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.doc = chat.ask.docs[0]

    def _chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.doc,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}

    async def chunks(self, queue: limits.EventQueue) -> AsyncIterator[bytes]:
        yield protocol.sse(self._chunk({"role": "assistant", "content": ""}))
        sent, held, started = "", "", False
        async for event in _events(self.job, queue):
            kind = event["type"]
            if kind == "delta" and event["question"] == 0:
                text = event["text"] if started else event["text"].lstrip()
                started = started or bool(text)
                body = (held + text).rstrip()
                held = (held + text)[len(body):]
                if body:
                    sent += body
                    yield protocol.sse(self._chunk({"content": body}))
            elif kind == "answer":
                row = event["answer"]
                rest = row["answer"][len(sent):] if row["answer"].startswith(sent) else ""
                if rest:
                    yield protocol.sse(self._chunk({"content": rest}))
                yield protocol.sse(self._chunk({}, _finish_reason(row, self.chat), starqa=row))
                if self.chat.include_usage:
                    yield protocol.sse(dict(self._chunk({}), choices=[], usage=_usage(row)))
            elif kind in ("failed", "unserved"):
                message = event.get("message") or f"not answered: {event.get('reason')}"
                yield protocol.sse(protocol.error_body(message, "failed", event.get("exit_code", 1)))
                return
        yield protocol.sse("[DONE]")

    async def whole(self, queue: limits.EventQueue, request: Request) -> dict:
        watcher = asyncio.create_task(_cancel_when_gone(request, self.job, queue))
        row = None
        try:
            async for event in _events(self.job, queue):
                if event["type"] == "answer":
                    row = event["answer"]
                elif event["type"] == "failed":
                    status = 400 if event["exit_code"] == 2 else 500  # a usage error, or a failure here
                    raise RequestError(status, event["message"], "failed", event["exit_code"])
                elif event["type"] == "unserved":
                    raise RequestError(503, f"not answered: {event['reason']}", "unserved", 1)
        finally:
            watcher.cancel()
        if row is None:
            raise RequestError(503, "not answered: the server is stopping", "unserved", 1)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.doc,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": row["answer"]},
                             "finish_reason": _finish_reason(row, self.chat)}],
                "usage": _usage(row), "starqa": row}


async def _cancel_when_gone(request: Request, job: Job, queue: limits.EventQueue) -> None:
    """Cancel the ask when its client disconnects while a whole (not streamed) answer is being made."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()
    queue.put_nowait(None)


def _finish_reason(row: dict, chat: protocol.ChatRequest) -> str:
    return "length" if row["answer_tokens"] >= chat.ask.settings.max_new_tokens else "stop"


def _usage(row: dict) -> dict:
    prompt = row["context_tokens"] + row["query_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": row["answer_tokens"],
            "total_tokens": prompt + row["answer_tokens"]}


def _record_refusal(worker: Worker, http: Request, request: protocol.AskRequest | None, error: RequestError,
                    log: Callable[[str], None]) -> None:
    """An ask refused after it was understood (403 for a key's other documents, 404, 400) is recorded too; one
    the CLI then answers itself (409) is recorded by the CLI."""
    from starqa.governance import audit

    if request is None or error.status == 409:
        return
    identity = identity_of(http.scope)
    recorder = audit.recorder(worker.settings, who=identity.who, via=identity.via, questions=request.questions,
                              docs=request.docs or ("--all",), attention=request.attention, endpoint=http.url.path)
    if recorder is not None:
        try:
            recorder.finish(error.exit_code, f"HTTP {error.status}: {error.message}")
        except Exception as exc:  # noqa: BLE001 - the refusal is still sent; the log says it was not recorded
            log(f"no audit record written: {exc.__class__.__name__}: {exc}")


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "starqa"}


def _no_document(name: str) -> RequestError:
    """Not stored, or not for this key: the same answer, so a key learns nothing of other documents."""
    return RequestError(404, f"no document named '{name}'", "not_found")


def _document_rows(worker: Worker, log: Callable[[str], None], allows=lambda name: True) -> list[dict]:
    from starqa.store.listing import document_row
    from starqa.store.document_store import DamagedDocument

    rows = []
    for name in worker.store.names():
        if not allows(name):
            continue
        try:
            rows.append(document_row(worker.store.get(name)))
        except DamagedDocument as exc:  # as `starqa list`: named in the log, the readable ones listed
            log(f"GET /v1/documents: {exc}")
    return rows
