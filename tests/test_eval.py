"""`starqa eval`: RULER-style case generation, RULER scoring, the runner, the report and --resume (fast: seconds)."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import typer

from conftest import tiny_model
from starqa.engine.star_engine import StarEngine
from starqa.errors import UsageError
from starqa import cli
from starqa.eval import command as eval_cli
from starqa.eval import summary
from starqa.eval.haystack import LengthError, largest_fitting
from starqa.eval.prompts import PromptBuilder
from starqa.eval.qa_file import QAPair, QASource, bundled_sample, load_qa_file, parse_qa_lines
from starqa.eval import runner as runner_module
from starqa.eval.runner import QUARTER, EvalRunner, ResultLog, SizeSpec, StarSpec, modes_for
from starqa.eval.scoring import score, string_match_all, string_match_part, without_answer_prefix
from starqa.eval.tasks import TASK_NAMES, TASKS, cwe_frequencies, generate_cases, spread_order

ROW_KEYS = {"task", "length", "mode", "block_size", "anchor_size", "samples", "accuracy", "retention", "phase1_s",
            "ttft_s", "decode_tokens_per_s", "peak_rss_mb", "speedup", "source_hit", "evidence_hit", "delta",
            "delta_ci95", "better", "worse", "answer_s", "escalated", "answer_ratio"}

SMALL_SOURCE = QASource(
    name="lease",
    text="\n\n".join(
        [f"Clause {n}. The tenant keeps the garden tidy and reports any damage to the landlord within a week."
         for n in range(1, 9)]
        + ["Clause 9. The monthly rent is 1,250 euros, payable on the first day of each month."]
        + [f"Clause {n}. The landlord repairs the heating system and the windows at their own cost."
           for n in range(10, 16)]),
    pairs=(QAPair("What is the monthly rent?", ("1,250 euros", "1250 euros")),
           QAPair("Who repairs the heating system?", ("the landlord",))),
)


@pytest.fixture(scope="module")
def prompts(bundled_tokenizer):
    return PromptBuilder(bundled_tokenizer)


@pytest.fixture(scope="module")
def tiny_engine(bundled_tokenizer):
    return StarEngine(tiny_model(), bundled_tokenizer, model_name="tiny-llama")


# ---------------------------------------------------------------- generators


@pytest.mark.parametrize("length", [512, 1024, 2048])
def test_every_task_hits_its_token_length(prompts, length):
    for task in TASK_NAMES:
        cases = generate_cases(task, length, 3, seed=0, count_tokens=prompts.count, qa_source=SMALL_SOURCE)
        for case in cases:
            context_ids, query_ids = prompts.context_ids(case.context_text), prompts.query_ids(case.question)
            total = len(context_ids) + len(query_ids)
            assert total == prompts.count(case.context_text, case.question)
            assert 0.98 * length <= total <= length, (task, length, total)


def test_generation_is_deterministic_and_seeded(prompts):
    for task in TASK_NAMES:
        first = generate_cases(task, 512, 2, seed=7, count_tokens=prompts.count, qa_source=SMALL_SOURCE)
        again = generate_cases(task, 512, 2, seed=7, count_tokens=prompts.count, qa_source=SMALL_SOURCE)
        other = generate_cases(task, 512, 2, seed=8, count_tokens=prompts.count, qa_source=SMALL_SOURCE)
        assert first == again
        assert [case.case_id for case in first] == [case.case_id for case in again]
        if task != "qa":  # qa's questions come from a fixed list; its padding still differs
            assert [case.answers for case in first] != [case.answers for case in other]
        assert [case.context_text for case in first] != [case.context_text for case in other]


def test_too_short_a_length_is_a_clear_error(prompts):
    with pytest.raises(LengthError, match="niah_multiquery cannot be built at 64 tokens"):
        generate_cases("niah_multiquery", 64, 1, seed=0, count_tokens=prompts.count)


@pytest.mark.parametrize("task", [name for name in TASK_NAMES if TASKS[name].family == "niah"])
def test_needles_are_in_the_haystack_and_asked_for(prompts, task):
    spec = TASKS[task]
    kind = spec.value_kind
    for case in generate_cases(task, 1024, 3, seed=1, count_tokens=prompts.count):
        assert case.context_text.startswith(f"Some special magic {kind} are hidden within the following text.")
        needles = re.findall(rf"One of the special magic {kind} for ([a-z]+-[a-z]+) is: ([0-9a-f-]+)\.",
                             case.context_text)
        assert len(needles) == max(spec.num_keys, spec.num_queries) * spec.num_values
        asked = re.search(rf"special magic {kind} for (.+?) mentioned", case.question).group(1)
        asked_keys = re.split(r", and |, ", asked)
        assert len(asked_keys) == spec.num_queries
        expected = [value for key, value in needles if key in asked_keys]
        assert sorted(case.answers) == sorted(expected)
        for answer in case.answers:
            assert case.context_text.count(answer) == 1
            assert (len(answer) == 7 and answer.isdigit()) if kind == "numbers" else len(answer) == 36
        assert case.metric == "all" and case.max_new_tokens == 128
        assert "Begin your answer with" in case.question


def test_noise_and_essay_haystacks(prompts):
    noise = generate_cases("niah_single_1", 512, 1, seed=0, count_tokens=prompts.count)[0]
    assert "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." in \
        noise.context_text
    essay = generate_cases("niah_single_2", 512, 1, seed=0, count_tokens=prompts.count)[0]
    assert "The grass is green" not in essay.context_text and len(set(essay.context_text.split())) > 100


def test_needle_depth_walks_through_the_context(prompts):
    cases = generate_cases("niah_single_2", 1024, 5, seed=0, count_tokens=prompts.count)
    assert [case.depth for case in cases] == [0.0, 0.25, 0.5, 0.75, 1.0]
    positions = [case.context_text.index(case.answers[0]) / len(case.context_text) for case in cases]
    assert positions == sorted(positions)
    assert positions[0] < 0.1 and positions[-1] > 0.9
    assert all(abs(position - case.depth) < 0.12 for position, case in zip(positions, cases))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 20])
def test_run_order_spreads_every_prefix_over_the_depths(n):
    order = spread_order(n)
    assert sorted(order) == list(range(n))
    if n >= 5:
        first = sorted(order[:5])
        assert first[0] == 0 and first[-1] == n - 1
        assert max(b - a for a, b in zip(first, first[1:])) <= -(-(n - 1) // 4)  # as even as whole indices allow


def test_variable_tracking_chain_resolves_to_the_answers(prompts):
    for case in generate_cases("vt", 1024, 3, seed=0, count_tokens=prompts.count):
        value = re.search(r"assigned the value (\d+) in the text above", case.question).group(1)
        statements = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", case.context_text)
        assert len(statements) == 5
        holding = {value}
        found = []
        for name, source in statements:  # the chain is written in order
            if source.removeprefix("VAR ") in holding:
                holding.add(name)
                found.append(name)
        assert sorted(found) == sorted(case.answers) and len(found) == 5
        assert "The grass is green." in case.context_text
        assert case.max_new_tokens == 30


@pytest.mark.parametrize("length", [512, 2048])
def test_common_words_are_the_most_frequent(prompts, length):
    for case in generate_cases("cwe", length, 2, seed=3, count_tokens=prompts.count):
        entries = re.findall(r"(\d+)\. ([a-z]+)", case.context_text)
        assert [int(number) for number, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(word for _, word in entries)
        top = {word for word, _ in counts.most_common(10)}
        assert top == set(case.answers) and len(case.answers) == 10
        weakest_common = min(counts[word] for word in case.answers)
        assert all(count < weakest_common for word, count in counts.items() if word not in case.answers)


def test_cwe_frequencies_follow_ruler_when_there_is_room():
    assert cwe_frequencies(2000, 800) == (30, 3)  # about what 8K tokens hold
    for items in (40, 100, 400, 900, 5000, 20000):
        common, other = cwe_frequencies(items, 800)
        assert common > other >= 1


def test_qa_cases_hold_their_answer(prompts):
    for length in (512, 1024):
        for case in generate_cases("qa", length, 4, seed=0, count_tokens=prompts.count, qa_source=SMALL_SOURCE):
            assert any(answer.lower() in case.context_text.lower() for answer in case.answers)
            assert case.context_text.count("Document 1:") == 1
            assert case.metric == "part" and case.max_new_tokens == 32


def test_bundled_sample_qa_when_present(prompts):
    source = bundled_sample()
    if source is None:
        pytest.skip("samples/contract.txt and samples/contract-qa.jsonl are not in this checkout")
    for case in generate_cases("qa", 2048, 4, seed=0, count_tokens=prompts.count, qa_source=source):
        assert any(answer.lower() in case.context_text.lower() for answer in case.answers)


def test_largest_fitting_finds_the_boundary():
    assert largest_fitting(lambda n: 10 + 3 * n, 100) == 30
    assert largest_fitting(lambda n: 10 + 3 * n, 100, maximum=12) == 12
    assert largest_fitting(lambda n: 10 + 3 * n, 10) == 0
    with pytest.raises(LengthError):
        largest_fitting(lambda n: 10 + 3 * n, 9)


def test_qa_file_parsing():
    pairs = parse_qa_lines(['{"question": "Q?", "answers": ["a", "b"]}', "", '{"question": "R?", "answer": "c"}'],
                           "qa.jsonl")
    assert pairs == [QAPair("Q?", ("a", "b")), QAPair("R?", ("c",))]
    with pytest.raises(UsageError, match="line 1"):
        parse_qa_lines(['{"question": "Q?", "answers": []}'], "qa.jsonl")
    with pytest.raises(UsageError, match="line 2 is not JSON"):
        parse_qa_lines(['{"question": "Q?", "answers": ["a"]}', "nope"], "qa.jsonl")


def test_qa_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes('{"question": "Q?", "answers": ["a"]}\n'.encode("utf-8-sig"))
    assert load_qa_file(path) == [QAPair("Q?", ("a",))]


# ---------------------------------------------------------------- scoring


def test_scoring_matches_ruler_definitions():
    # string_match_all: the mean over references of "reference in prediction", case-insensitive.
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("The numbers are 1234567.", ["1234567", "7654321"]) == 0.5
    assert string_match_all("Nothing here.", ["1234567", "7654321", "1111111", "2222222"]) == 0.0
    assert string_match_all("VAR abcde, fghij", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    # string_match_part: the max over references.
    assert string_match_part("It is ninety days.", ["90 days", "Ninety days"]) == 1.0
    assert string_match_part("It is sixty days.", ["90 days", "ninety days"]) == 0.0
    # score() cleans the prediction as RULER does (control characters become newlines) and picks the metric.
    assert score("all", "\tAnswer:\x0b1234567 \n", ["1234567"]) == 1.0
    assert score("part", "London", ["Paris", "london"]) == 1.0
    with pytest.raises(ValueError):
        score("exact", "a", ["a"])
    # RULER's answer prefix ends the prompt, so it is never in a prediction: a leading echo of it is not scored
    # ("appear" is in cwe's prefix; "pear" would otherwise score without being named).
    prefix = "Answer: The top 10 words that appear most often in the list are:"
    assert score("all", f'"{prefix} apple, plum"', ["pear", "plum"], prefix) == 0.5
    assert score("all", f"{prefix} apple, plum", ["pear", "plum"]) == 1.0  # without the prefix: RULER's plain rule
    assert score("all", "apple, pear", ["pear"], prefix) == 1.0
    # an "Answer:" label the model puts before the echo of a prefix that has none goes with the echo
    vt_prefix = "According to the chain(s) of variable assignment in the text above, 2 variables are assigned"
    assert without_answer_prefix(f"Answer: {vt_prefix} VAR ABCDE", vt_prefix) == " VAR ABCDE"
    assert score("all", f"Answer: {vt_prefix} VAR ABCDE", ["ABCDE", "text"], vt_prefix) == 0.5
    assert without_answer_prefix("Answer: something else", vt_prefix) == "Answer: something else"


def test_resumed_records_are_scored_again_from_their_prediction(tmp_path, prompts):
    [case] = generate_cases("cwe", 512, 1, seed=5, count_tokens=prompts.count)
    stale = {"task": "cwe", "length": 512, "index": 0, "mode": "full", "block_size": None, "anchor_size": None,
             "case_id": case.case_id, "model": "m", "dtype": "float32", "device": "cpu",
             "max_new_tokens": case.max_new_tokens,
             "prediction": case.answer_prefix + " " + case.answers[0], "score": 0.9}
    log = tmp_path / "cases.jsonl"
    log.write_text(json.dumps(stale) + "\n")

    class Engine:
        tokenizer, model_name, dtype = prompts.tokenizer, "m", "torch.float32"
        hf_tokenizer = prompts.tokenizer
        device = torch.device("cpu")

    runner = EvalRunner(Engine(), log=ResultLog(log))
    assert runner.pending(case, [runner_module.FULL]) == []
    assert runner.records[0]["score"] == 0.1  # one of the 10 words named; the echoed prefix does not count


# ---------------------------------------------------------------- modes


def test_modes_default_to_a_quarter_and_run_anchors_larger_than_the_block():
    modes, skipped = modes_for(2048, [QUARTER])
    assert [(m.name, m.block_size, m.anchor_size) for m in modes] == [("full", None, None), ("star", 512, 512)]
    specs = [StarSpec(SizeSpec(1024), SizeSpec(256)), StarSpec(SizeSpec(1024), SizeSpec(2048))]
    modes, skipped = modes_for(8192, specs)
    assert [m.label for m in modes] == ["full", "star 1024/256", "star 1024/2048"] and skipped == []


def test_star_specs_from_options():
    labels = lambda specs: [spec.label for spec in specs]  # noqa: E731
    assert labels(eval_cli.parse_star_specs(None, None, None)) == ["star b=L/4, a=L/4"]
    assert labels(eval_cli.parse_star_specs("1024,2048", "256,1024", None)) == [
        "star b=1024, a=256", "star b=1024, a=1024", "star b=2048, a=256", "star b=2048, a=1024"]
    assert labels(eval_cli.parse_star_specs("512", None, None)) == ["star b=512, a=512"]
    assert labels(eval_cli.parse_star_specs(None, None, "L/4:L/4,1024:256")) == [
        "star b=L/4, a=L/4", "star b=1024, a=256"]
    for bad in (("0", None, None), ("x", None, None), (None, None, "1024"), ("1", None, "1:1")):
        with pytest.raises(UsageError):
            eval_cli.parse_star_specs(*bad)


# ---------------------------------------------------------------- the runner, end to end on a random-weight model


def test_tiny_end_to_end_run(tiny_engine, prompts):
    cases = (generate_cases("niah_single_1", 256, 2, seed=0, count_tokens=prompts.count)
             + generate_cases("vt", 512, 1, seed=0, count_tokens=prompts.count))
    one_block = StarSpec(SizeSpec(4096), SizeSpec(4096))  # one block: Star Attention is exactly full attention
    runner = EvalRunner(tiny_engine, max_new_tokens=4)
    for case in cases:
        runner.run_case(case, modes_for(case.length, [QUARTER, one_block])[0])
    assert len(runner.records) == 3 * 3
    by_mode = {}
    for record in runner.records:
        assert 0.0 <= record["score"] <= 1.0 and record["new_tokens"] >= 1
        assert record["context_tokens"] + record["query_tokens"] <= record["length"]
        assert (record["phase1_s"] is None) == (record["mode"] == "full")
        by_mode.setdefault((record["task"], record["index"], record["block_size"]), record["prediction"])
    for (task, index, block), prediction in by_mode.items():
        if block == 4096:
            assert prediction == by_mode[(task, index, None)]

    rows, overall = summary.summarize(runner.records)
    assert len(rows) == 6 and len(overall) == 6
    for row in rows + overall:
        assert ROW_KEYS <= set(row)
        assert 0.0 <= row["accuracy"] <= 100.0
        # Both modes name sources and quote evidence (by the same method).
        assert row["source_hit"] is None or 0.0 <= row["source_hit"] <= 100.0
        assert row["evidence_hit"] is None or 0.0 <= row["evidence_hit"] <= 100.0
        if row["mode"] == "star":
            assert row["speedup"] > 0 and row["phase1_s"] > 0
        else:
            assert row["retention"] is None and row["speedup"] is None and row["phase1_s"] is None
    # niah_single_1's needle is written once in its context: every record says whether its sources found it.
    assert all(isinstance(record["evidence_hit"], bool) and isinstance(record["source_hit"], bool)
               for record in runner.records if record["task"] == "niah_single_1")


def test_summary_numbers_on_hand_made_records():
    def record(mode, index, score_, ttft, phase1=None, block=None):
        return {"task": "vt", "length": 1024, "index": index, "mode": mode, "block_size": block,
                "anchor_size": block, "score": score_, "phase1_s": phase1, "ttft_s": ttft, "new_tokens": 3,
                "decode_tokens_per_s": 10.0, "peak_rss_mb": 100.0 + index, "peak_cuda_mb": None}

    records = [record("full", 0, 1.0, 4.0), record("full", 1, 1.0, 4.0),
               record("star", 0, 1.0, 0.5, 0.5, 256), record("star", 1, 0.5, 0.5, 0.5, 256)]
    records[2].update(source_hit=True, evidence_hit=False)
    records[3].update(source_hit=True, evidence_hit=True)
    records[0].update(source_hit=None, evidence_hit=None)  # no reference written once in its context: not counted
    records[1].update(source_hit=False, evidence_hit=True)
    rows, overall = summary.summarize(records)
    full, star = rows
    assert (star["source_hit"], star["evidence_hit"], full["source_hit"], full["evidence_hit"]) == (100, 50, 0, 100)
    assert overall[1]["evidence_hit"] == 50.0
    assert full["accuracy"] == 100.0 and full["retention"] is None and full["peak_rss_mb"] == 101.0
    assert star["accuracy"] == 75.0 and star["retention"] == 75.0
    assert star["speedup"] == 4.0  # full ttft 4 s / (Phase 1 0.5 s + ttft 0.5 s)
    assert overall[1]["task"] == "overall" and overall[1]["retention"] == 75.0 and overall[1]["speedup"] == 4.0
    # paired differences star - full: 0 and -0.5 -> mean -25 points, variance 0.125, half-width 1.96 * sd / sqrt(2)
    assert star["delta"] == -25.0 and star["better"] == 0 and star["worse"] == 1
    assert star["delta_ci95"] == pytest.approx(100 * 1.959964 * 0.125 ** 0.5 / 2 ** 0.5, abs=0.01)
    assert full["delta"] is None and full["delta_ci95"] is None and full["better"] is None


def test_overall_delta_combines_task_variances():
    def record(task, mode, index, score_):
        return {"task": task, "length": 512, "index": index, "mode": mode, "block_size": 64 if mode == "star" else None,
                "anchor_size": 64 if mode == "star" else None, "score": score_, "phase1_s": 0.1 if mode == "star"
                else None, "ttft_s": 1.0, "new_tokens": 2, "decode_tokens_per_s": 5.0, "peak_rss_mb": 1.0,
                "peak_cuda_mb": None}

    # vt: star loses 1 of 4 (differences 0, 0, 0, -1); cwe: star wins 1 of 4 and loses 2 (1, -1, -1, 0)
    records = [record("vt", "full", i, 1.0) for i in range(4)] + [record("vt", "star", i, s)
                                                                  for i, s in enumerate([1, 1, 1, 0])]
    records += [record("cwe", "full", i, s) for i, s in enumerate([0, 1, 1, 0])]
    records += [record("cwe", "star", i, s) for i, s in enumerate([1, 0, 0, 0])]
    rows, overall = summary.summarize(records)
    vt, cwe = (next(r for r in rows if r["task"] == task and r["mode"] == "star") for task in ("vt", "cwe"))
    assert (vt["delta"], vt["better"], vt["worse"]) == (-25.0, 0, 1)
    assert (cwe["delta"], cwe["better"], cwe["worse"]) == (-25.0, 1, 2)
    star = overall[1]
    assert star["delta"] == -25.0 and (star["better"], star["worse"]) == (1, 3)
    # var of each task's mean: vt sd^2 = 0.25, cwe sd^2 = 0.9167, each / 4; the overall is their mean
    half_width = 1.959964 * 100 * ((0.25 / 4 + (11 / 12) / 4) / 4) ** 0.5
    assert star["delta_ci95"] == pytest.approx(half_width, abs=0.01)


# ---------------------------------------------------------------- the command: JSON report, --resume, Ctrl-C


def _invoke(args, capsys, exit_code=None):
    app = typer.Typer()
    app.command("eval")(eval_command_for_tests)
    app.command("noop")(lambda: None)
    result = typer.main.get_command(app).main(args=["eval", *args], prog_name="starqa", standalone_mode=False)
    assert result == exit_code
    return capsys.readouterr()


eval_command_for_tests = eval_cli.eval_command


@pytest.fixture
def cli_engine(monkeypatch, tiny_engine, home):
    monkeypatch.setattr(eval_cli, "_load_engine", lambda settings, model, trust_remote_code: tiny_engine)
    return tiny_engine


SUITE = ["--suite", "ruler", "--lengths", "256", "--samples", "2", "--tasks", "niah_single_1,cwe",
         "--max-new-tokens", "3", "--quiet"]


def test_json_report_has_the_required_keys(cli_engine, capsys):
    output = _invoke([*SUITE, "--block-size", "64,128", "--anchor-size", "64,256", "--json"], capsys)
    report = json.loads(output.out)
    assert report["model"] == "tiny-llama" and report["interrupted"] is False
    stars = {(64, 64), (64, 256), (128, 64), (128, 256)}  # anchors larger than the block run too
    assert {(row["mode"], row["block_size"], row["anchor_size"]) for row in report["results"]} == {
        ("full", None, None), *(("star", *sizes) for sizes in stars),
        *(("hybrid", *sizes) for sizes in stars)}  # one hybrid row per Star configuration (starqa.answer.hybrid)
    assert report["skipped"] == []
    assert {row["task"] for row in report["results"]} == {"niah_single_1", "cwe"}
    assert {row["task"] for row in report["overall"]} == {"overall"}
    for row in report["results"] + report["overall"]:
        assert ROW_KEYS <= set(row)
        assert row["samples"] == (2 if row["task"] != "overall" else 4)


def test_trust_remote_code_reaches_the_model_load(monkeypatch, tiny_engine, home, capsys):
    asked = []
    monkeypatch.setattr(eval_cli, "_load_engine",
                        lambda settings, model, trust_remote_code: asked.append(trust_remote_code) or tiny_engine)
    _invoke([*SUITE, "--json"], capsys)
    _invoke([*SUITE, "--json", "--trust-remote-code"], capsys)
    assert asked == [False, True]


def test_resume_skips_finished_cases(cli_engine, capsys, tmp_path, monkeypatch):
    log = tmp_path / "cases.jsonl"
    measured = []
    original = EvalRunner.measure

    def counting(self, case, mode, context_ids, query_ids):
        measured.append((case.task, case.index, mode.label))
        return original(self, case, mode, context_ids, query_ids)

    monkeypatch.setattr(EvalRunner, "measure", counting)
    first = json.loads(_invoke([*SUITE, "--json", "--resume", str(log)], capsys).out)
    assert len(measured) == 2 * 2 * 2 and len(log.read_text().splitlines()) == 8
    measured.clear()
    again = json.loads(_invoke([*SUITE, "--json", "--resume", str(log)], capsys).out)
    assert measured == [] and again["resumed"] == 8
    assert again["results"] == first["results"]

    lines = log.read_text().splitlines()  # lose two results and cut a third short, as an interruption would
    log.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    measured.clear()
    _invoke([*SUITE, "--json", "--resume", str(log)], capsys)
    assert len(measured) == 3
    assert len(ResultLog(log).load()) == 8

    # Records made from other cases (another seed or sample count), another answer budget or another device are
    # refused before anything is measured, not mixed in.
    measured.clear()
    with pytest.raises(UsageError, match="another prompt, model or device"):
        _invoke([*SUITE, "--seed", "5", "--json", "--resume", str(log)], capsys)
    with pytest.raises(UsageError, match="another prompt, model or device"):
        _invoke([*SUITE, "--max-new-tokens", "4", "--json", "--resume", str(log)], capsys)
    more_samples = [arg if arg != "2" else "3" for arg in SUITE]  # sample 1's needle depth moves from 1 to 1/2
    with pytest.raises(UsageError, match="--samples"):
        _invoke([*more_samples, "--json", "--resume", str(log)], capsys)
    log.write_text(log.read_text().replace('"device": "cpu"', '"device": "cuda:0"'))
    with pytest.raises(UsageError, match="--device"):
        _invoke([*SUITE, "--json", "--resume", str(log)], capsys)
    assert measured == []


def _on_measurement(monkeypatch, number: int, event) -> None:
    """Call `event()` as the `number`-th measurement starts (after it returns, that measurement goes ahead)."""
    original, calls = EvalRunner.measure, []

    def measure(self, *args):
        calls.append(1)
        if len(calls) == number:
            event()
        return original(self, *args)

    monkeypatch.setattr(EvalRunner, "measure", measure)


def test_interrupted_run_reports_what_it_measured(cli_engine, capsys, monkeypatch, tmp_path):
    def interrupt():
        raise KeyboardInterrupt

    _on_measurement(monkeypatch, 4, interrupt)
    log = tmp_path / "cases.jsonl"
    code = cli.main(["eval", *SUITE, "--json", "--resume", str(log)])  # as after Ctrl-C
    output = capsys.readouterr()
    report = json.loads(output.out)
    assert code == 130
    assert output.err.splitlines()[-1] == ("starqa: error: interrupted: the report holds the cases finished so far "
                                           "(--resume FILE continues a run)")
    assert report["interrupted"] is True
    assert sum(row["samples"] for row in report["results"] if row["mode"] != "hybrid") == 3
    assert len(log.read_text().splitlines()) == 3


def test_sigterm_stops_the_run_like_ctrl_c(cli_engine, capsys, monkeypatch, tmp_path):
    import os
    import signal

    # As from `kill` or a batch scheduler's time limit.
    _on_measurement(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    code = cli.main(["eval", *SUITE, "--json", "--resume", str(tmp_path / "cases.jsonl")])
    output = capsys.readouterr()
    report = json.loads(output.out)
    assert code == 130 and "interrupted" in output.err
    assert report["interrupted"] is True and sum(row["samples"] for row in report["results"] if row["mode"] != "hybrid") == 2
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the eval's only while it runs


def test_a_failure_mid_run_still_prints_the_partial_report(cli_engine, capsys, monkeypatch, tmp_path):
    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _on_measurement(monkeypatch, 3, out_of_memory)
    code = cli.main(["eval", *SUITE, "--json", "--resume", str(tmp_path / "cases.jsonl")])
    output = capsys.readouterr()
    report = json.loads(output.out)
    assert code == 1 and report["failed"] is True and report["interrupted"] is False
    assert sum(row["samples"] for row in report["results"] if row["mode"] != "hybrid") == 2
    assert output.err.splitlines()[-1].startswith("starqa: error: RuntimeError: CUDA out of memory.")


def test_own_document_mode(cli_engine, capsys, tmp_path):
    document = tmp_path / "lease.txt"
    document.write_text(SMALL_SOURCE.text, encoding="utf-8")
    qa = tmp_path / "lease-qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": p.question, "answers": list(p.answers)})
                            for p in SMALL_SOURCE.pairs), encoding="utf-8")
    report = json.loads(_invoke(["--doc", str(document), "--qa", str(qa), "--max-new-tokens", "3", "--json",
                                 "--quiet"], capsys).out)
    assert report["document"] == "lease"
    assert {row["task"] for row in report["results"]} == {"lease"}
    star = [row for row in report["results"] if row["mode"] == "star"][0]
    assert star["block_size"] == star["anchor_size"] == star["length"] // 4
    assert all(row["samples"] == 2 for row in report["results"])


def test_own_document_mode_reads_an_encrypted_pdf_with_its_password(cli_engine, capsys, tmp_path):
    import pypdf

    locked = tmp_path / "locked.pdf"
    writer = pypdf.PdfWriter(clone_from=Path(__file__).resolve().parents[1] / "samples" / "contract.pdf")
    writer.encrypt("s3cret", algorithm="RC4-128")
    with open(locked, "wb") as handle:
        writer.write(handle)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Which law governs?", "answers": ["England"]}) + "\n", encoding="utf-8")
    args = ["--doc", str(locked), "--qa", str(qa), "--max-new-tokens", "1", "--block-size", "2048", "--json",
            "--quiet"]
    with pytest.raises(Exception, match="encrypted.*--password"):
        _invoke(args, capsys)
    report = json.loads(_invoke([*args, "--password", "s3cret"], capsys).out)
    assert report["document"] == "locked" and {row["mode"] for row in report["results"]} == {"full", "star", "hybrid"}


def test_plot_is_written(cli_engine, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "report.png"
    _invoke([*SUITE, "--tasks", "niah_single_1", "--samples", "1", "--plot", str(png)], capsys)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--suite", "babilong"], "--suite must be ruler"),
    (["--suite", "ruler", "--doc", "x", "--qa", "q.jsonl"], "not both"),
    ([], "not both or neither"),
    (["--doc", "x"], "--doc needs --qa"),
    (["--suite", "ruler", "--lengths", "2k"], "--lengths"),
    (["--suite", "ruler", "--tasks", "niah_single_9"], "unknown task"),
    (["--suite", "ruler", "--pairs", "1024"], "BLOCK:ANCHOR"),
    (["--suite", "ruler", "--samples", "0"], "--samples must be positive"),
    (["--suite", "ruler", "--block-size", ","], "at least one size"),
    (["--suite", "ruler", "--plot", "report.xyz"], "cannot write .xyz files"),
])
def test_bad_options_are_usage_errors(cli_engine, capsys, args, message):
    with pytest.raises(UsageError, match=message):
        _invoke(args, capsys)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    import sys

    from starqa.errors import StarqaError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(StarqaError, match="needs matplotlib"):
        summary.require_matplotlib()


def test_readme_tables_from_a_report():
    """benchmarks/ruler_tables.py renders docs/performance.md's tables from a --json report."""
    spec = importlib.util.spec_from_file_location(
        "ruler_tables", Path(__file__).resolve().parents[1] / "benchmarks" / "ruler_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)

    def record(mode, index, score_, block=None, anchor=None):
        return {"task": "vt", "length": 2048, "index": index, "mode": mode, "block_size": block,
                "anchor_size": anchor, "score": score_, "phase1_s": 1.0 if block else None, "ttft_s": 2.0,
                "new_tokens": 2, "decode_tokens_per_s": 5.0, "peak_rss_mb": 1.0, "peak_cuda_mb": None}

    records = [record("full", i, 1.0) for i in range(2)]
    records += [record("star", 0, 1.0, 512, 512), record("star", 1, 0.0, 512, 512)]
    records += [record("star", i, 1.0, 1024, 256) for i in range(2)]
    rows, overall = summary.summarize(records)
    report = summary.document("m", rows, overall)
    lengths = tables.length_table(report)
    assert "Star L/4" in lengths[0] and "Star 1024/256" in lengths[0]
    cells = [cell.strip() for cell in lengths[2].strip("|").split("|")]
    assert cells[:5] == ["2,048", "2", "100.0 %", "50.0 % (512/512)", "100.0 %"]
    assert cells[5:9] == ["50 %", "100 %", "-50.0 ± 98.0", "+0.0 ± 0.0"]
    assert cells[9:] == ["0 / 1", "0 / 0", "0.67x", "0.67x"]  # full ttft 2 s / (Phase 1 1 s + ttft 2 s)
    assert tables.task_table(report)[-1] == "| vt | 100 / 50 / 100 |"


def test_peak_memory_follows_the_per_mode_reset():
    import threading

    from starqa import report

    if not runner_module.reset_peak_rss():
        pytest.skip("this system does not let a process reset its peak RSS")
    block = b"x" * (300 * 2**20)
    del block
    thread = threading.Thread(target=lambda: None)  # an exited thread must not pin the old peak
    thread.start()
    thread.join()
    high = report.peak_rss_mb()
    assert runner_module.reset_peak_rss()
    assert report.peak_rss_mb() < high - 200
