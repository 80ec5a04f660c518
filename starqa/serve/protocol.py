"""What crosses the server's socket: the request bodies of `POST /v1/ask` and `POST /v1/chat/completions`, checked
as untrusted input; the events a request streams back (starqa.answer.events, plus `failed`, `done` and `unserved`);
error bodies; and where a store's socket is. torch-free: the CLI client imports this.

A request's settings are checked exactly as a config file's (starqa.config): unknown fields and wrong types are
errors that name the field, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from starqa.config import Settings, override
from starqa.errors import UsageError

SOCKET_NAME = "serve.sock"  # in the store's folder: only the store's owner reaches it (0600 in a 0700 folder)
LOCK_NAME = "serve.lock"  # held by the one server of a store for as long as it runs
NDJSON = "application/x-ndjson"
# The most questions a server decodes at once for one request (--batch-size): each is a row of KV for the answer.
MAX_BATCH_SIZE = 64

# The settings a request may give (as a config file would); the server's own are the defaults.
SETTING_FIELDS = ("dtype", "device", "block_size", "anchor_size", "max_new_tokens", "batch_size", "temperature",
                  "top_p", "seed", "nproc", "attention_backend", "weights", "activations")
# The fields of `POST /v1/ask` besides the settings: (accepted types, what it is).
ASK_FIELDS = {
    "doc": ((str, list), "a stored document name or a glob over stored names, or a list of them"),
    "all": ((bool,), "ask every stored document"),
    "question": ((str,), "one question"),
    "questions": ((list,), "several questions"),
    "attention": ((str,), "star (the stored KV, the default), full or hybrid"),
    "escalate_to": ((str,), "hybrid's second pass: full (the only one a server runs)"),
    "stream": ((bool,), "send the answer text as it is decoded (default true)"),
    "model": ((str, type(None)), "answer with this model rather than the document's own"),
    "trust_remote_code": ((bool,), "as --trust-remote-code (default: the server's)"),
}
# OpenAI chat-completion fields: those that mean something here, and those accepted and ignored.
CHAT_FIELDS = {"model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
               "n", "user", "stream_options", "attention", "escalate_to"}  # starqa's own: star, full or hybrid; full


class RequestError(Exception):
    """A request the server refuses: HTTP status, one line of message, and the exit code the CLI would use."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", exit_code: int = 2) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.exit_code = status, message, kind, exit_code

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.exit_code)


def error_body(message: str, kind: str, exit_code: int = 1) -> dict:
    """The JSON of every error the server answers (OpenAI's shape: clients read error.message)."""
    return {"error": {"message": message, "type": kind, "code": kind, "exit_code": exit_code}}


@dataclass(frozen=True)
class AskRequest:
    """One `ask`, as the server's worker answers it (what starqa.answer.ask.run takes)."""

    docs: tuple[str, ...]
    all_documents: bool
    questions: tuple[str, ...]
    attention: str
    stream: bool
    explicit_model: str | None
    explicit_sizes: bool
    trust_remote_code: bool
    settings: Settings


def parse_ask(body: dict, base: Settings, trust_remote_code: bool) -> AskRequest:
    """The body of `POST /v1/ask`: the fields of `starqa ask` (ASK_FIELDS and SETTING_FIELDS)."""
    unknown = [key for key in body if key not in ASK_FIELDS and key not in SETTING_FIELDS]
    if unknown:
        known = ", ".join(sorted([*ASK_FIELDS, *SETTING_FIELDS]))
        raise RequestError(400, f"unknown field '{unknown[0]}' in the request; known fields: {known}")
    for key, (types, what) in ASK_FIELDS.items():
        value = body.get(key)
        if key in body and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise RequestError(400, f"field '{key}' must be {what}, not {value!r:.60}")
    docs = body.get("doc", [])
    docs = [docs] if isinstance(docs, str) else docs
    if not all(isinstance(doc, str) for doc in docs):
        raise RequestError(400, "field 'doc' must be a document name or a list of names")
    if not docs and not body.get("all"):
        raise RequestError(400, "give 'doc' (a stored document name or a glob over stored names), or 'all': true")
    if docs and body.get("all"):
        raise RequestError(400, "'all' asks every stored document; drop 'doc', or drop 'all'")
    if ("question" in body) == ("questions" in body):
        raise RequestError(400, "give one 'question', or 'questions' (a list)")
    questions = [body["question"]] if "question" in body else body["questions"]
    if not questions or not all(isinstance(question, str) and question.strip() for question in questions):
        raise RequestError(400, "every question must be a non-empty string")
    if len(questions) > base.max_questions_per_request:
        raise RequestError(413, f"the request asks {len(questions)} questions, over the server's limit of "
                                f"{base.max_questions_per_request} (max_questions_per_request)", "too_large")
    attention = _attention(body)
    settings = request_settings(base, {key: body[key] for key in SETTING_FIELDS if key in body})
    return AskRequest(docs=tuple(docs), all_documents=bool(body.get("all", False)), questions=tuple(questions),
                      attention=attention, stream=body.get("stream", True), explicit_model=body.get("model"),
                      explicit_sizes="block_size" in body or "anchor_size" in body,
                      trust_remote_code=body.get("trust_remote_code", trust_remote_code), settings=settings)


def _attention(body: dict) -> str:
    attention = body.get("attention", "star")
    if attention not in ("star", "full", "hybrid"):
        raise RequestError(400, f"attention must be star, full or hybrid, not {attention!r:.40}")
    escalate_to = body.get("escalate_to", "full")
    if escalate_to != "full":
        # A server holds one model (its memory limits count one); a larger model answers in a CLI's own process.
        raise RequestError(400, f"escalate_to must be full on a starqa server, not {escalate_to!r:.60}: a server "
                                "escalates hybrid answers only to full attention; to escalate to another model, "
                                "run `starqa ask --no-server --attention hybrid --escalate-to MODEL`")
    return attention


def request_settings(base: Settings, values: dict) -> Settings:
    try:
        return override(base, values, "the request")
    except UsageError as exc:
        raise RequestError(400, str(exc)) from None


@dataclass(frozen=True)
class ChatRequest:
    ask: AskRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def parse_chat(body: dict, base: Settings, trust_remote_code: bool) -> ChatRequest:
    """An OpenAI chat completion: `model` is the document's name, the last user message the question."""
    unknown = [key for key in body if key not in CHAT_FIELDS]
    if unknown:
        raise RequestError(400, f"unsupported field '{unknown[0]}'; starqa accepts: {', '.join(sorted(CHAT_FIELDS))}")
    doc = body.get("model")
    if not isinstance(doc, str) or not doc:
        raise RequestError(400, "'model' must be the name of a stored document (GET /v1/models lists them)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
        raise RequestError(400, "'messages' must be a list of messages")
    question = next((_message_text(message) for message in reversed(messages) if message.get("role") == "user"), None)
    if question is None or not question.strip():
        raise RequestError(400, "'messages' has no user message with text: the last one is the question")
    if body.get("n") not in (None, 1):
        raise RequestError(400, "'n' must be 1: starqa gives one answer per question")
    values = {}
    for key, setting in (("max_tokens", "max_new_tokens"), ("max_completion_tokens", "max_new_tokens"),
                         ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
        if body.get(key) is not None:
            values[setting] = body[key]
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise RequestError(400, "'stream' must be true or false and 'stream_options' an object")
    ask = AskRequest(docs=(doc,), all_documents=False, questions=(question,), attention=_attention(body), stream=stream,
                     explicit_model=None, explicit_sizes=False, trust_remote_code=trust_remote_code,
                     settings=request_settings(base, values))
    return ChatRequest(ask=ask, stream=stream, include_usage=bool(options.get("include_usage")))


def _message_text(message: dict) -> str | None:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
        parts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return "".join(part for part in parts if isinstance(part, str))
    return None


# ------------------------------------------------------------------------------------------- events of a server

def failed(message: str, exit_code: int, internal: bool = False) -> dict:
    """The request failed as a whole (what `starqa ask` reports as its one error line)."""
    return {"type": "failed", "message": message, "exit_code": exit_code, "internal": internal}


def done(exit_code: int) -> dict:
    return {"type": "done", "exit_code": exit_code}


def unserved(reason: str) -> dict:
    """Nothing was done (the server stopped before this request's turn): the CLI answers in its own process."""
    return {"type": "unserved", "reason": reason}


def ndjson(event: dict) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n"


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode("utf-8")


# ------------------------------------------------------------------------------------------- the socket

def socket_path(root: Path) -> Path:
    return root / SOCKET_NAME


def unix_address(path: Path) -> str:
    """`path` as bind() and connect() take it. A Unix socket's path is limited to 107 bytes; a longer one (a deep
    store) is reached through this process's open handle on its folder, which Linux resolves like the path."""
    if len(os.fsencode(str(path))) < 100 or not os.path.isdir("/proc/self/fd"):
        return str(path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)  # kept open for as long as the process needs it
    return f"/proc/self/fd/{folder}/{path.name}"
