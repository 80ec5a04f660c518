"""The PoC report (`starqa eval --doc FILE --qa QA --models A,B --attention star,full,hybrid --report poc.md`): every
model x mode in its own process, the report's rows and answers, --resume, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import os
import sys

import pytest

from starqa import cli
from starqa.eval import poc_report
from test_escalation import larger_model_dir  # noqa: F401 (a fixture: the escalation target)

DOCUMENT = ("Clause 1. The supplier delivers the reports every Tuesday.\n\n"
            "Clause 2. Either party may end this agreement with ninety days of written notice.\n\n"
            "Clause 3. The fee is 4,200 euros per month, payable within thirty days.\n\n") * 3
QA = [{"question": "What is the fee?", "answers": ["4,200 euros"]},
      {"question": "How much notice is needed?", "answers": ["ninety days"]}]


@pytest.fixture
def poc_files(tmp_path):
    (tmp_path / "terms.txt").write_text(DOCUMENT)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(item) + "\n" for item in QA))
    return tmp_path


def _eval(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_each_run_reports_its_own_processs_peak_memory(tmp_path):
    (tmp_path / "peak_big.py").write_text("x = bytearray(300 * 2**20)\nx[::4096] = b'1' * len(x[::4096])\n")
    (tmp_path / "peak_small.py").write_text("")
    (tmp_path / "peak_argv.py").write_text("import sys\nprint(sys.argv[1:])\nraise SystemExit(3)\n")
    environment = dict(os.environ, PYTHONPATH=str(tmp_path))
    *_, big_peak = poc_report.run_process(["-m", "peak_big"], environment)
    *_, small_peak = poc_report.run_process(["-m", "peak_small"], environment)  # an inherited mark: 300+ MiB
    assert big_peak > 300 and small_peak < 100, (big_peak, small_peak)
    code, out, _, _, _ = poc_report.run_process(["-m", "peak_argv", "a"], environment)
    assert (code, out) == (3, "['a']\n")


@pytest.mark.slow
def test_the_report_has_a_row_per_model_and_mode_and_the_answers_side_by_side(home, poc_files, capsys,
                                                                               tiny_model_dir):
    report_md, log = poc_files / "poc.md", poc_files / "runs.jsonl"
    args = ["--doc", str(poc_files / "terms.txt"), "--qa", str(poc_files / "qa.jsonl"), "--models",
            str(tiny_model_dir), "--attention", "star,full,hybrid", "--report", str(report_md), "--json",
            "--max-new-tokens", "4", "--dtype", "float32", "--block-size", "48", "--resume", str(log)]
    code, out, err = _eval(capsys, *args)
    assert code == 0, err
    document = json.loads(out)
    rows = document["rows"]
    assert [(row["mode"], row["questions"]) for row in rows] == [("star", 2), ("full", 2), ("hybrid", 2)]
    for row in rows:
        assert 0 <= row["accuracy"] <= 100 and row["peak_rss_mb"] > 100 and row["answer_s"] > 0
        assert (row["phase1_s"] is None) == (row["kv_bytes"] is None) == (row["mode"] == "full")
        assert row["decode_tokens_per_s"] >= 0 and 0 <= row["grounded"] <= 100
    assert rows[1]["delta_vs_full"] is None and rows[0]["delta_vs_full"] is not None
    assert rows[2]["escalated"] is not None and rows[0]["escalated"] is None
    # the process peaks are separate measurements: full attention's process never loaded the stored KV
    assert len({row["peak_rss_mb"] for row in rows}) >= 1 and all(row["peak_rss_mb"] for row in rows)
    assert [item["question"] for item in document["questions"]] == [item["question"] for item in QA]
    assert all(len(item["by_run"]) == 3 for item in document["questions"])
    assert document["machine"]["versions"]["torch"] and document["machine"]["cores"]
    text = report_md.read_text()
    assert text.count("| star |") + text.count("| hybrid") >= 2 and "## Answers side by side" in text
    assert "What is the fee?" in text and "## Machine" in text
    assert len(log.read_text().splitlines()) == 3

    # --resume: nothing runs again; the same rows come back
    html_path = poc_files / "poc.html"
    code, out, err = _eval(capsys, *[str(html_path) if arg == str(report_md) else arg for arg in args])
    assert code == 0 and err.count("not run again") == 3 and "asking" not in err
    assert json.loads(out)["rows"] == rows
    assert html_path.read_text().startswith("<!doctype html>") and "What is the fee?" in html_path.read_text()


@pytest.mark.slow
def test_escalate_to_a_model_adds_a_hybrid_row_answered_again_by_that_model(home, poc_files, capsys, tiny_model_dir,
                                                                           larger_model_dir):
    args = ["--doc", str(poc_files / "terms.txt"), "--qa", str(poc_files / "qa.jsonl"), "--models",
            str(tiny_model_dir), "--attention", "hybrid", "--escalate-to", str(larger_model_dir), "--json",
            "--report", str(poc_files / "poc.md"), "--max-new-tokens", "4", "--dtype", "float32",
            "--block-size", "48"]
    code, out, err = _eval(capsys, *args)
    assert code == 0, err
    document = json.loads(out)
    hybrid, cascade = document["rows"]
    label = f"hybrid→{larger_model_dir.name}"
    assert (hybrid["mode"], cascade["mode"]) == ("hybrid", label) and document["modes"] == ["hybrid", label]
    # the same Star pass decides in both rows (greedy decoding, one model); what answers again differs
    assert cascade["escalated"] == hybrid["escalated"] and cascade["grounded"] <= 100
    for item in document["questions"]:
        plain, escalated = item["by_run"]
        assert plain["escalated"] == escalated["escalated"]
        if escalated["escalated"]:
            assert plain["escalated_to"] == "full" and escalated["escalated_to"] == str(larger_model_dir.resolve())
    # the target's copy was stored ahead of time, in its own process: its Phase 1 and KV count in the row
    copies = [path.name for path in (home / "documents").iterdir() if "@" in path.name]
    assert len(copies) == 1 and copies[0].startswith("terms-poc-")
    assert cascade["phase1_s"] > hybrid["phase1_s"] > 0 and cascade["kv_bytes"] > hybrid["kv_bytes"]
    assert f"| {label} |" in (poc_files / "poc.md").read_text()
    assert err.count("ingesting terms.txt") == 2


@pytest.mark.parametrize("change, message", [
    (("--attention", "star,mixed"), "--attention takes star, full and/or hybrid"),
    (("--models", "no-such-model"), "model 'no-such-model' is not installed"),
    (("--report", "poc.pdf"), "--report writes .html or .md files"),
    (("--qa", "empty.jsonl"), "holds no questions"),
    (("--qa", "no-answer.jsonl"), "line 2 needs \"answers\""),
    (("--suite", "ruler"), "takes --doc FILE --qa QA.jsonl; not --suite"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything_runs(home, poc_files, capsys, tiny_model_dir, change,
                                                               message, monkeypatch):
    (poc_files / "empty.jsonl").write_text("\n")
    (poc_files / "no-answer.jsonl").write_text(json.dumps(QA[0]) + "\n" + json.dumps({"question": "Who?"}) + "\n")
    ran = []
    monkeypatch.setattr(poc_report, "run_process", lambda *a, **k: ran.append(a))
    options = {"--doc": str(poc_files / "terms.txt"), "--qa": str(poc_files / "qa.jsonl"),
               "--models": str(tiny_model_dir), "--report": str(poc_files / "poc.md")}
    flag, value = change
    options[flag] = value if "/" in value or flag not in ("--qa", "--report") else str(poc_files / value)
    args = [item for pair in options.items() for item in pair]
    code, out, err = _eval(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not ran and not (poc_files / "poc.md").exists()


def test_a_child_that_fails_is_one_error_naming_the_step_and_its_last_line(monkeypatch, tmp_path):
    from starqa.config import load_settings
    from starqa.errors import StarqaError

    monkeypatch.setattr(poc_report, "run_process",
                        lambda *a, **k: (1, "", "loading\nstarqa: error: the model is damaged\n", 0.1, 10.0))
    with pytest.raises(StarqaError, match=r"^tiny: ingest failed: the model is damaged$"):
        poc_report._ingest("tiny", tmp_path / "terms.txt", load_settings(), {})
