"""`--escalate-to MODEL`: hybrid answering's second pass goes to another (larger) model, which answers from its own
stored copy of the document (`NAME@MODEL`, stored on first need from the primary's stored text), and the output
names the model that answered (starqa.answer.escalation).

Two tiny random-weight models with the same tokenizer play the document's model and the "larger" one (another seed,
one more layer). As in tests/test_hybrid.py, whether a Star answer is grounded is set by the test
(starqa.answer.passes.answer_evidence patched), and every Star batch and full-attention pass is logged with the model that ran
it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clihelp import json_lines
from conftest import tiny_model
from starqa import cli
from test_hybrid import DOCUMENT, QUESTIONS, UNGROUNDED, control_passes, stored  # noqa: F401 (stored: a fixture)


@pytest.fixture(scope="session")
def larger_model_dir(tmp_path_factory, bundled_tokenizer):
    """The escalation target: another tiny random Llama (other weights, three layers), same tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-larger")
    tiny_model("llama", seed=1, num_hidden_layers=3).save_pretrained(directory)
    bundled_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def controlled(monkeypatch):
    """Grounded as UNGROUNDED says (for every model), and a log of (pass, model, questions)."""
    calls = []
    control_passes(monkeypatch, lambda kind, engine, questions: calls.append((kind, engine.model_name, questions)))
    return calls


def _ask(capsys, model, *args, doc="terms") -> tuple[int, str, str]:
    code = cli.main(["ask", "--doc", doc, "--model", str(model), "--max-new-tokens", "6", "--no-server", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _copy_name(home, model) -> str:
    names = [path.name for path in (home / "documents").iterdir() if path.name.startswith("terms@")]
    assert len(names) <= 1
    return names[0] if names else None


def test_ungrounded_answers_are_answered_again_by_the_larger_model_from_its_own_stored_copy(
        stored, controlled, capsys, home, tiny_model_dir, larger_model_dir):
    from starqa.answer.escalation import TARGET_ATTENTION

    primary = (home / "documents" / "terms").resolve()
    primary_files = {path.name: path.read_bytes() for path in primary.rglob("*") if path.is_file()}
    questions = str(stored / "questions.txt")
    code, out, err = _ask(capsys, tiny_model_dir, "--questions", questions, "--json", "--attention", "hybrid",
                          "--escalate-to", str(larger_model_dir))
    assert code == 0, err
    rows = json_lines(out)
    small, large = str(tiny_model_dir.resolve()), str(larger_model_dir.resolve())
    ungrounded = [q for q in QUESTIONS if q in UNGROUNDED]
    # one Star batch with the document's model, then the larger model on exactly the ungrounded ones, together
    assert controlled[0] == ("star", small, QUESTIONS)
    if TARGET_ATTENTION == "star":
        assert controlled[1:] == [("star", large, ungrounded)]
    else:
        assert controlled[1:] == [("full", large, ungrounded)]
    copy = _copy_name(home, larger_model_dir)
    assert copy is not None and copy.startswith("terms@tiny-larger")
    assert [row["question"] for row in rows] == QUESTIONS and {row["doc"] for row in rows} == {"terms"}
    escalated = {row["question"]: row for row in rows if row["hybrid"]["escalated"]}
    assert set(escalated) == UNGROUNDED
    for row in escalated.values():
        assert row["attention"] == TARGET_ATTENTION
        assert row["hybrid"]["escalated_to"] == large and row["hybrid"]["escalated_doc"] == copy
        assert row["hybrid"]["reason"] == "not grounded" and row["hybrid"]["star_answer"] is not None
        assert row["ttft_s"] >= row["hybrid"]["star_s"]
    assert "escalated_phase1_s" in escalated[ungrounded[0]]["hybrid"]  # this ask stored the copy
    for row in rows:
        if not row["hybrid"]["escalated"]:
            assert row["attention"] == "star" and row["hybrid"] == {"escalated": False, "star_answer": None,
                                                                     "reason": None}
    # The answers returned are the larger model's own: what it answers from its copy when asked directly.
    controlled.clear()
    code, out, _ = _ask(capsys, larger_model_dir, "--questions", _write(stored, ungrounded), "--json",
                        "--attention", TARGET_ATTENTION, doc=copy)
    theirs = {row["question"]: row["answer"] for row in json_lines(out)}
    assert code == 0 and {q: escalated[q]["answer"] for q in ungrounded} == theirs
    code, out, _ = _ask(capsys, tiny_model_dir, "--questions", _write(stored, ungrounded), "--json",
                        "--attention", "full")
    assert {row["question"]: row["answer"] for row in json_lines(out)} != theirs  # not the small model's full pass
    # The primary document is untouched; the copy holds its text and pages and is the larger model's.
    assert (home / "documents" / "terms").resolve() == primary
    assert {path.name: path.read_bytes() for path in primary.rglob("*") if path.is_file()} == primary_files
    stored_copy = home / "documents" / copy
    assert (stored_copy / "text.txt").read_bytes() == primary_files["text.txt"]
    assert (stored_copy / "pages.json").read_bytes() == primary_files["pages.json"]
    assert json.loads((stored_copy / "manifest.json").read_text())["model"] == large


def test_the_larger_models_pass_runs_the_per_token_check_as_the_first_pass_does(stored, monkeypatch, capsys,
                                                                                 tiny_model_dir, larger_model_dir):
    # A server passes `each_token` (its client-still-there check) into ask; the escalated pass must run it too, or
    # a client that went away would keep the larger model decoding.
    from starqa.answer import ask as asking
    from starqa.errors import StarqaError

    large = str(larger_model_dir.resolve())
    passes_run = []
    control_passes(monkeypatch, lambda kind, engine, questions: passes_run.append(engine.model_name))

    def check():
        if large in passes_run:
            raise StarqaError("the client went away")

    real_run = asking.run
    monkeypatch.setattr(asking, "run", lambda *args, **kwargs: real_run(*args, **dict(kwargs, each_token=check)))
    code, _, err = _ask(capsys, tiny_model_dir, "--questions", str(stored / "questions.txt"), "--json",
                        "--attention", "hybrid", "--escalate-to", str(larger_model_dir))
    assert passes_run[-1] == large and code == 1 and "the client went away" in err


def test_a_second_escalation_reuses_the_stored_copy(stored, controlled, capsys, home, tiny_model_dir,
                                                     larger_model_dir):
    args = ("--questions", str(stored / "questions.txt"), "--json", "--attention", "hybrid", "--escalate-to",
            str(larger_model_dir))
    code, first, _ = _ask(capsys, tiny_model_dir, *args)
    copy = (home / "documents" / _copy_name(home, larger_model_dir)).resolve()
    code, again, err = _ask(capsys, tiny_model_dir, *args)
    assert code == 0 and (home / "documents" / _copy_name(home, larger_model_dir)).resolve() == copy
    assert "storing" not in err
    rows = json_lines(again)
    assert [row["answer"] for row in rows] == [row["answer"] for row in json_lines(first)]
    assert not any("escalated_phase1_s" in row["hybrid"] for row in rows)


def _write(folder, questions) -> str:
    path = folder / "asked.txt"
    path.write_text("\n".join(questions) + "\n")
    return str(path)


def test_text_mode_names_the_model_that_answered_again(stored, controlled, capsys, tiny_model_dir,
                                                      larger_model_dir):
    code, out, err = _ask(capsys, tiny_model_dir, "--questions", str(stored / "questions.txt"), "--attention",
                          "hybrid", "--escalate-to", str(larger_model_dir))
    assert code == 0
    large = str(larger_model_dir.resolve())
    assert err.count(f"answered again with {large}: not grounded") == len(UNGROUNDED)
    assert "answered again with full attention" not in err and f"answered again ({large})" in err


def test_a_grounded_answer_loads_no_second_model_and_stores_no_copy(stored, controlled, capsys, home,
                                                                    tiny_model_dir, larger_model_dir):
    code, out, err = _ask(capsys, tiny_model_dir, QUESTIONS[0], "--attention", "hybrid", "--json",
                          "--escalate-to", str(larger_model_dir))
    assert code == 0 and [call[0] for call in controlled] == ["star"]
    assert json_lines(out)[0]["attention"] == "star" and "answered again with" not in err
    assert f"answered again ({larger_model_dir.resolve()})" in err and "0 of 1" in err
    assert f"loading model {larger_model_dir.resolve()}" not in err and _copy_name(home, larger_model_dir) is None


def test_batches_escalate_their_own_ungrounded_answers_to_the_larger_model(stored, controlled, capsys,
                                                                          tiny_model_dir, larger_model_dir):
    from starqa.answer.escalation import TARGET_ATTENTION

    code, out, err = _ask(capsys, tiny_model_dir, "--questions", str(stored / "questions.txt"), "--attention",
                          "hybrid", "--json", "--batch-size", "2", "--escalate-to", str(larger_model_dir))
    assert code == 0, err
    small, large = str(tiny_model_dir.resolve()), str(larger_model_dir.resolve())
    assert controlled == [("star", small, QUESTIONS[:2]), (TARGET_ATTENTION, large, [QUESTIONS[1]]),
                          ("star", small, QUESTIONS[2:]), (TARGET_ATTENTION, large, [QUESTIONS[3]])]
    assert err.count(f"loading model {large}") == 1 and err.count("storing 'terms'") == 1  # loaded, stored once
    assert [row["hybrid"].get("escalated_to") for row in json_lines(out)] == [None, large, None, large]


def test_escalating_to_the_documents_own_model_is_full_attention(stored, controlled, capsys, tiny_model_dir,
                                                                 home):
    code, out, err = _ask(capsys, tiny_model_dir, "--questions", str(stored / "questions.txt"), "--json",
                          "--attention", "hybrid", "--escalate-to", str(tiny_model_dir))
    assert code == 0, err
    small = str(tiny_model_dir.resolve())
    assert controlled == [("star", small, QUESTIONS), ("full", small, [q for q in QUESTIONS if q in UNGROUNDED])]
    assert {row["hybrid"].get("escalated_to") for row in json_lines(out)} == {None, "full"}
    assert _copy_name(home, tiny_model_dir) is None


@pytest.mark.parametrize("args, words", [
    (("--attention", "hybrid", "--escalate-to", "no-such-model"), "unknown model 'no-such-model'"),
    (("--attention", "hybrid", "--escalate-to", "qwen-missing.gguf"), "model file not found"),
    (("--attention", "star", "--escalate-to", "full"), "--escalate-to applies to --attention hybrid"),
])
def test_bad_escalation_targets_are_one_line_and_exit_2_before_any_work(stored, capsys, tiny_model_dir, args,
                                                                        words, monkeypatch):
    from starqa.engine import star_engine as engine_module

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(engine_module.StarEngine, "load", classmethod(no_load))
    code, out, err = _ask(capsys, tiny_model_dir, QUESTIONS[0], *args)
    assert code == 2 and err.count("\n") == 1 and words in err, err


def test_a_catalogue_model_that_is_not_installed_is_one_line_and_exit_2(stored, capsys, tiny_model_dir,
                                                                       monkeypatch):
    from starqa.model import catalogue
    from starqa.errors import UsageError

    def missing(model):
        raise UsageError(f"model '{model.name}' is not installed: part 1 missing; install it with pip")

    monkeypatch.setattr(catalogue, "part_paths", missing)
    monkeypatch.setattr(catalogue, "source_file", lambda model, root: root / "absent.gguf")
    code, out, err = _ask(capsys, tiny_model_dir, QUESTIONS[0], "--attention", "hybrid", "--escalate-to",
                          "qwen2.5-coder-1.5b")
    assert code == 2 and err.count("\n") == 1 and "is not installed" in err


def test_the_config_key_sets_the_target_and_the_flag_wins(stored, controlled, capsys, tmp_path, tiny_model_dir,
                                                         larger_model_dir):
    config = tmp_path / "escalate.yaml"
    config.write_text(f"escalate_to: {larger_model_dir}\n")
    code, out, err = _ask(capsys, tiny_model_dir, QUESTIONS[1], "--attention", "hybrid", "--json", "--config",
                          str(config))
    assert code == 0 and json_lines(out)[0]["hybrid"]["escalated_to"] == str(larger_model_dir.resolve())
    code, out, err = _ask(capsys, tiny_model_dir, QUESTIONS[1], "--attention", "hybrid", "--json", "--config",
                          str(config), "--escalate-to", "full")
    assert code == 0 and json_lines(out)[0]["hybrid"]["escalated_to"] == "full"


# ------------------------------------------------------------------------------------------------ the server


def test_a_server_refuses_a_model_as_escalation_target_with_400():
    from starqa.config import load_settings
    from starqa.serve.protocol import RequestError, parse_ask, parse_chat

    base = load_settings(None)
    assert parse_ask({"doc": "terms", "question": "Q?", "attention": "hybrid", "escalate_to": "full"}, base,
                     False).attention == "hybrid"
    for parse, body in ((parse_ask, {"doc": "terms", "question": "Q?", "attention": "hybrid"}),
                        (parse_chat, {"model": "terms", "attention": "hybrid",
                                      "messages": [{"role": "user", "content": "Q?"}]})):
        with pytest.raises(RequestError) as refused:
            parse(dict(body, escalate_to="qwen2.5-coder-1.5b"), base, False)
        assert refused.value.status == 400 and "escalate_to must be full on a starqa server" in refused.value.message
        assert "--escalate-to MODEL" in refused.value.message


def test_a_cli_ask_escalating_to_a_model_answers_in_its_own_process_when_a_server_runs(tmp_path, monkeypatch,
                                                                                       capsys):
    from starqa.config import load_settings
    from starqa.serve import client

    monkeypatch.setattr(client, "_is_socket", lambda path: True)
    monkeypatch.setattr(client, "_send", lambda *a, **k: pytest.fail("sent to the server"))
    settings = load_settings(None, store=str(tmp_path), escalate_to="qwen2.5-coder-1.5b")
    assert client.ask(settings, print, docs=["terms"], all_documents=False, questions=["Q?"], attention="hybrid",
                      stream=False, model=None, block_size=None, anchor_size=None, trust_remote_code=False,
                      ingest_flags=False, debug=False) is None
    assert "does not escalate to another model" in capsys.readouterr().err
    sent = []
    monkeypatch.setattr(client, "_send", lambda path, body, *a: sent.append(body) or 0)
    assert client.ask(dataclass_replace(settings, escalate_to="full"), print, docs=["terms"], all_documents=False,
                      questions=["Q?"], attention="hybrid", stream=False, model=None, block_size=None,
                      anchor_size=None, trust_remote_code=False, ingest_flags=False, debug=False) == 0 and sent


def dataclass_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)


# ------------------------------------------------------------------------------------------------ eval


def _record(mode, model, score, index=0, grounded=None, **extra):
    record = {"task": "qa", "length": 100, "index": index, "mode": mode, "model": model,
              "block_size": 25 if mode == "star" else None, "anchor_size": 25 if mode == "star" else None,
              "score": score, "prediction": f"{model} {mode} answer", "phase1_s": 1.0 if mode == "star" else None,
              "prefill_s": 0.5, "ttft_s": 0.5, "decode_s": 1.0, "peak_rss_mb": 100.0, "new_tokens": 3,
              "decode_tokens_per_s": 2.0}
    if grounded is not None:
        record["grounded"] = grounded
    record.update(extra)
    return record


def test_eval_hybrid_rows_take_the_target_models_answer_of_the_same_case_and_name_it():
    from starqa.answer.escalation import TARGET_ATTENTION, with_escalation
    from starqa.eval import summary

    records, target = [], []
    for index, (grounded, small_star, small_full, large) in enumerate([(True, 1.0, 1.0, 0.0), (False, 0.0, 0.0, 1.0),
                                                                       (False, 0.0, 1.0, 1.0), (True, 0.0, 1.0, 1.0)]):
        records += [_record("full", "small", small_full, index), _record("star", "small", small_star, index,
                                                                         grounded=grounded)]
        # the target's record of the same case (its tokenizer counts another length for a document's case)
        target.append(_record(TARGET_ATTENTION, "large", large, index, length=120))
    composed = with_escalation(records, target, "large")
    hybrid = [r for r in composed if r["mode"] == "hybrid"]
    assert [r["prediction"] for r in hybrid] == ["small star answer", f"large {TARGET_ATTENTION} answer",
                                                 f"large {TARGET_ATTENTION} answer", "small star answer"]
    assert [r["escalated_to"] for r in hybrid] == ["large"] * 4 and hybrid[1]["answer_s"] == 3.0
    rows, _ = summary.summarize(composed)
    row = next(row for row in rows if row["mode"] == "hybrid")
    assert (row["accuracy"], row["escalated"], row["escalated_to"]) == (75.0, 50.0, "large")
    assert summary.mode_label(row) == "hybrid→large 25/25" and row["delta"] == 0.0  # vs the small model's full: 75 %
    assert summary.mode_label(next(row for row in rows if row["mode"] == "star")) == "star 25/25"


def test_eval_escalate_to_is_checked_before_anything_runs(home, capsys, tmp_path, monkeypatch):
    from starqa.eval import command

    monkeypatch.setattr(command, "_load_engine", lambda *a: pytest.fail("a model was loaded"))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Q?", "answers": ["A"]}) + "\n")
    doc = tmp_path / "d.txt"
    doc.write_text("A text.")
    code = cli.main(["eval", "--doc", str(doc), "--qa", str(qa), "--escalate-to", "no-such-model"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown model 'no-such-model'" in err
    code = cli.main(["eval", "--doc", str(doc), "--qa", str(qa), "--attention", "star,full", "--escalate-to",
                     "no-such-model"])
    err = capsys.readouterr().err
    assert code == 2 and "--escalate-to applies to --attention hybrid" in err


def test_eval_escalate_to_runs_the_target_on_the_same_cases_and_reports_a_hybrid_row_naming_it(
        home, capsys, tmp_path, monkeypatch, bundled_tokenizer, larger_model_dir):
    from starqa.engine.star_engine import StarEngine
    from starqa.answer.escalation import TARGET_ATTENTION
    from starqa.eval import command

    large = str(larger_model_dir.resolve())
    engines = {None: StarEngine(tiny_model(), bundled_tokenizer, model_name="tiny-llama"),
               large: StarEngine(tiny_model("llama", seed=1, num_hidden_layers=3), bundled_tokenizer,
                                 model_name=large)}
    loaded = []
    monkeypatch.setattr(command, "_load_engine", lambda settings, model, trust: loaded.append(model) or engines[model])
    document = tmp_path / "terms.txt"
    document.write_text(DOCUMENT)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answers": ["4,200"]}) + "\n" for q in QUESTIONS[:2]))
    log = tmp_path / "cases.jsonl"
    code = cli.main(["eval", "--doc", str(document), "--qa", str(qa), "--max-new-tokens", "3", "--json", "--quiet",
                     "--escalate-to", str(larger_model_dir), "--resume", str(log)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and loaded == [None, large]
    hybrid = [row for row in report["results"] if row["mode"] == "hybrid"]
    assert len(hybrid) == 1 and hybrid[0]["escalated_to"] == large and hybrid[0]["samples"] == 2
    # the target's records: its own log, only the mode it answers with, one per case
    target_log = tmp_path / f"cases@{Path(large).name}-{__import__('hashlib').sha256(large.encode()).hexdigest()[:8]}.jsonl"
    target = [json.loads(line) for line in target_log.read_text().splitlines()]
    assert [(r["mode"], r["model"]) for r in target] == [(TARGET_ATTENTION, large)] * 2
    assert {r["model"] for r in map(json.loads, log.read_text().splitlines())} == {"tiny-llama"}
