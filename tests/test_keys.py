"""Scoped API keys (starqa.governance.keys) and what `starqa serve` does with them: a key sees and asks only the documents its
globs match (others 404 when named, unlisted, 403 on ask), a revoked key is 401 from the next request on, the key
itself is never stored; and every served answer is recorded in the audit log with who asked (the key's name over
TCP, the peer's uid on the Unix socket). One server run (the tiny random-weight model)."""

from __future__ import annotations

import json
import os
import stat

import httpx
import pytest

from clihelp import json_lines, starqa
from starqa.governance import audit, keys
from test_serve import DTYPE, OTHERS, QUESTION, _free_port, serving

ALL_KEY = "all-" + "y" * 28


def test_a_key_is_printed_once_and_only_its_sha256_is_stored(tmp_path):
    home = tmp_path / "home"
    added = starqa("keys", "add", "ci-bot", "--docs", "contract-*", "--docs", "memo,terms", home=home, timeout=60)
    assert added.returncode == 0, added.stderr
    secret = added.stdout.strip()
    assert secret.startswith(keys.PREFIX) and len(secret) > 40 and added.stdout.count("\n") == 1
    stored = (home / "keys.json").read_text()
    assert secret not in stored and keys.key_hash(secret) in stored
    assert stat.S_IMODE((home / "keys.json").stat().st_mode) == 0o600
    (key,) = keys.read_keys(home)
    assert key.docs == ("contract-*", "memo", "terms") and key.revoked is None
    assert key.allows("contract-alpha") and key.allows("terms") and not key.allows("payroll")
    listed = starqa("keys", "list", "--json", home=home, timeout=60)
    assert secret not in listed.stdout and json_lines(listed.stdout)[0]["name"] == "ci-bot"
    for args, fragment in [(("add", "ci-bot", "--docs", "x"), "a key named 'ci-bot' exists"),
                           (("add", "bad name", "--docs", "x"), "key name 'bad name' must be"),
                           (("add", "other", "--docs", " , "), "give the documents the key may ask"),
                           (("revoke", "nobody"), "no key named 'nobody'")]:
        refused = starqa("keys", *args, home=home, timeout=60)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and fragment in refused.stderr, args
    assert starqa("keys", "revoke", "ci-bot", home=home, timeout=60).returncode == 0
    again = starqa("keys", "revoke", "ci-bot", home=home, timeout=60)
    assert again.returncode == 2 and "already revoked" in again.stderr
    assert keys.read_keys(home)[0].revoked is not None
    reused = starqa("keys", "add", "ci-bot", "--docs", "x", home=home, timeout=60)
    assert reused.returncode == 2 and "was revoked" in reused.stderr  # a name keeps meaning one key in the log
    (home / "keys.json").write_text("{broken")
    damaged = starqa("keys", "list", home=home, timeout=60)
    assert damaged.returncode == 1 and damaged.stderr.count("\n") == 1 and "cannot read the key file" in damaged.stderr


def _ask(base: str, key: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/v1/ask", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"max_new_tokens": 3, "stream": False, **body})


def _answered(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [event["doc"] for event in map(json.loads, response.text.splitlines()) if event["type"] == "answer"]


@pytest.mark.slow
def test_scoped_keys_on_tcp_and_audit_records_of_served_asks(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    texts = tmp_path / "texts"
    texts.mkdir()
    for name, text in {**OTHERS, "terms": "Clause 9. Payroll is private.\n"}.items():
        (texts / f"{name}.txt").write_text(text)
    ingested = starqa("ingest", *sorted(texts.glob("*.txt")), "--block-size", "48", "--model", tiny_model_dir, *DTYPE,
                      home=home)
    assert ingested.returncode == 0, ingested.stderr
    secret = starqa("keys", "add", "alpha-team", "--docs", "contract-a*", home=home, timeout=60).stdout.strip()
    (home.parent / "full.yaml").write_text("audit: full\n")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(home, "--model", str(tiny_model_dir), *DTYPE, "--port", str(port), "--api-key", ALL_KEY,
                 "--config", str(home.parent / "full.yaml")) as server:
        scoped = {"Authorization": f"Bearer {secret}"}
        documents = httpx.get(f"{base}/v1/documents", headers=scoped)
        assert [row["name"] for row in json_lines(documents.text)] == ["contract-alpha"]
        assert [m["id"] for m in httpx.get(f"{base}/v1/models", headers=scoped).json()["data"]] == ["contract-alpha"]
        assert httpx.get(f"{base}/v1/documents/contract-alpha", headers=scoped).json()["name"] == "contract-alpha"
        for path in ("/v1/documents/terms", "/v1/models/contract-beta", "/v1/models/nosuch"):
            assert httpx.get(base + path, headers=scoped).status_code == 404, path  # others look like nothing
        assert "queue" not in httpx.get(f"{base}/health", headers=scoped).json()
        everything = {"Authorization": f"Bearer {ALL_KEY}"}
        assert len(json_lines(httpx.get(f"{base}/v1/documents", headers=everything).text)) == 3  # --api-key: all

        assert _answered(_ask(base, secret, {"doc": "contract-alpha", "question": QUESTION})) == ["contract-alpha"]
        for body in ({"doc": "terms", "question": QUESTION}, {"doc": ["contract-alpha", "terms"], "question": "q"},
                     {"doc": "contract-b*", "question": "q"}):
            refused = _ask(base, secret, body)
            assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden", body
        assert _answered(_ask(base, secret, {"doc": "*", "question": "q"})) == ["contract-alpha"]
        assert _answered(_ask(base, secret, {"all": True, "question": "q"})) == ["contract-alpha"]
        chat = httpx.post(f"{base}/v1/chat/completions", headers=scoped, timeout=60,
                          json={"model": "terms", "messages": [{"role": "user", "content": "q"}]})
        assert chat.status_code == 403
        assert _answered(_ask(base, ALL_KEY, {"doc": "terms", "question": "What is private?"})) == ["terms"]

        with server.client() as client:  # the Unix socket: the owner, every document, recorded by uid
            over_socket = client.post("/v1/ask", json={"doc": "terms", "question": "Socket?", "max_new_tokens": 2})
        assert _answered(over_socket) == ["terms"]

        later = starqa("keys", "add", "late", "--docs", "terms", home=home, timeout=60).stdout.strip()
        assert _answered(_ask(base, later, {"doc": "terms", "question": "q"})) == ["terms"]  # read again
        assert starqa("keys", "revoke", "alpha-team", home=home, timeout=60).returncode == 0
        revoked = httpx.get(f"{base}/v1/models", headers=scoped)
        assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]
        assert _ask(base, secret, {"doc": "contract-alpha", "question": "q"}).status_code == 401
        assert "Traceback" not in server.log()

    everything = list(audit.records(home))
    records = [record for record in everything if "error" not in record]
    refused = [(r["who"]["key"], r["doc"], r["endpoint"], r["exit_code"], r["error"][:8]) for r in everything
               if "error" in r]
    assert refused == [("alpha-team", "terms", "/v1/ask", 1, "HTTP 403"),  # attempts are recorded too
                       ("alpha-team", "contract-alpha,terms", "/v1/ask", 1, "HTTP 403"),
                       ("alpha-team", "contract-b*", "/v1/ask", 1, "HTTP 403"),
                       ("alpha-team", "terms", "/v1/chat/completions", 1, "HTTP 403")]
    by = [(r["who"].get("key") or r["who"].get("uid"), r["doc"], r["question"]) for r in records]
    assert by == [("alpha-team", "contract-alpha", QUESTION), ("alpha-team", "contract-alpha", "q"),
                  ("alpha-team", "contract-alpha", "q"), ("--api-key", "terms", "What is private?"),
                  (os.getuid(), "terms", "Socket?"), ("late", "terms", "q")]
    assert all(r["level"] == "full" and r["exit_code"] == 0 and r["endpoint"] == "/v1/ask" for r in records)
    assert records[4]["via"] == "unix" and records[0]["via"] == "tcp"
    assert records[0]["object"] == (home / "documents" / "contract-alpha").resolve().name
    assert audit.verify(home).breaks == []
    assert secret not in "".join(p.read_text() for p in audit.log_files(audit.audit_dir(home)))


def test_a_scoped_key_never_reaches_another_document_through_a_glob_or_all():
    from starqa.config import load_settings
    from starqa.serve.access import Identity, scoped_ask
    from starqa.serve.protocol import AskRequest, RequestError

    stored = ["contract-a", "contract-b", "contract-ab", "payroll", "*"]
    key = keys.Key("k", "0" * 64, ("contract-?", "*"), "now")  # '*' as a glob: every name; here a literal name too
    only_single = keys.Key("k", "0" * 64, ("contract-?",), "now")

    def asked(identity, docs=(), all_documents=False):
        request = AskRequest(docs=tuple(docs), all_documents=all_documents, questions=("q",), attention="star",
                             stream=False, explicit_model=None, explicit_sizes=False, trust_remote_code=False,
                             settings=load_settings())
        return scoped_ask(identity, request, lambda: stored).docs

    scoped = Identity("tcp", {"key": "k"}, only_single)
    assert asked(scoped, ["*"]) == ("contract-a", "contract-b")  # a glob is expanded to the allowed names only
    assert asked(scoped, ["contract-*"]) == ("contract-a", "contract-b")
    assert asked(scoped, all_documents=True) == ("contract-a", "contract-b")
    assert asked(scoped, ["contract-a", "contract-a"]) == ("contract-a",)
    for docs in (["payroll"], ["contract-ab"], ["contract-a", "payroll"], ["pay*"]):
        with pytest.raises(RequestError) as refused:
            asked(scoped, docs)
        assert refused.value.status == 403, docs
    assert asked(Identity("tcp", {"key": "k"}, key), ["*"]) == ("*",)  # the stored name '*', which it may ask
    assert asked(Identity("unix", {"uid": 0}), ["pay*"]) == ("pay*",)  # no key: resolved as before, everything
