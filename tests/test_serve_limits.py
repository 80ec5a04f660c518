"""`starqa serve`'s memory is bounded: each named limit (starqa.serve.limits) refuses what would exceed it with 413
or 429 and a message naming it; an ask's events never pile up without bound; what a client sends is escaped in the
log; a websocket is refused before any route sees it. The unit tests need no server; the last test starts one with
small limits on the tiny random-weight model."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import types

import httpx
import pytest

from clihelp import starqa
from starqa.config import load_settings
from starqa.serve import limits
from starqa.serve.app import _RequireKey
from test_serve import API_KEY, DTYPE, QUESTION, Server, _free_port, _stream_until_first_delta, _wait_for, serving


# ------------------------------------------------------------------------------------------------ units

def test_a_client_that_reads_nothing_holds_at_most_the_limit_of_events_and_loses_no_text():
    async def scenario():
        queue = limits.EventQueue(asyncio.get_running_loop(), limit=16)
        deltas = [{"type": "delta", "doc": "d", "question": row % 3, "text": f"<{n}>"} for n, row in
                  enumerate(range(3000))]

        def engine() -> None:  # the worker thread: it never waits for the reader
            for event in deltas:
                queue.put(event)
            queue.put({"type": "answer", "doc": "d", "question": 0})
            queue.put({"type": "delta", "doc": "d", "question": 1, "text": "<after>"})
            queue.put(None)

        thread = threading.Thread(target=engine)
        thread.start()
        thread.join(30)
        assert not thread.is_alive()
        held = len(queue)
        received = []
        while (event := await queue.get()) is not None:
            received.append(event)
        return held, received, queue.merged

    held, received, merged = asyncio.run(scenario())
    assert held <= 16 + 3 and merged > 2900  # the limit, the answer, the delta after it and the end
    for row in range(3):  # each question's text whole and in order, though in fewer events
        text = "".join(event["text"] for event in received[:-2] if event["question"] == row)
        assert text == "".join(f"<{n}>" for n in range(row, 3000, 3))
    assert received[-2] == {"type": "answer", "doc": "d", "question": 0}  # nothing merged across another event
    assert received[-1]["text"] == "<after>"


def test_events_under_the_limit_arrive_one_by_one_in_order():
    async def scenario():
        queue = limits.EventQueue(asyncio.get_running_loop(), limit=100)
        events = [{"type": "delta", "doc": "d", "question": 0, "text": str(n)} for n in range(50)]
        threading.Thread(target=lambda: [queue.put(event) for event in [*events, None]]).start()
        received = []
        while (event := await queue.get()) is not None:
            received.append(event)
        return events, received

    events, received = asyncio.run(scenario())
    assert received == events


def test_what_a_client_sent_is_logged_on_one_line():
    assert limits.one_line("GET /health\nforged-line 200: ok") == "GET /health\\nforged-line 200: ok"
    assert "\n" not in limits.one_line("a\r\nb\u2028c\x1b[31md\x00") and "\x1b" not in limits.one_line("\x1b[31m")
    assert limits.one_line("déjà vu 東京 'x'") == "déjà vu 東京 'x'"


def test_a_websocket_is_refused_before_any_route_sees_it_on_either_socket():
    called, sent = [], []

    async def routes(scope, receive, send):
        called.append(scope)

    guard = _RequireKey(routes, "key", lambda line: None)

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "websocket.connect"}

    for server in (("127.0.0.1", 8000), ("/store/serve.sock", None)):  # TCP, and the Unix socket
        scope = {"type": "websocket", "path": "/v1/ask", "server": server, "client": ("127.0.0.1", 5),
                 "headers": [(b"authorization", b"Bearer key")]}
        asyncio.run(guard(scope, receive, send))
    assert called == [] and sent == [{"type": "websocket.close", "code": 1008}] * 2
    asyncio.run(guard({"type": "lifespan"}, receive, send))
    assert called == []


def test_decode_buffers_are_counted_as_the_engine_preallocates_them():
    # The bundled model in bfloat16: 30 layers, 3 KV heads of 64 -> 23,040 bytes of KV per token.
    import torch

    engine = types.SimpleNamespace(num_layers=30, kv_heads=3, head_dim=64, dtype=torch.bfloat16)
    assert limits.kv_bytes_per_token(engine) == 23040
    settings = load_settings(None, max_new_tokens=7000, batch_size=64)
    questions = tuple(f"Question number {n}?" for n in range(64))
    longest = max(limits.query_tokens_bound(question) for question in questions)
    assert limits.decode_bytes(engine, settings, questions, "star", 0) == 23040 * 64 * (longest + 7000)  # ~10 GB
    assert limits.decode_bytes(engine, settings, questions, "star", 0) > settings.max_decode_memory
    eight = load_settings(None, max_new_tokens=7000)  # batch_size 8: eight rows at a time
    assert limits.decode_bytes(engine, eight, questions, "star", 0) == 23040 * 8 * (longest + 7000)
    first = limits.query_tokens_bound(questions[0])
    assert limits.decode_bytes(engine, eight, questions[:1], "full", 5000) == 23040 * (5000 + first + 7000)
    default = load_settings(None)
    assert limits.decode_bytes(engine, default, questions, "star", 0) < default.max_decode_memory


def test_every_limit_has_a_default_and_a_flag(tmp_path):
    settings = load_settings(None)
    assert {key: getattr(settings, key) for key in limits.LIMIT_KEYS} == {
        "max_request_bytes": 2**20, "max_questions_per_request": 64, "max_decode_memory": 2**30,
        "max_waiting_asks": 32, "max_connections": 64, "max_queued_events": 1024, "max_kv_memory": 4 * 2**30}
    assert load_settings(None, max_decode_memory="64MiB").max_decode_memory == 64 * 2**20
    helped = starqa("serve", "--help", home=tmp_path / "home", env={"COLUMNS": "200"})
    for key in limits.LIMIT_KEYS:
        assert "--" + key.replace("_", "-") in helped.stdout, key
    refused = starqa("serve", "--max-waiting-asks", "0", home=tmp_path / "home")
    assert refused.returncode == 2 and "max_waiting_asks must be positive" in refused.stderr


# ------------------------------------------------------------------------------------------------ a server

@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("limits")
    (folder / "terms.txt").write_text("Clause 1. The fee is 4,200 euros per month.\n\n" * 8)
    home = folder / "home"
    result = starqa("ingest", folder / "terms.txt", "--block-size", "48", "--model", tiny_model_dir, *DTYPE,
                    home=home)
    assert result.returncode == 0, result.stderr
    port = _free_port()
    with serving(home, "--model", str(tiny_model_dir), *DTYPE, "--max-questions-per-request", "4",
                 "--max-waiting-asks", "1", "--max-connections", "4", "--max-decode-memory", "1MiB", "--port",
                 str(port), "--api-key", API_KEY) as server:
        server.port = port
        yield server


def _post(server: Server, body: dict) -> httpx.Response:
    with server.client() as client:
        return client.post("/v1/ask", json=body)


def _refused(response: httpx.Response, status: int, limit: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert limit in message and "\n" not in message
    return message


@pytest.mark.slow
def test_each_limit_refuses_with_its_status_and_name_and_the_server_goes_on(limited):
    server = limited
    per_token = server.health()["limits"]["kv_bytes_per_token"]
    assert per_token == 2 * 2 * 2 * 16 * 4  # the tiny model: 2 layers, 2 KV heads of 16, float32

    # Too many questions in one request: 413.
    _refused(_post(server, {"doc": "terms", "questions": ["q?"] * 5, "max_new_tokens": 2}), 413,
             "5 questions, over the server's limit of 4 (max_questions_per_request)")
    # Decode buffers over the budget: 3 rows x ~8,000 tokens x 512 bytes = 12 MB > 1 MiB. 413, before queueing.
    message = _refused(_post(server, {"doc": "terms", "questions": ["q?"] * 3, "max_new_tokens": 8000}), 413,
                       "(max_decode_memory)")
    assert "over the server's limit of 1.0 MiB" in message
    _refused(_post(server, {"doc": "terms", "question": "q?", "attention": "full", "max_new_tokens": 1900}), 413,
             "(max_decode_memory)")  # full attention: one row, but ~2,000 tokens of it star would fit, not with the document
    assert _post(server, {"doc": "terms", "question": "q?", "max_new_tokens": 1000}).status_code == 200  # fits

    # Waiting asks: one answered, one waiting (the limit), the next refused with 429.
    before = server.health()["queue"]
    busy = _stream_until_first_delta(server.socket, {"doc": "terms", "question": QUESTION, "max_new_tokens": 1500})
    waiting = _raw_post(server, {"doc": "terms", "question": QUESTION, "max_new_tokens": 2})
    try:
        _wait_for(lambda: server.health()["queue"]["waiting"] == 1, 60, "one ask waiting")
        _refused(_post(server, {"doc": "terms", "question": QUESTION, "max_new_tokens": 2}), 429,
                 "1 ask(s) already waiting, the server's limit (max_waiting_asks)")
        assert server.health()["queue"]["refused_busy"] == before["refused_busy"] + 1
        # Connections: busy, waiting and two idle ones make 4, the limit; a fifth's request is refused with 429.
        idle = [_connect(server) for _ in range(2)]
        try:
            response = _wait_for(lambda: _refused_or_none(server), 30, "a request over max_connections refused")
            _refused(response, 429, "over the server's limit of 4 (max_connections)")
        finally:
            for sock in idle:
                sock.close()
    finally:
        busy.close()
        waiting.close()
    _wait_for(lambda: server.health()["queue"]["running"] == [] and server.health()["queue"]["waiting"] == 0, 120,
              "the queue to empty")
    assert _post(server, {"doc": "terms", "question": QUESTION, "max_new_tokens": 3}).status_code == 200
    log = server.log()
    assert " 413: " in log and " 429: " in log and "Traceback" not in log


@pytest.mark.slow
def test_a_path_with_a_line_break_forges_no_log_line(limited):
    # Over TCP without the key: the refusal (401) logs the path as uvicorn decoded it, line breaks and all.
    for path in (b"/health%0Aforged-line%20200:%20ok", b"/health%0D%0Aforged-too"):  # sent as they are
        sock = socket.create_connection(("127.0.0.1", limited.port))
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: starqa\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.1 401 "), reply
    _wait_for(lambda: "forged-too" in limited.log(), 10, "the refusals in the log")
    lines = limited.log().splitlines()
    assert not any(line.startswith(("forged-line", "forged-too", "\rforged")) for line in lines)
    assert any("/health\\nforged-line 200: ok" in line for line in lines)
    assert any("/health\\r\\nforged-too" in line for line in lines)


def _connect(server: Server) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.socket))
    return sock


def _raw_post(server: Server, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = _connect(server)
    sock.sendall(b"POST /v1/ask HTTP/1.1\r\nHost: starqa\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _refused_or_none(server: Server) -> httpx.Response | None:
    response = server.get("/health")
    return response if response.status_code == 429 else None
