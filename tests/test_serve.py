"""`starqa serve` and the CLI that uses it: a real server on a temporary store (the tiny random-weight model), asked
through the CLI, plain HTTP and (if installed) the `openai` client. What `ask` prints through the server must be
what it prints in its own process, byte for byte; every bad request gets a clear JSON error and the server goes
on; a server that dies leaves the CLI with one line and exit 1, at once. Waits are on conditions, with deadlines."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clihelp import REPO, json_lines, starqa

DOCUMENT = (
    "Clause 1. The supplier delivers the reports every Tuesday.\n\n"
    "Clause 2. Either party may end this agreement with ninety days of written notice.\n\n"
    "Clause 3. The fee is 4,200 euros per month, payable within thirty days.\n\n"
) * 4
NEW_VERSION = DOCUMENT + "Clause 4. The supplier keeps all records for seven years.\n"
OTHERS = {"contract-alpha": "Clause 1. The monthly fee is 4,200 euros.\n\nClause 2. Notice is ninety days.\n",
          "contract-beta": "Clause 1. The monthly fee is 99 dollars.\n\nClause 2. Notice is ten days.\n"}
QUESTION = "What is the fee?"
QUESTIONS = [QUESTION, "When are the reports delivered?", "How much notice is needed?"]
STARTUP_S = 180  # loading torch and the model on a busy 2-core machine
# Every document here is stored, and every server started, in float32: the same on every CPU (auto would be
# bfloat16 on one with AMX), so the one stored in bfloat16 below is the one the server does not hold.
DTYPE = ("--dtype", "float32")
API_KEY = "k3y-" + "x" * 28  # the shared server also listens on TCP, with this key


# ------------------------------------------------------------------------------------------------ helpers

def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Server:
    """`starqa serve ARGS` on the store `home`, as a user starts it (its log in a file, not a pipe that fills)."""

    def __init__(self, home: Path, *args: str, env: dict | None = None) -> None:
        self.home = home
        self.socket = home / "serve.sock"
        self.log_path = home.parent / f"serve-{time.monotonic_ns()}.log"
        environment = dict(os.environ, STARQA_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        environment.update(env or {})
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "starqa", "serve", *args], stdout=subprocess.DEVNULL,
                                        stderr=self._log, env=environment, cwd=REPO)

    def wait_ready(self) -> "Server":
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}): {self.log()}")
            try:
                return self.get("/health").status_code == 200
            except httpx.TransportError:
                return False
        _wait_for(ready, STARTUP_S, "the server to answer /health")
        return self

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://starqa",
                            timeout=60, **kwargs)

    def get(self, path: str) -> httpx.Response:
        with self.client() as client:
            return client.get(path)

    def health(self) -> dict:
        return self.get("/health").json()

    def log(self) -> str:
        if not self._log.closed:  # (closed once the server was stopped)
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)
        self._log.close()


@contextlib.contextmanager
def serving(home: Path, *args: str, env: dict | None = None):
    server = Server(home, *args, env=env).wait_ready()
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.kill()


def _ingest(home: Path, source: Path, model: Path, *extra: str) -> None:
    result = starqa("ingest", source, "--block-size", "48", "--model", model, *DTYPE, *extra, home=home)
    assert result.returncode == 0, result.stderr


def _timeless(stdout: str) -> str:
    """stdout with the measured times of `--json` objects blanked (they differ from run to run), byte for byte
    otherwise."""
    return re.sub(r'"(prefill_s|ttft_s|decode_tokens_per_s)": [0-9.e+-]+', r'"\1": T', stdout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("starqa: error:")]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("texts")
    (folder / "terms.txt").write_text(DOCUMENT)
    (folder / "v2.txt").write_text(NEW_VERSION)
    for name, text in OTHERS.items():
        (folder / f"{name}.txt").write_text(text)
    (folder / "questions.txt").write_text("\n".join(QUESTIONS) + "\n")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory, texts, tiny_model_dir):
    """A store with 'terms' (several blocks), 'contract-alpha' and 'contract-beta', and a server on it (its Unix
    socket, and TCP on 127.0.0.1 with API_KEY): one server for most tests, since each start loads torch and the
    model."""
    home = tmp_path_factory.mktemp("served") / "home"
    result = starqa("ingest", texts / "terms.txt", *(texts / f"{name}.txt" for name in OTHERS), "--block-size",
                    "48", "--model", tiny_model_dir, *DTYPE, home=home)
    assert result.returncode == 0, result.stderr
    port = _free_port()
    with serving(home, "--model", str(tiny_model_dir), *DTYPE, "--port", str(port), "--api-key", API_KEY) as server:
        server.port = port
        yield server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ask(server: Server, model: Path, *args, stdin: str | None = None):
    return starqa("ask", "--max-new-tokens", "6", "--model", model, *args, home=server.home, stdin=stdin)


# ------------------------------------------------------------------------------------------------ the CLI

ASKS = {
    "one question": ("--doc", "terms", QUESTION),
    "a batch streamed, then the next": ("--doc", "terms", "--questions", "{questions}", "--batch-size", "2"),
    "questions as json": ("--doc", "terms", "--questions", "{questions}", "--json"),
    "sampled": ("--doc", "terms", QUESTION, "--temperature", "0.8", "--seed", "3"),
    "full attention": ("--doc", "terms", QUESTION, "--attention", "full"),
    "a glob over stored names": ("--doc", "contract-*", QUESTION),
    "every document, one unknown": ("--doc", "contract-beta", "--doc", "nosuch", "--doc", "terms", QUESTION),
    "all as json": ("--all", QUESTION, "--json"),
    "a name with a path": ("--doc", "../terms", QUESTION),
    "other block sizes than stored": ("--doc", "terms", QUESTION, "--block-size", "64"),
    "quiet": ("--doc", "terms", QUESTION, "--quiet"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ASKS))
def test_ask_through_the_server_prints_exactly_what_it_prints_in_process(served, texts, tiny_model_dir, case):
    args = [arg.format(questions=texts / "questions.txt") for arg in ASKS[case]]
    received = served.health()["queue"]["received"]
    through = _ask(served, tiny_model_dir, *args)
    assert served.health()["queue"]["received"] == received + 1  # the server was asked ...
    here = _ask(served, tiny_model_dir, *args, "--no-server")
    assert served.health()["queue"]["received"] == received + 1  # ... and --no-server did not ask it
    assert "loading model" in here.stderr or "--quiet" in args or here.returncode == 2
    assert "loading model" not in through.stderr  # the server's model answered
    assert (_timeless(through.stdout), through.returncode) == (_timeless(here.stdout), here.returncode), through.stderr
    assert _error_lines(through.stderr) == _error_lines(here.stderr)
    assert "Traceback" not in through.stderr + served.log()
    if "--quiet" in args:
        assert through.stderr == here.stderr == ""
    elif here.returncode == 0:  # the same timing tables, but for their load and memory rows
        titles = [line for line in here.stderr.splitlines() if " attention over " in line]
        assert titles and titles == [line for line in through.stderr.splitlines() if " attention over " in line]


@pytest.mark.slow
def test_questions_from_standard_input_go_to_the_server(served, tiny_model_dir):
    stdin = "\n".join(QUESTIONS) + "\n"
    received = served.health()["queue"]["received"]
    through = _ask(served, tiny_model_dir, "--doc", "terms", "--questions", "-", "--json", stdin=stdin)
    assert served.health()["queue"]["received"] == received + 1
    here = _ask(served, tiny_model_dir, "--doc", "terms", "--questions", "-", "--json", "--no-server", stdin=stdin)
    assert through.returncode == here.returncode == 0, through.stderr
    assert _timeless(through.stdout) == _timeless(here.stdout)
    assert [row["question"] for row in json_lines(through.stdout)] == QUESTIONS


@pytest.mark.slow
def test_the_client_imports_neither_torch_nor_transformers(served, tiny_model_dir):
    probe = ("import sys\n"
             "from starqa import cli\n"
             f"code = cli.main(['ask', '--doc', 'terms', {QUESTION!r}, '--json', '--max-new-tokens', '3', '--model', "
             f"{str(tiny_model_dir)!r}])\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'safetensors', "
             "'numpy', 'tokenizers', 'tiktoken', 'triton') or m in ('starqa.store.document_store', 'starqa.engine.star_engine', 'starqa.answer.ask'))\n"
             "print(repr((code, heavy)), file=sys.stderr)\n")
    received = served.health()["queue"]["received"]
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env=dict(os.environ, STARQA_HOME=str(served.home)))
    assert served.health()["queue"]["received"] == received + 1
    assert result.stderr.strip().splitlines()[-1] == "(0, [])", result.stderr
    assert json_lines(result.stdout)[0]["question"] == QUESTION


@pytest.mark.slow
def test_a_document_stored_for_another_dtype_is_answered_here_the_same(served, texts, tiny_model_dir):
    # The server holds the model in float32; this document's KV is bfloat16, so `ask` would load the model in
    # bfloat16: the server says so (409) and the CLI answers in its own process.
    result = starqa("ingest", texts / "terms.txt", "--name", "terms16", "--block-size", "48", "--model",
                    tiny_model_dir, "--dtype", "bfloat16", home=served.home)
    assert result.returncode == 0, result.stderr
    through = _ask(served, tiny_model_dir, "--doc", "terms16", QUESTION, "--json")
    here = _ask(served, tiny_model_dir, "--doc", "terms16", QUESTION, "--json", "--no-server")
    assert through.returncode == here.returncode == 0, through.stderr
    assert _timeless(through.stdout) == _timeless(here.stdout)
    assert "answering here: document 'terms16' is answered with" in through.stderr
    assert "409: document 'terms16'" in served.log()


@pytest.mark.slow
def test_a_reingested_document_is_answered_from_its_new_version(served, texts, tiny_model_dir):
    _ingest(served.home, texts / "terms.txt", tiny_model_dir, "--name", "changing")
    first = json_lines(_ask(served, tiny_model_dir, "--doc", "changing", QUESTION, "--json").stdout)[0]
    assert any(entry["name"] == "changing" for entry in served.health()["kv_memory"]["documents"])  # held
    _ingest(served.home, texts / "v2.txt", tiny_model_dir, "--name", "changing", "--force")  # while serving
    through = _ask(served, tiny_model_dir, "--doc", "changing", QUESTION, "--json")
    here = _ask(served, tiny_model_dir, "--doc", "changing", QUESTION, "--json", "--no-server")
    assert _timeless(through.stdout) == _timeless(here.stdout) and through.returncode == 0, through.stderr
    second = json_lines(through.stdout)[0]
    assert second["context_tokens"] > first["context_tokens"]  # the new version's KV, not the one held before
    held = [entry for entry in served.health()["kv_memory"]["documents"] if entry["name"] == "changing"]
    assert len(held) == 1  # the old version's KV is gone
    assert starqa("rm", "changing", home=served.home).returncode == 0
    gone = _ask(served, tiny_model_dir, "--doc", "changing", QUESTION)
    assert gone.returncode == 2 and "no document named 'changing'" in gone.stderr
    assert not any(entry["name"] == "changing" for entry in served.health()["kv_memory"]["documents"])


@pytest.mark.slow
def test_a_block_file_damaged_while_its_kv_is_held_is_refused_as_in_process(served, texts, tiny_model_dir):
    _ingest(served.home, texts / "terms.txt", tiny_model_dir, "--name", "fragile")
    assert _ask(served, tiny_model_dir, "--doc", "fragile", QUESTION).returncode == 0  # its KV is now held
    block = next((served.home / "documents" / "fragile").resolve().glob("blocks/*.safetensors"))
    block.write_bytes(block.read_bytes()[:-10])
    through = _ask(served, tiny_model_dir, "--doc", "fragile", QUESTION)
    here = _ask(served, tiny_model_dir, "--doc", "fragile", QUESTION, "--no-server")
    assert through.returncode == here.returncode == 1
    assert _error_lines(through.stderr) == _error_lines(here.stderr)
    assert "document 'fragile' is damaged" in through.stderr
    assert (through.stdout, here.stdout) == ("", "")


# ------------------------------------------------------------------------------------------------ HTTP

def _stored_answer(server: Server, model: Path, doc: str = "terms") -> dict:
    return json_lines(_ask(server, model, "--doc", doc, QUESTION, "--json", "--max-new-tokens", "5").stdout)[0]


@pytest.mark.slow
def test_the_http_api_asks_lists_and_reports_health(served, tiny_model_dir):
    expected = _stored_answer(served, tiny_model_dir)
    with served.client() as client:
        listed = client.get("/v1/documents")
        assert listed.status_code == 200
        assert listed.text == starqa("list", "--json", home=served.home).stdout  # `starqa list --json`, line for line
        with client.stream("POST", "/v1/ask", json={"doc": "terms", "question": QUESTION,
                                                    "max_new_tokens": 5}) as response:
            assert response.headers["content-type"].startswith("application/x-ndjson")
            events = [json.loads(line) for line in response.iter_lines() if line]
    kinds = [event["type"] for event in events]
    assert kinds[0] == "delta" and kinds[-3:] == ["answer", "timings", "done"]
    answer = events[-3]
    assert {key: value for key, value in answer["answer"].items() if not key.endswith("_s")} == \
        {key: value for key, value in expected.items() if not key.endswith("_s")}
    assert "".join(event["text"] for event in events if event["type"] == "delta") == answer["text"]
    health = served.health()
    assert health["status"] == "ok" and health["model"] == str(tiny_model_dir) and health["dtype"] == "float32"
    assert health["queue"]["waiting"] == 0 and health["kv_memory"]["held_bytes"] > 0
    # The next ask of 'terms' is answered from the KV held in memory: a hit, no read of the store.
    with served.client() as client:
        again = client.post("/v1/ask", json={"doc": "terms", "question": QUESTION, "max_new_tokens": 5,
                                             "stream": False})
    assert again.status_code == 200 and json.loads(again.text.splitlines()[-1]) == {"type": "done", "exit_code": 0}
    after = served.health()
    assert after["kv_memory"]["hits"] == health["kv_memory"]["hits"] + 1
    assert after["kv_memory"]["misses"] == health["kv_memory"]["misses"]
    assert after["queue"]["answered"] == health["queue"]["answered"] + 1  # answered, not only received
    assert after["queue"]["received"] == health["queue"]["received"] + 1


@pytest.mark.slow
def test_the_openai_chat_endpoint_answers_streamed_and_whole(served, tiny_model_dir):
    expected = _stored_answer(served, tiny_model_dir)
    request = {"model": "terms", "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": QUESTION}], "max_tokens": 5,
               "temperature": 0}
    with served.client() as client:
        whole = client.post("/v1/chat/completions", json=request).json()
        assert whole["object"] == "chat.completion" and whole["model"] == "terms"
        assert whole["choices"][0]["message"] == {"role": "assistant", "content": expected["answer"]}
        assert whole["usage"]["completion_tokens"] == expected["answer_tokens"]
        assert {key: whole["starqa"][key] for key in ("sources", "evidence", "grounded")} == \
            {key: expected[key] for key in ("sources", "evidence", "grounded")}
        with client.stream("POST", "/v1/chat/completions", json=dict(request, stream=True)) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        models = client.get("/v1/models").json()
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert content == expected["answer"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "terms" in [model["id"] for model in models["data"]]


@pytest.mark.slow
def test_the_openai_client_asks_a_stored_document(served, tiny_model_dir):
    openai = pytest.importorskip("openai")  # not a dependency: checked where it happens to be installed
    expected = _stored_answer(served, tiny_model_dir)
    http_client = httpx.Client(transport=httpx.HTTPTransport(uds=str(served.socket)))
    client = openai.OpenAI(base_url="http://starqa/v1", api_key="unused-on-the-unix-socket", http_client=http_client)
    reply = client.chat.completions.create(model="terms", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=5)
    assert reply.choices[0].message.content == expected["answer"]
    streamed = client.chat.completions.create(model="terms", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=5, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == expected["answer"]


BAD_REQUESTS = [
    # (case, path, raw body, status, fragment of the error's message)
    ("malformed JSON", "/v1/ask", b'{"doc": "terms", "question": ', 400, "not valid JSON"),
    ("not an object", "/v1/ask", b'["terms"]', 400, "must be a JSON object"),
    ("unknown field", "/v1/ask", b'{"doc": "terms", "question": "q", "max_tokens": 5}', 400,
     "unknown field 'max_tokens'"),
    ("wrong type", "/v1/ask", b'{"doc": "terms", "question": "q", "seed": "three"}', 400, "setting 'seed'"),
    ("bad setting", "/v1/ask", b'{"doc": "terms", "question": "q", "top_p": 7}', 400, "top-p must be in (0, 1]"),
    ("a lone surrogate", "/v1/ask", b'{"doc": "terms", "question": "\\ud800"}', 400, "not valid Unicode"),
    ("nested deeper than any request", "/v1/ask", b'{"doc": "terms", "question": "q", "seed": ' + b"[" * 500
     + b"]" * 500 + b"}", 400, "nests deeper than 32 levels"),
    ("nested past the JSON parser's limit", "/v1/ask", b'{"doc": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400,
     "nests too deeply"),
    ("not UTF-8", "/v1/ask", b'{"doc": "terms", "question": "\xff"}', 400, "not valid JSON"),
    ("no question", "/v1/ask", b'{"doc": "terms"}', 400, "give one 'question'"),
    ("empty question", "/v1/ask", b'{"doc": "terms", "question": "  "}', 400, "non-empty string"),
    ("a path for a name", "/v1/ask", b'{"doc": "../../etc/passwd", "question": "q"}', 400, "path separator"),
    ("a file the server could read", "/v1/ask", b'{"doc": "/etc/hostname", "question": "q"}', 400,
     "path separator"),
    ("unknown document", "/v1/ask", b'{"doc": "nosuch", "question": "q"}', 404, "no document named 'nosuch'"),
    ("a glob matching nothing", "/v1/ask", b'{"doc": "zzz-*", "question": "q"}', 400, "matches no stored document"),
    ("chat without messages", "/v1/chat/completions", b'{"model": "terms"}', 400, "'messages'"),
    ("chat without a user message", "/v1/chat/completions",
     b'{"model": "terms", "messages": [{"role": "system", "content": "hi"}]}', 400, "no user message"),
    ("chat about an unknown document", "/v1/chat/completions",
     b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "q"}]}', 404, "no document named 'gpt-4o'"),
    ("chat with an unsupported field", "/v1/chat/completions",
     b'{"model": "terms", "messages": [{"role": "user", "content": "q"}], "tools": []}', 400,
     "unsupported field 'tools'"),
]


@pytest.mark.slow
def test_bad_requests_get_a_clear_json_error_one_log_line_and_the_server_goes_on(served, tiny_model_dir):
    limit = served.health()  # the server answers before ...
    with served.client() as client:
        for case, path, body, status, fragment in BAD_REQUESTS:
            before = served.log().count("\n")
            response = client.post(path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == status, (case, response.text)
            error = response.json()["error"]
            assert fragment in error["message"], (case, error)
            assert "\n" not in error["message"]
            _wait_for(lambda: served.log().count("\n") == before + 1, 10, f"one log line for {case}")
            assert f" {status}: " in served.log().splitlines()[-1], case
        big = json.dumps({"doc": "terms", "question": "q" * (2 << 20)})
        response = client.post("/v1/ask", content=big)
        assert response.status_code == 413 and "max_request_bytes" in response.json()["error"]["message"]

        def chunked():  # no Content-Length: the body is counted as it arrives
            yield b'{"doc": "terms", "question": "'
            for _ in range(40):
                yield b"q" * 65536
            yield b'"}'

        response = client.post("/v1/ask", content=chunked())
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert response.status_code == 413, response.text
        assert "over the limit of 1,048,576 bytes (max_request_bytes)" in response.json()["error"]["message"]
        assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()
        assert client.get("/v1/ask").status_code == 405
    assert limit["status"] == served.health()["status"] == "ok"  # ... and after
    assert _ask(served, tiny_model_dir, "--doc", "terms", QUESTION).returncode == 0
    assert "Traceback" not in served.log()


def _stream_until_first_delta(sock_path: Path, body: dict) -> socket.socket:
    """POST /v1/ask on a raw socket and read until its first answer text arrived; the socket is left open."""
    payload = json.dumps(body).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(sock_path))
    sock.sendall(b"POST /v1/ask HTTP/1.1\r\nHost: starqa\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    received = b""
    while b'"type": "delta"' not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    return sock


@pytest.mark.slow
def test_a_client_that_goes_away_mid_answer_is_cancelled_and_the_next_one_answered(served, tiny_model_dir):
    before = served.health()["queue"]["cancelled"]
    sock = _stream_until_first_delta(served.socket, {"doc": "terms", "question": QUESTION, "max_new_tokens": 4000})
    sock.close()
    # (The deadline is long so that a worker which noticed only at the end is caught below, on a busy machine too.)
    _wait_for(lambda: served.health()["queue"]["cancelled"] == before + 1, 300, "the ask to be cancelled")
    assert served.health()["queue"]["running"] == []
    # Decoding stopped soon after the client went: far from the 4,000 tokens asked (a worker that noticed only
    # at the end, as the tiny model can decode them all within the wait, would have sent ~4,000 pieces of text).
    stopped = re.findall(r"cancelled: the client went away \(after (\d+) pieces of answer text\)", served.log())
    assert stopped and int(stopped[-1]) < 1000, stopped
    assert _ask(served, tiny_model_dir, "--doc", "terms", QUESTION).returncode == 0


@pytest.mark.slow
def test_asks_waiting_for_one_document_are_decoded_together_as_if_alone(served, tiny_model_dir):
    questions = ["What is the fee?", "Who delivers the reports?", "How long is the notice?"]
    alone = [_ask(served, tiny_model_dir, "--doc", "terms", question, "--json").stdout for question in questions]
    together_before = served.health()["queue"]["decoded_together"]
    # A long answer keeps the worker busy while three asks queue up behind it; then its client goes away.
    busy = _stream_until_first_delta(served.socket, {"doc": "contract-alpha", "question": QUESTION,
                                                     "max_new_tokens": 4000})
    environment = dict(os.environ, STARQA_HOME=str(served.home), OMP_NUM_THREADS="1")
    waiting = [subprocess.Popen([sys.executable, "-m", "starqa", "ask", "--doc", "terms", question, "--json",
                                 "--max-new-tokens", "6", "--model", str(tiny_model_dir)], cwd=REPO, env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for question in questions]
    try:
        _wait_for(lambda: served.health()["queue"]["waiting"] == 3, 120, "three asks waiting")
    finally:
        busy.close()
    outputs = [process.communicate(timeout=120) for process in waiting]
    assert [process.returncode for process in waiting] == [0, 0, 0], outputs
    assert [_timeless(out) for out, _ in outputs] == [_timeless(out) for out in alone]  # as if asked alone
    assert served.health()["queue"]["decoded_together"] == together_before + 3
    assert "answered together (3 questions)" in served.log()
    assert all("(3 at once)" in err for _, err in outputs)


@pytest.mark.slow
def test_a_client_that_does_not_read_holds_up_no_one(served, tiny_model_dir):
    # This client asks for a long answer and does not read it: ~4,000 events of text, far more than the socket's
    # buffers take (each small write costs a whole buffer entry), so its response waits to send. The worker hands
    # the events to the client's own queue (beyond max_queued_events they are merged, never blocking) and goes on
    # to the next ask, answered while the first client still has not read a byte more.
    merged = served.health()["queue"]["events_merged"]
    stalled = _stream_until_first_delta(served.socket, {"doc": "contract-beta", "question": QUESTION,
                                                        "max_new_tokens": 4000})
    try:
        _wait_for(lambda: "contract-beta (1 question, star): answered (exit 0)" in served.log(), 120,
                  "the unread ask to be decoded to its end")
        with served.client() as client:  # (a worker blocked on the unread client would never answer this)
            answered = client.post("/v1/ask", json={"doc": "terms", "question": QUESTION, "max_new_tokens": 3,
                                                    "stream": False}, timeout=60)
        assert answered.status_code == 200 and '"type": "done", "exit_code": 0' in answered.text
        assert served.health()["queue"]["events_merged"] > merged  # the unread events exceeded the limit
        rest = b""
        while b'"type": "done"' not in rest:  # and the stalled client's answer is all there when it reads it
            chunk = stalled.recv(65536)
            assert chunk, rest[-200:]
            rest += chunk
    finally:
        stalled.close()
    events = [json.loads(line) for line in _event_lines(rest)]
    answer = next(event for event in events if event["type"] == "answer")
    assert answer["answer"]["answer_tokens"] > 1000
    streamed = "".join(event["text"] for event in events if event["type"] == "delta")
    assert answer["text"].endswith(streamed) and len(streamed) > len(answer["text"]) // 2  # no text lost


def _event_lines(raw: bytes) -> list[bytes]:
    """The whole event lines in raw bytes of a chunked HTTP response read from some point on (one event per
    chunk: its size line, then the event; the first may be cut)."""
    lines = []
    for line in raw.split(b"\n"):
        line = line.strip(b"\r")
        if line.startswith(b'{"type"'):
            try:
                json.loads(line)
            except ValueError:
                continue
            lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------------ lifecycle

@pytest.mark.slow
def test_a_server_killed_mid_answer_then_sigterm_on_the_next_one(tmp_path, texts, tiny_model_dir):
    """SIGKILL mid-answer: the CLI prints one line and exits 1 at once. The next server takes the socket over
    (its API key from the environment); SIGTERM finishes the answer in flight, hands the waiting ask back to its
    CLI (which answers it in its own process), removes the socket and exits 0."""
    home = tmp_path / "home"
    _ingest(home, texts / "terms.txt", tiny_model_dir)
    environment = dict(os.environ, STARQA_HOME=str(home), OMP_NUM_THREADS="1")
    with serving(home, "--model", str(tiny_model_dir), *DTYPE) as server:
        assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o600
        ask = subprocess.Popen([sys.executable, "-m", "starqa", "ask", "--doc", "terms", QUESTION,
                                "--max-new-tokens", "4000", "--model", str(tiny_model_dir)], cwd=REPO,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([ask.stdout], [], [], 120)
        assert ready and os.read(ask.stdout.fileno(), 1)  # the answer is streaming
        server.kill()
        killed = time.monotonic()
        _, stderr = ask.communicate(timeout=30)
        assert time.monotonic() - killed < 10
    assert ask.returncode == 1
    assert stderr.decode().splitlines() == [
        f"starqa: error: the starqa server on {home.resolve() / 'serve.sock'} stopped before the answer was complete "
        "(RemoteProtocolError); ask again (with --no-server to answer in this process)"]
    # The killed server left its socket: a new ask answers in its own process ...
    assert server.socket.exists()
    here = starqa("ask", "--doc", "terms", QUESTION, "--json", "--max-new-tokens", "4", "--model", tiny_model_dir,
                  home=home)
    assert here.returncode == 0 and "loading model" in here.stderr, here.stderr
    # ... and a new server takes the socket over.
    port = _free_port()
    with serving(home, "--model", str(tiny_model_dir), *DTYPE, "--port", str(port),
                 env={"STARQA_API_KEY": API_KEY}) as server:
        health = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {API_KEY}"})
        assert health.status_code == 200 and health.json()["status"] == "ok"  # the key from the environment
        running = _stream_until_first_delta(server.socket, {"doc": "terms", "question": QUESTION,
                                                            "max_new_tokens": 600})
        waiting = subprocess.Popen([sys.executable, "-m", "starqa", "ask", "--doc", "terms", QUESTION, "--json",
                                    "--max-new-tokens", "4", "--model", str(tiny_model_dir)], cwd=REPO,
                                   env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: server.health()["queue"]["waiting"] == 1, 120, "an ask waiting")
        server.process.send_signal(signal.SIGTERM)
        rest = b""
        while chunk := running.recv(65536):  # the answer in flight is finished ...
            rest += chunk
        running.close()
        assert b'"type": "done", "exit_code": 0' in rest
        out, err = waiting.communicate(timeout=120)  # ... and the waiting ask answered by its own process
        assert waiting.returncode == 0 and "answering here: the server did not" in err
        assert _timeless(out) == _timeless(here.stdout)
        assert server.process.wait(60) == 0
    assert not (home / "serve.sock").exists()


@pytest.mark.slow
def test_tcp_needs_the_api_key_and_start_up_refusals_are_one_line(served, tmp_path):
    for args, fragment in [(("--port", "1"), "needs an API key"), (("--host", "0.0.0.0"), "--host needs --port"),
                           (("--port", "99999", "--api-key", "k"), "--port must be a TCP port"),
                           (("--nproc", "2"), "serving on several GPUs is not supported yet"),
                           (("--max-kv-memory", "lots"), "max_kv_memory must be a size")]:
        refused = starqa("serve", *args, home=tmp_path / "elsewhere", timeout=120)
        assert refused.returncode == 2 and _error_lines(refused.stderr) == refused.stderr.splitlines(), args
        assert fragment in refused.stderr
    home = served.home
    second = starqa("serve", "--model", "unused", home=home, timeout=120)
    assert second.returncode == 1 and _error_lines(second.stderr) == [
        f"starqa: error: a starqa server is already running on the store {home.resolve()} (socket "
        f"{home.resolve() / 'serve.sock'}); stop it first, or ask it questions"]
    base, key = f"http://127.0.0.1:{served.port}", API_KEY
    assert httpx.get(f"{base}/health").status_code == 401
    assert httpx.get(f"{base}/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{base}/health", headers={"Authorization": key}).status_code == 401
    assert httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {key}x"}).status_code == 401
    unauthorized = httpx.post(f"{base}/v1/ask", json={"doc": "terms", "question": QUESTION})
    assert unauthorized.status_code == 401 and "API key" in unauthorized.json()["error"]["message"]
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{base}/health", headers=headers).json()["status"] == "ok"
    answer = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=60,
                        json={"model": "terms", "messages": [{"role": "user", "content": QUESTION}],
                              "max_tokens": 3})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    assert served.get("/health").status_code == 200  # the Unix socket needs no key
    assert "401: missing or wrong API key" in served.log()


# ------------------------------------------------------------------------------------------------ KV memory

class _FakeKV:
    def __init__(self, size: int) -> None:
        self.size = size

    def nbytes(self) -> int:
        return self.size


def test_kv_memory_keeps_the_most_recently_used_within_its_limit(tmp_path):
    from starqa.serve.kv_memory import KVMemory

    memory = KVMemory(max_bytes=100)
    for name, size in [("a", 40), ("b", 40)]:
        memory.put((str(tmp_path / name), "m"), name, _FakeKV(size))
    assert memory.get((str(tmp_path / "a"), "m")) is not None  # a is now the most recently used
    memory.put((str(tmp_path / "c"), "m"), "c", _FakeKV(40))  # b goes
    assert [entry["name"] for entry in memory.snapshot()["documents"]] == ["c", "a"]
    assert memory.held_bytes == 80
    memory.make_room(70)  # a document of 70 bytes is about to be read: both go
    assert memory.held_bytes == 0
    memory.put((str(tmp_path / "d"), "m"), "d", _FakeKV(101))  # larger than the limit: used, not kept
    assert memory.held_bytes == 0
    memory.put((str(tmp_path / "e"), "m"), "e", _FakeKV(10))
    memory.forget_stale(lambda name: None)  # its name links nowhere now (removed)
    assert memory.snapshot()["documents"] == []


# ------------------------------------------------------------------------------------------------ last: Ctrl-C

@pytest.mark.slow
def test_ctrl_c_stops_the_shared_server_with_130_and_removes_its_socket(served):
    # Last in this file: it stops the server the tests above share.
    assert served.stop(signal.SIGINT) == 130
    assert not served.socket.exists()
    assert "stopped (Ctrl-C)" in served.log() and "Traceback" not in served.log()
