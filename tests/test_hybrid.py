"""`--attention hybrid`: Star answers first; only the answers that are not grounded are answered again with full
attention, together after the Star batch, and the output says which mode answered (starqa.answer.hybrid).

In one process the grounding signal is controlled (starqa.answer.passes.answer_evidence patched: a question is grounded or not
as the test says), with the tiny random-weight model; through a real server, the tiny model's answers are never
grounded, so every one is answered again, and the server prints what `ask --no-server` prints."""

from __future__ import annotations

import socket

import httpx
import pytest

from clihelp import json_lines, starqa
from starqa.answer import passes
from starqa import cli
from starqa.evidence.quotes import Evidence
from starqa.answer.hybrid import compose_record, escalation_reason, with_hybrid

DOCUMENT = ("Clause 1. The supplier delivers the reports every Tuesday.\n\n"
            "Clause 2. Either party may end this agreement with ninety days of written notice.\n\n"
            "Clause 3. The fee is 4,200 euros per month, payable within thirty days.\n\n") * 3
QUESTIONS = ["What is the fee?", "When are the reports delivered?", "How much notice is needed?",
             "Who delivers the reports?"]
UNGROUNDED = {QUESTIONS[1], QUESTIONS[3]}  # the questions whose Star answer is made ungrounded in one process
DTYPE = ("--dtype", "float32")


@pytest.fixture
def stored(home, tmp_path, tiny_model_dir):
    source = tmp_path / "terms.txt"
    source.write_text(DOCUMENT)
    (tmp_path / "questions.txt").write_text("\n".join(QUESTIONS) + "\n")
    assert cli.main(["ingest", str(source), "--block-size", "48", "--model", str(tiny_model_dir), *DTYPE,
                     "--quiet"]) == 0
    return tmp_path


def control_passes(monkeypatch, record) -> None:
    """Grounded as UNGROUNDED says (for every model); `record(kind, engine, questions)` hears of every Star batch
    ("star") and every full-attention pass ("full": its questions, decoded together) before it runs."""
    real_star, real_full, real_evidence = passes.ask_star, passes.ask_full, passes.answer_evidence

    def evidence(engine, document, observer, answer, question, ranks=None):
        found = real_evidence(engine, document, observer, answer, question, ranks)
        return Evidence(sources=found.sources, evidence=found.evidence, grounded=question not in UNGROUNDED)

    def star(engine, ctx, document, questions, settings, **kwargs):
        record("star", engine, list(questions))
        return real_star(engine, ctx, document, questions, settings, **kwargs)

    def full(engine, document, full_kv, questions, settings, **kwargs):
        record("full", engine, list(questions))
        return real_full(engine, document, full_kv, questions, settings, **kwargs)

    monkeypatch.setattr(passes, "answer_evidence", evidence)
    monkeypatch.setattr(passes, "ask_star", star)
    monkeypatch.setattr(passes, "ask_full", full)


@pytest.fixture
def controlled(monkeypatch):
    """Grounded as the test says (UNGROUNDED), and a log of the Star batches and full-attention passes run."""
    calls = []
    control_passes(monkeypatch, lambda kind, engine, questions: calls.append((kind, questions)))
    return calls


def _ask(capsys, model, *args) -> tuple[int, str, str]:
    code = cli.main(["ask", "--doc", "terms", "--model", str(model), "--max-new-tokens", "6", "--no-server", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_only_the_ungrounded_answers_are_answered_again_with_full_attention_together(stored, controlled, capsys,
                                                                                     tiny_model_dir):
    questions = str(stored / "questions.txt")
    code, out, _ = _ask(capsys, tiny_model_dir, "--questions", questions, "--json", "--attention", "star")
    assert code == 0
    star = {row["question"]: row for row in json_lines(out)}
    code, out, _ = _ask(capsys, tiny_model_dir, "--questions", questions, "--json", "--attention", "full")
    full = {row["question"]: row for row in json_lines(out)}
    controlled.clear()

    code, out, err = _ask(capsys, tiny_model_dir, "--questions", questions, "--json", "--attention", "hybrid")
    assert code == 0, err
    rows = json_lines(out)
    assert [row["question"] for row in rows] == QUESTIONS  # in the order asked
    # One Star batch of every question, then full attention for exactly the ungrounded ones, in order.
    assert controlled == [("star", QUESTIONS), ("full", [q for q in QUESTIONS if q in UNGROUNDED])]
    for row in rows:
        question = row["question"]
        if question in UNGROUNDED:
            assert row["attention"] == "full" and row["answer"] == full[question]["answer"]
            assert row["hybrid"]["escalated"] is True and row["hybrid"]["reason"] == "not grounded"
            assert row["hybrid"]["star_answer"] == star[question]["answer"]
            # the timings hold both passes
            assert row["prefill_s"] > full[question]["prefill_s"] * 0 and row["hybrid"]["star_s"] > 0
            assert row["ttft_s"] >= row["hybrid"]["star_s"]
        else:
            assert row["attention"] == "star" and row["answer"] == star[question]["answer"]
            assert row["hybrid"] == {"escalated": False, "star_answer": None, "reason": None}
    assert "hybrid" not in star[QUESTIONS[0]] and "hybrid" not in full[QUESTIONS[0]]  # the other modes: unchanged


def test_text_mode_says_on_stderr_which_answers_were_given_again(stored, controlled, capsys, tiny_model_dir):
    code, out, err = _ask(capsys, tiny_model_dir, "--questions", str(stored / "questions.txt"), "--attention",
                          "hybrid")
    assert code == 0
    assert err.count("answered again with full attention: not grounded") == len(UNGROUNDED)
    assert "answered again" not in out
    assert "answered again (full attention)" in err and f"{len(UNGROUNDED)} of {len(QUESTIONS)}" in err


def test_full_attention_encodes_the_document_once_and_answers_as_one_causal_pass_does(stored, home, tiny_model_dir,
                                                                                         monkeypatch):
    # `--attention full` and hybrid's second pass make the document's full-attention KV once (one causal pass) and
    # answer every question over it; each answer must be the one a causal pass over document and question gives.
    from types import SimpleNamespace

    from starqa.config import load_settings
    from starqa.documents.tokens import context_ids_for, prompt_template, query_ids_for
    from starqa.engine.star_engine import StarEngine
    from starqa.store.document_store import DocumentStore

    engine = StarEngine.load(str(tiny_model_dir), device="cpu", dtype="float32", store_root=home)
    document = DocumentStore(home).get("terms")
    template = prompt_template(engine.tokenizer)
    context_ids = context_ids_for(engine.tokenizer, template, engine.encode_document_text(document.text()))
    settings = load_settings(None, max_new_tokens=6)
    passes_run = []
    real_encode = engine.encode_context
    monkeypatch.setattr(engine, "encode_context", lambda ids, *a, **k: passes_run.append(list(ids))
                        or real_encode(ids, *a, **k))
    opened = SimpleNamespace(engine=engine, document=document, context=context_ids)
    first, first_s = passes.full_context(opened)
    again, again_s = passes.full_context(opened)
    assert again is first and passes_run == [context_ids] and first_s > 0 and again_s == 0.0
    # the stored blocks (48 tokens) still name the sources
    assert first.spans == [(block["start"], block["end"]) for block in document.blocks]
    replies = passes.ask_full(engine, document, first, QUESTIONS, settings, context_s=first_s)
    for question, reply in zip(QUESTIONS, replies):
        one_pass = engine.generate_full(context_ids + query_ids_for(engine.tokenizer, template, question),
                                        max_new_tokens=6)
        assert reply.answer.answer == passes.answer_text(engine, one_pass), question
        assert reply.answer.attention == "full" and reply.answer.prefill_s >= first_s


def test_full_attention_timing_tables_count_the_documents_pass_once(stored, capsys, tiny_model_dir):
    import re

    code, out, err = _ask(capsys, tiny_model_dir, "--questions", str(stored / "questions.txt"), "--json",
                          "--attention", "full")
    rows = json_lines(out)
    assert code == 0 and len(rows) == len(QUESTIONS)
    counted = [int(tokens) for tokens in re.findall(r"full-attention prefill\D*?[\d.]+ s \((\d+) tokens\)", err)]
    # the first question's prefill holds the document's causal pass; the later ones only their own tokens
    assert counted == [rows[0]["context_tokens"] + rows[0]["query_tokens"]] + [row["query_tokens"] for row in rows[1:]]


def test_a_grounded_answer_is_not_answered_again(stored, controlled, capsys, tiny_model_dir):
    code, out, err = _ask(capsys, tiny_model_dir, QUESTIONS[0], "--attention", "hybrid", "--json")
    assert code == 0 and [call[0] for call in controlled] == ["star"]
    assert json_lines(out)[0]["attention"] == "star" and "answered again with" not in err


def test_batches_escalate_their_own_ungrounded_answers(stored, controlled, capsys, tiny_model_dir):
    code, out, _ = _ask(capsys, tiny_model_dir, "--questions", str(stored / "questions.txt"), "--attention",
                        "hybrid", "--json", "--batch-size", "2")
    assert code == 0
    assert controlled == [("star", QUESTIONS[:2]), ("full", [QUESTIONS[1]]), ("star", QUESTIONS[2:]),
                          ("full", [QUESTIONS[3]])]
    assert [row["attention"] for row in json_lines(out)] == ["star", "full", "star", "full"]


@pytest.mark.parametrize("args", [("--attention", "mixed"), ("--attention", "")])
def test_an_unknown_mode_is_one_line_and_exit_2(home, capsys, args, tiny_model_dir):
    code = cli.main(["ask", "--doc", "terms", "What?", "--no-server", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "star, full or hybrid" in err


# ------------------------------------------------------------------------------------------------ eval records


def _record(mode, score, grounded=None, **extra):
    record = {"task": "qa", "length": 100, "index": 0, "mode": mode, "block_size": 25 if mode == "star" else None,
              "anchor_size": 25 if mode == "star" else None, "score": score, "prediction": f"{mode} answer",
              "phase1_s": 1.0 if mode == "star" else None, "prefill_s": 0.5, "ttft_s": 0.5, "decode_s": 1.0,
              "peak_rss_mb": 100.0 if mode == "star" else 200.0, "new_tokens": 3, "decode_tokens_per_s": 2.0}
    if grounded is not None:
        record["grounded"] = grounded
    record.update(extra)
    return record


def test_a_hybrid_record_takes_the_full_answer_only_when_star_is_not_grounded():
    kept = compose_record(_record("star", 0.0, grounded=True), _record("full", 1.0))
    assert (kept["score"], kept["prediction"], kept["escalated"], kept["answer_s"]) == (0.0, "star answer", False, 1.5)
    again = compose_record(_record("star", 0.0, grounded=False), _record("full", 1.0))
    assert (again["score"], again["prediction"], again["escalated"], again["reason"]) == (1.0, "full answer", True,
                                                                                          "not grounded")
    assert again["answer_s"] == 3.0 and again["peak_rss_mb"] == 200.0  # both passes' seconds; the larger peak
    assert again["mode"] == "hybrid" and (again["block_size"], again["phase1_s"]) == (25, 1.0)
    assert escalation_reason(True) is None and escalation_reason(False) == "not grounded"


def test_hybrid_rows_report_accuracy_against_full_the_share_escalated_and_seconds_per_answer():
    from starqa.eval import summary

    records = []
    for index, (grounded, star_score, full_score) in enumerate([(True, 1.0, 1.0), (False, 0.0, 1.0),
                                                                (True, 0.0, 1.0), (False, 1.0, 0.0)]):
        records += [dict(_record("full", full_score), index=index),
                    dict(_record("star", star_score, grounded=grounded), index=index)]
    rows, _ = summary.summarize(with_hybrid(records))
    hybrid = next(row for row in rows if row["mode"] == "hybrid")
    star = next(row for row in rows if row["mode"] == "star")
    assert (hybrid["accuracy"], hybrid["escalated"], hybrid["samples"]) == (50.0, 50.0, 4)
    assert (hybrid["delta"], hybrid["better"], hybrid["worse"]) == (-25.0, 0, 1)  # full: 75 %
    assert star["escalated"] is None and hybrid["answer_s"] == 2.25  # 1.5 s, or 1.5 + 1.5 s when escalated
    assert hybrid["answer_ratio"] == 1.5 and star["answer_ratio"] == 1.0
    assert hybrid["phase1_s"] == star["phase1_s"] == 1.0  # the Star pass's Phase 1
    assert len(with_hybrid(with_hybrid(records))) == len(with_hybrid(records))  # composed once


# ------------------------------------------------------------------------------------------------ a real server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_through_the_server_ungrounded_answers_are_answered_again_as_in_process(tmp_path, tiny_model_dir):
    from test_serve import serving

    home = tmp_path / "home"
    source = tmp_path / "terms.txt"
    source.write_text(DOCUMENT)
    (tmp_path / "questions.txt").write_text("\n".join(QUESTIONS) + "\n")
    assert starqa("ingest", source, "--block-size", "48", "--model", tiny_model_dir, *DTYPE, home=home).returncode == 0
    args = ("ask", "--doc", "terms", "--questions", tmp_path / "questions.txt", "--max-new-tokens", "6", "--model",
            tiny_model_dir, "--attention")
    star = {row["question"]: row for row in json_lines(starqa(*args, "star", "--json", "--no-server",
                                                               home=home).stdout)}
    assert not any(row["grounded"] for row in star.values())  # random weights: nothing is grounded
    here = starqa(*args, "hybrid", "--json", "--no-server", home=home)
    with serving(home, "--model", str(tiny_model_dir), *DTYPE) as server:
        through = starqa(*args, "hybrid", "--json", home=home)
        text = starqa(*args, "hybrid", home=home)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(server.socket)), base_url="http://starqa",
                          timeout=120) as client:
            chat = client.post("/v1/chat/completions", json={
                "model": "terms", "attention": "hybrid", "max_tokens": 6,
                "messages": [{"role": "user", "content": QUESTIONS[0]}]}).json()
            bad = client.post("/v1/ask", json={"doc": "terms", "question": "What?", "attention": "mixed"})
        assert "loading model" not in through.stderr and server.health()["queue"]["received"] >= 3
    assert here.returncode == through.returncode == 0, through.stderr
    rows, served_rows = json_lines(here.stdout), json_lines(through.stdout)
    timeless = lambda row: {k: v for k, v in row.items() if not k.endswith("_s") and k != "hybrid"}  # noqa: E731
    assert [timeless(row) for row in served_rows] == [timeless(row) for row in rows]
    for row in served_rows:
        assert row["attention"] == "full" and row["hybrid"]["escalated"] is True
        assert row["hybrid"]["star_answer"] == star[row["question"]]["answer"]
    assert text.stderr.count("answered again with full attention: not grounded") == len(QUESTIONS)
    assert chat["starqa"]["attention"] == "full" and chat["starqa"]["hybrid"]["escalated"] is True
    assert chat["choices"][0]["message"]["content"] == chat["starqa"]["answer"]
    assert bad.status_code == 400 and "star, full or hybrid" in bad.json()["error"]["message"]


def test_eval_judges_grounded_against_the_users_question_not_the_suites_instruction():
    from starqa.eval.runner import user_question
    from starqa.eval.tasks import generate_cases
    from starqa.evidence.quotes import content_terms, grounded

    case = generate_cases("niah_single_1", 300, 1, 0, lambda context, question: (len(context) + len(question)) // 4)[0]
    asked = user_question(case)
    assert asked != case.question and asked.endswith("mentioned in the provided text?") and "Begin" not in asked
    value = case.answers[0]
    answer = f"{case.answer_prefix}: {value}."
    quote = next(line for line in case.context_text.splitlines() if value in line)
    assert grounded(content_terms(answer, asked), [quote], content_terms(asked))
    # and the eval runner's record takes `grounded` from that judgement (the hits keep the suite's question)
    from types import SimpleNamespace

    from starqa.eval import runner as runner_module

    calls = []

    def fake_evidence(view, parts, prediction, question):
        calls.append((question, prediction))
        return Evidence(grounded=question == asked)

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner_module, "evidence_for_answer", fake_evidence)
        judged, _, _ = runner_module._attribution(SimpleNamespace(tokenizer=None), case, [], 0, [],
                                                  SimpleNamespace(stacked=lambda: None), answer)
    # judged on the answer a user reads: the echo of the answer prefix (and an "Answer:" label before it) left out
    assert judged.grounded and calls == [(case.question, answer), (asked, f": {value}.")]
    calls.clear()
    with _pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner_module, "evidence_for_answer", fake_evidence)
        runner_module._attribution(SimpleNamespace(tokenizer=None), case, [], 0, [],
                                   SimpleNamespace(stacked=lambda: None), "Answer: " + answer)
    assert calls[-1] == (asked, f": {value}.")


def test_a_hybrid_ask_is_counted_for_its_star_batch_and_the_documents_full_attention_kv():
    import types

    import torch

    from starqa.config import load_settings
    from starqa.serve import limits

    engine = types.SimpleNamespace(num_layers=30, kv_heads=3, head_dim=64, dtype=torch.bfloat16)
    per_token = limits.kv_bytes_per_token(engine)
    settings = load_settings(None, max_new_tokens=100)
    questions = tuple(f"Question number {n}?" for n in range(8))
    star = limits.decode_bytes(engine, settings, questions, "star", 5000)
    full = limits.decode_bytes(engine, settings, questions[:1], "full", 5000)
    # the escalated questions (up to a batch) are decoded together over the document's full-attention KV
    assert limits.decode_bytes(engine, settings, questions, "hybrid", 5000) == per_token * 5000 + star > full
    assert full == per_token * 5000 + star // 8  # one question: the document's KV and one row
