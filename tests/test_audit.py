"""The audit log (starqa.governance.audit): a hash chain of JSON lines under the store, one file per month. Writers are tested
in processes without a model (8 concurrent writers, a writer SIGKILLed mid-append); `verify` must name an edited, a
removed and a reordered record; prune keeps what remains verifiable; one real CLI ask per level records the exact
document version that answered, and `eval` records nothing."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clihelp import REPO, json_lines, starqa
from starqa.governance import audit

DEC = 1796633153.0  # 2026-12-07 08:45:53 UTC
NOV = DEC - 30 * 86400  # 2026-11-07


def _records(n: int, start: int = 0, when: float = DEC) -> list[dict]:
    return [{"time": audit.utc_time(when), "doc": f"doc-{start + i}", "who": {"user": "tester"}, "exit_code": 0}
            for i in range(n)]


def _lines(root: Path) -> list[bytes]:
    return [line for path in audit.log_files(audit.audit_dir(root)) for line in path.read_bytes().splitlines()]


def _rewrite(root: Path, lines: list[bytes]) -> None:
    """Put `lines` back into the (single) month file, as someone editing it by hand would."""
    (path,) = audit.log_files(audit.audit_dir(root))
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_records_chain_across_month_files_in_a_private_folder(tmp_path):
    audit.append(tmp_path, _records(3, when=NOV), now=NOV)
    audit.append(tmp_path, _records(2, 3), now=DEC)
    folder = audit.audit_dir(tmp_path)
    files = audit.log_files(folder)
    assert [path.name for path in files] == ["2026-11.jsonl", "2026-12.jsonl"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)
    november, december = (path.read_bytes().splitlines() for path in files)
    assert json.loads(november[0])["prev"] == audit.GENESIS
    assert json.loads(december[0])["prev"] == audit.line_hash(november[-1])  # the month before's last record
    assert [json.loads(line)["seq"] for line in november + december] == [1, 2, 3, 4, 5]
    verdict = audit.verify(tmp_path)
    assert verdict.breaks == [] and verdict.records == 5 and verdict.head == audit.line_hash(december[-1])


def _break_lines(root: Path) -> tuple[int, list[str]]:
    result = starqa("audit", "verify", home=root, timeout=60)
    assert "Traceback" not in result.stderr
    return result.returncode, result.stdout.splitlines()


def test_verify_names_an_edited_a_removed_and_a_reordered_record(tmp_path):
    root = tmp_path / "home"
    audit.append(root, _records(6), now=DEC)
    original = _lines(root)
    assert _break_lines(root) == (0, [])

    edited = list(original)
    edited[2] = edited[2].replace(b'"doc-2"', b'"doc-X"')  # line 3 edited: line 4 no longer chains onto it
    _rewrite(root, edited)
    assert _break_lines(root) == (1, ["2026-12.jsonl:4: does not chain onto 2026-12.jsonl:3 (one of them was "
                                      "edited)"])

    _rewrite(root, original[:2] + original[3:])  # seq 3 removed
    assert _break_lines(root) == (1, ["2026-12.jsonl:3: seq 3 missing before it (records were removed)"])

    _rewrite(root, [original[0], original[2], original[1], *original[3:]])  # seq 2 and 3 swapped
    code, lines = _break_lines(root)
    assert code == 1 and lines and all("out of order" in line for line in lines)
    assert lines[0].startswith("2026-12.jsonl:2: out of order")

    _rewrite(root, original)
    assert _break_lines(root) == (0, [])


def test_an_unreadable_line_and_a_reordered_month_are_breaks_too(tmp_path):
    audit.append(tmp_path, _records(2, when=NOV), now=NOV)
    audit.append(tmp_path, _records(2, 2), now=DEC)
    november, december = audit.log_files(audit.audit_dir(tmp_path))
    lines = november.read_bytes().splitlines()
    november.write_bytes(lines[0] + b"\n" + b"{not json\n")
    verdict = audit.verify(tmp_path)
    assert verdict.breaks[0] == "2026-11.jsonl:2: not a JSON record (edited or damaged)"
    assert len(verdict.breaks) == 2  # and December's first record no longer chains onto it
    november.unlink()  # a whole month removed
    assert audit.verify(tmp_path).breaks == ["2026-12.jsonl:1: seq 1 to 2 missing before it (records were removed)"]


_WRITER = """
import sys, random
from starqa.governance import audit
root, writer, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for n in range(count):
    pad = "x" * random.randint(0, 3000)  # records of different lengths: a torn or mixed line would show
    audit.append(root, [{"time": "t", "writer": writer, "n": n, "pad": pad}])
"""


@pytest.mark.slow
def test_eight_concurrent_writers_never_tear_or_interleave_a_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(w), "50"], env=env, cwd=REPO)
               for w in range(8)]
    assert [writer.wait(300) for writer in writers] == [0] * 8
    lines = _lines(tmp_path)
    assert len(lines) == 400
    records = [json.loads(line) for line in lines]  # every line is one whole record
    for w in range(8):  # each writer's records, all there, in its order
        assert [r["n"] for r in records if r["writer"] == w] == list(range(50))
    assert [r["seq"] for r in records] == list(range(1, 401))
    verdict = audit.verify(tmp_path)
    assert verdict.breaks == [] and verdict.notes == [] and verdict.records == 400


@pytest.mark.slow
def test_a_writer_killed_mid_append_costs_its_record_only(tmp_path):
    audit.append(tmp_path, _records(2), now=time.time())
    mark = tmp_path / "paused"
    env = dict(os.environ, PYTHONPATH=str(REPO), STARQA_TEST_AUDIT_PAUSE="mid-append", STARQA_TEST_AUDIT_MARK=str(mark))
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), "9", "1"], env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer did not reach mid-append"
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    (path,) = audit.log_files(audit.audit_dir(tmp_path))
    assert not path.read_bytes().endswith(b"\n")  # a torn last line
    verdict = audit.verify(tmp_path)
    assert verdict.breaks == [] and verdict.records == 2 and "torn last line" in verdict.notes[0]
    written = audit.append(tmp_path, _records(1, 2))  # the next writer cuts it off and says so
    assert written[0]["event"] == "repair" and written[0]["torn_bytes"] > 0
    lines = _lines(tmp_path)
    assert [json.loads(line).get("event") for line in lines] == [None, None, "repair", None]
    assert json.loads(lines[2])["prev"] == audit.line_hash(lines[1])  # never chained onto the torn bytes
    verdict = audit.verify(tmp_path)
    assert verdict.breaks == [] and verdict.records == 3 and "repair" in verdict.notes[0]


def _ask_events(level: str, root: Path) -> list[dict]:
    recorder = audit.AskRecorder(root, level, who={"user": "ann", "uid": 7}, via="cli",
                                 questions=["What is the fee?"], docs=["terms"], attention="star")
    version = {"object": "terms.abc123", "version": 2, "source_sha256": "f" * 64, "model": "tiny"}
    row = {"question": "What is the fee?", "answer": "4,200 euros", "attention": "star", "grounded": True,
           "evidence": [{"page": 3, "text": "4,200 euros"}], "sources": [{"pages": [3, 4], "block": 1}],
           "cache_hit": True, "context_tokens": 90, "query_tokens": 9, "answer_tokens": 5, "phase1_s": 0.0,
           "prefill_s": 0.01, "ttft_s": 0.02, "decode_tokens_per_s": 50.0}
    emitted = []
    emit = recorder.wrap(emitted.append)
    emit({"type": "answer", "doc": "terms", "question": 0, "answer": row, "text": " 4,200 euros", "lines": [],
          "version": version})
    return recorder.finish(0)


def test_metadata_records_hashes_and_lengths_full_the_texts(tmp_path):
    (meta,) = _ask_events("metadata", tmp_path / "a")
    assert meta["question_sha256"] == audit.sha256_text("What is the fee?") and meta["question_chars"] == 16
    assert meta["answer_sha256"] == audit.sha256_text("4,200 euros") and meta["answer_chars"] == 11
    assert "question" not in meta and "answer" not in meta
    assert "What is the fee" not in "".join(p.read_text() for p in audit.log_files(audit.audit_dir(tmp_path / "a")))
    assert (meta["object"], meta["version"], meta["source_sha256"], meta["model"]) == ("terms.abc123", 2, "f" * 64,
                                                                                      "tiny")
    assert meta["pages"] == [3] and meta["source_pages"] == [3, 4] and meta["grounded"] is True
    assert meta["who"] == {"user": "ann", "uid": 7} and meta["exit_code"] == 0 and meta["level"] == "metadata"
    (full,) = _ask_events("full", tmp_path / "b")
    assert full["question"] == "What is the fee?" and full["answer"] == "4,200 euros"


def test_prune_drops_only_old_records_says_so_and_keeps_the_chain_verifiable(tmp_path):
    root = tmp_path / "home"
    audit.append(root, _records(3, when=NOV), now=NOV)
    audit.append(root, _records(2, 3), now=DEC)
    assert audit.verify(root).breaks == []
    export = tmp_path / "dropped.jsonl"
    pruned = audit.prune(root, older_than=DEC - 86400, export_to=export, now=DEC)
    assert (pruned.dropped, pruned.lines) == (3, 3)
    assert [json.loads(line)["doc"] for line in export.read_bytes().splitlines()] == ["doc-0", "doc-1", "doc-2"]
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    lines = _lines(root)
    anchor = json.loads(lines[0])
    assert anchor["event"] == "anchor" and anchor["dropped"] == 3 and [json.loads(l)["doc"] for l in lines[1:]] == [
        "doc-3", "doc-4"]
    verdict = audit.verify(root)
    assert verdict.breaks == [] and verdict.records == 2 and "anchor: 3 earlier records" in verdict.notes[0]
    audit.append(root, _records(1, 5), now=DEC + 60)  # writers go on after the anchor
    assert audit.verify(root).breaks == []
    # removing the first kept record is still caught
    lines = _lines(root)
    _rewrite(root, [lines[0], *lines[2:]])
    assert audit.verify(root).breaks == ["2026-12.jsonl:2: seq 4 missing before it (records were removed)"]


def test_export_writes_the_stored_lines_byte_for_byte(tmp_path):
    root = tmp_path / "home"
    audit.append(root, _records(2, when=NOV), now=NOV)
    audit.append(root, _records(2, 2), now=DEC)
    everything = starqa("audit", "export", home=root, timeout=60)
    assert everything.returncode == 0 and everything.stdout.encode() == b"".join(l + b"\n" for l in _lines(root))
    recent = starqa("audit", "export", "--since", "2026-12-01", "-o", str(tmp_path / "out.jsonl"), home=root,
                    timeout=60)
    assert recent.returncode == 0 and "exported 2 lines" in recent.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == b"".join(l + b"\n" for l in _lines(root)[2:])
    bad = starqa("audit", "export", "--since", "last tuesday", home=root, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "is not a date" in bad.stderr
    nothing = starqa("audit", "prune", home=root, timeout=60)  # no retention configured: says so, drops nothing
    assert nothing.returncode == 2 and "audit_retention_days is not set" in nothing.stderr
    assert len(_lines(root)) == 4


# ------------------------------------------------------------------------------------------------ real asks

DOCUMENT = ("Clause 1. The supplier delivers the reports every Tuesday.\n\n"
            "Clause 2. The fee is 4,200 euros per month, payable within thirty days.\n\n") * 3


@pytest.mark.slow
def test_cli_asks_are_recorded_at_each_level_with_the_version_that_answered(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    source = tmp_path / "terms.txt"
    source.write_text(DOCUMENT)
    model = ("--model", str(tiny_model_dir), "--dtype", "float32")
    assert starqa("ingest", source, "--block-size", "48", *model, home=home).returncode == 0
    asked = starqa("ask", "--doc", "terms", "What is the fee?", "--max-new-tokens", "4", "--json", *model, home=home)
    assert asked.returncode == 0, asked.stderr
    answer = json_lines(asked.stdout)[0]
    (record,) = audit.records(home)
    manifest_link = (home / "documents" / "terms").resolve()
    manifest = json.loads((manifest_link / "manifest.json").read_text())
    assert record["object"] == manifest_link.name and record["source_sha256"] == manifest["source"]["sha256"]
    assert record["version"] == manifest["version"] and record["model"] == str(tiny_model_dir)
    assert record["who"]["uid"] == os.getuid() and record["via"] == "cli" and record["exit_code"] == 0
    assert record["level"] == "metadata" and "question" not in record
    assert record["answer_sha256"] == audit.sha256_text(answer["answer"]) and record["attention"] == "star"
    assert record["grounded"] == answer["grounded"] and record["timings"]["wall_s"] > 0

    full = tmp_path / "full.yaml"
    full.write_text("audit: full\n")
    off = tmp_path / "off.yaml"
    off.write_text("audit: off\n")
    assert starqa("ask", "--doc", "terms", "When are reports delivered?", "--max-new-tokens", "3", "--config", full,
                  *model, home=home).returncode == 0
    assert starqa("ask", "--doc", "terms", "Unrecorded?", "--max-new-tokens", "3", "--config", off, *model,
                  home=home).returncode == 0
    refused = starqa("ask", "--doc", "nosuch", "Who?", *model, home=home)
    assert refused.returncode == 2
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "What is the fee?", "answers": ["4,200"]}) + "\n")
    evaluated = starqa("eval", "--doc", "terms", "--qa", qa, "--max-new-tokens", "2", *model, home=home)
    assert evaluated.returncode == 0, evaluated.stderr
    records = list(audit.records(home))
    assert len(records) == 3  # not the ask with audit: off, nor eval
    assert records[1]["question"] == "When are reports delivered?" and records[1]["level"] == "full"
    assert records[2]["doc"] == "nosuch" and records[2]["exit_code"] == 2 and "no document" in records[2]["error"]
    assert audit.verify(home).breaks == []

    listed = starqa("audit", "--doc", "ter*", "--json", home=home, timeout=60)
    assert [row["seq"] for row in json_lines(listed.stdout)] == [1, 2]
    by_user = starqa("audit", "--user", str(os.getuid()), home=home, timeout=60)
    assert len(by_user.stdout.splitlines()) == 3 and "terms@v1" in by_user.stdout
    assert starqa("audit", "--key", "nobody", home=home, timeout=60).stdout == ""
