"""The limits on what clients can make `starqa serve` hold in memory, each a named setting (configs/default.yaml,
a `starqa serve` flag) whose refusal names it:

    max_request_bytes          a request body                                   413 (app.py)
    max_questions_per_request  questions in one request                         413 (protocol.py)
    max_decode_memory          decode buffers of the asks decoded at once       413 (worker.prepare)
    max_waiting_asks           asks waiting for the engine                      429 (worker.submit)
    max_connections            open connections                                 429 (ConnectionLimit)
    max_queued_events          events an ask's response holds for its client    merged, never refused (EventQueue)
    max_kv_memory              documents' KV kept between asks                  least recently used dropped

Also here: `one_line`, which makes what a client sent safe to log (a path with %0A must not forge a log line).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable

from starqa.serve import protocol

LIMIT_KEYS = ("max_request_bytes", "max_questions_per_request", "max_decode_memory", "max_waiting_asks",
              "max_connections", "max_queued_events", "max_kv_memory")

# ------------------------------------------------------------------------------------------- decode buffers

def kv_bytes_per_token(engine) -> int:
    """Bytes of KV one token takes in a decode buffer: keys and values of every layer, in the compute dtype."""
    return 2 * engine.num_layers * engine.kv_heads * engine.head_dim * engine.dtype.itemsize


def query_tokens_bound(question: str) -> int:
    """At most this many tokens for a question and its prompt around it: a byte-level vocabulary never needs more
    than one token per byte; the prompt template adds fewer than 64."""
    return len(question.encode("utf-8")) + 64


def decode_bytes(engine, settings, questions: tuple[str, ...], attention: str, context_tokens: int) -> int:
    """The decode buffers an ask holds at once (engine.generate_batch): star attention decodes up to `batch_size`
    questions together, each row holding its longest question's prompt and `max_new_tokens`; full attention holds
    the document's full-attention KV (`context_tokens`, starqa.answer.passes.full_attention_kv) and decodes one
    question over it; hybrid, after its Star batch, the same KV and up to a batch of escalated questions."""
    per_token = kv_bytes_per_token(engine)
    longest = max(query_tokens_bound(question) for question in questions)
    row = per_token * (longest + settings.max_new_tokens)
    if attention == "full":
        return per_token * context_tokens + row
    star = min(len(questions), settings.batch_size) * row
    return per_token * context_tokens + star if attention == "hybrid" else star


def decode_refusal(needed: int, budget: int) -> protocol.RequestError:
    from starqa.report import human_bytes

    return protocol.RequestError(
        413, f"this ask's decode buffers take {human_bytes(needed)}, over the server's limit of {human_bytes(budget)} "
             "(max_decode_memory): ask fewer questions at once (batch_size), a smaller max_new_tokens, or ask "
             "without the server", "too_large")


# ------------------------------------------------------------------------------------------- an ask's events

class EventQueue:
    """An ask's events on their way from the engine thread to the client's response, in order; `None` ends them.

    `put` never blocks and never fails for want of room: the engine must not wait for a client. Beyond `limit`
    events waiting, a delta (answer text) is merged into the last waiting delta of the same question, when no
    other event of the ask came after that one; the client then reads the same text in fewer, longer events.
    What waits is thus at most `limit` events, plus the answers' text and their few other events."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.loop, self.limit = loop, limit
        self._items: deque[dict | None] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._signalled = False  # a wake-up of the reader is on its way: no second one until it has run
        self.merged = 0  # deltas merged into earlier ones (a client that reads slower than the answer is decoded)

    def put(self, event: dict | None) -> None:
        """From any thread. Raises RuntimeError when the event loop is closed (the server is going away)."""
        with self._lock:
            if not (len(self._items) >= self.limit and event is not None and event.get("type") == "delta"
                    and self._merge(event)):
                self._items.append(event)
            wake, self._signalled = not self._signalled, True
        if wake:
            self.loop.call_soon_threadsafe(self._ready.set)

    def _merge(self, event: dict) -> bool:
        for index in range(len(self._items) - 1, -1, -1):
            waiting = self._items[index]
            if waiting is None or waiting.get("type") != "delta":
                return False
            if waiting["doc"] == event["doc"] and waiting["question"] == event["question"]:
                self._items[index] = dict(waiting, text=waiting["text"] + event["text"])
                self.merged += 1
                return True
        return False

    async def get(self) -> dict | None:
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                self._ready.clear()
                self._signalled = False
            await self._ready.wait()

    def put_nowait(self, event: dict | None) -> None:  # (on the event loop's own thread)
        self.put(event)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# ------------------------------------------------------------------------------------------- connections

class ConnectionLimit:
    """ASGI middleware: a request that arrives while more than `limit` connections are open is refused with 429
    (and its connection closed). `open_connections()` counts them (uvicorn's server state)."""

    def __init__(self, app, limit: int, open_connections: Callable[[], int], log: Callable[[str], None]) -> None:
        self.app, self.limit, self.open_connections, self.log = app, limit, open_connections, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.open_connections() > self.limit:
            from starlette.responses import JSONResponse

            from starqa.serve.access import peer

            message = (f"{self.open_connections()} connections are open, over the server's limit of {self.limit} "
                       "(max_connections): try again later")
            self.log(f"{peer(scope)} {scope.get('method')} {scope.get('path')} 429: {message}")
            response = JSONResponse(protocol.error_body(message, "too_many_requests", 1), status_code=429,
                                    headers={"Connection": "close", "Retry-After": "1"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------- the log

def one_line(text: str) -> str:
    """`text` with every character that is not printable (line breaks, escape sequences, ...) written as its
    Python escape: what a client sent can never start a line of the log or drive a terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)
