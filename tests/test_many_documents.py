"""`ask` over several stored documents: repeated --doc, globs over stored names, --all; one model load."""

from __future__ import annotations

import pytest

from clihelp import json_lines, starqa

TEXTS = {
    "contract-alpha": "Clause 1. The monthly fee is 4,200 euros.\n\nClause 2. Notice is ninety days.\n",
    "contract-beta": "Clause 1. The monthly fee is 99 dollars.\n\nClause 2. Notice is ten days.\n",
    "memo": "The board meets on Tuesdays.\n",
}


@pytest.fixture
def stocked(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    paths = []
    for name, text in TEXTS.items():
        path = tmp_path / f"{name}.txt"
        path.write_text(text)
        paths.append(str(path))
    result = starqa("ingest", *paths, "--model", str(tiny_model_dir), home=home)
    assert result.returncode == 0, result.stderr
    return home


def _timeless(row: dict) -> dict:
    return {key: value for key, value in row.items()
            if key not in ("phase1_s", "prefill_s", "ttft_s", "decode_tokens_per_s")}


def _ask(home, model_dir, *args):
    return starqa("ask", *args, "--max-new-tokens", "4", "--model", str(model_dir), home=home)


@pytest.mark.slow
def test_a_glob_repeated_docs_and_all_answer_each_document_with_one_model_load(stocked, tiny_model_dir):
    single = {name: json_lines(_ask(stocked, tiny_model_dir, "--doc", name, "What is the fee?", "--json").stdout)[0]
              for name in TEXTS}
    glob = _ask(stocked, tiny_model_dir, "--doc", "contract-*", "What is the fee?", "--json")
    assert glob.returncode == 0, glob.stderr
    rows = json_lines(glob.stdout)
    assert [row["doc"] for row in rows] == ["contract-alpha", "contract-beta"]  # the store's order, each once
    # As if asked one by one: the whole row (its answer, context size, sources, evidence), but for the times.
    # (4-token answers of a random model barely depend on the document; the rest of the row does.)
    assert [_timeless(row) for row in rows] == [_timeless(single[row["doc"]]) for row in rows]
    assert rows[0]["context_tokens"] != rows[1]["context_tokens"] or rows[0]["sources"] != rows[1]["sources"]
    assert glob.stderr.count("loading model") == 1

    both = _ask(stocked, tiny_model_dir, "--doc", "memo", "--doc", "contract-*", "--doc", "memo", "What is the fee?",
                "--json")
    assert [row["doc"] for row in json_lines(both.stdout)] == ["memo", "contract-alpha", "contract-beta"]

    every = _ask(stocked, tiny_model_dir, "--all", "What is the fee?")
    assert every.returncode == 0, every.stderr
    headings = [line for line in every.stdout.splitlines() if line.startswith("== ")]
    assert headings == ["== contract-alpha ==", "== contract-beta ==", "== memo =="]
    assert single["memo"]["answer"] in every.stdout


@pytest.mark.slow
def test_a_failing_document_is_reported_and_the_others_still_answered(stocked, tiny_model_dir):
    block = next((stocked / "documents" / "contract-beta").resolve().glob("blocks/*.safetensors"))
    block.write_bytes(block.read_bytes()[:-10])  # damaged
    result = _ask(stocked, tiny_model_dir, "--all", "What is the fee?", "--json")
    assert result.returncode == 1
    assert [row["doc"] for row in json_lines(result.stdout)] == ["contract-alpha", "memo"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("starqa: error:")]
    assert len(errors) == 2 and errors[0].startswith("starqa: error: contract-beta: document 'contract-beta' is damaged")
    assert errors[1] == "starqa: error: 1 of 3 documents failed"
    unknown = _ask(stocked, tiny_model_dir, "--doc", "memo", "--doc", "nosuch", "What is the fee?", "--json")
    assert unknown.returncode == 1 and [row["doc"] for row in json_lines(unknown.stdout)] == ["memo"]
    assert "nosuch: no document named 'nosuch'" in unknown.stderr


@pytest.mark.parametrize("args,message", [
    (("--doc", "zzz-*"), "--doc 'zzz-*' matches no stored document"),
    (("--all", "--doc", "memo"), "--all asks every stored document; drop --doc, or drop --all"),
    ((), "give --doc NAME"),
])
def test_bad_document_selections_are_one_line_usage_errors(tmp_path, args, message):
    result = starqa("ask", *args, "What?", home=tmp_path / "home")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"starqa: error: {result.stderr.split('error: ', 1)[1].strip()}"]
    assert message in result.stderr


def test_all_on_an_empty_store_is_a_usage_error(tmp_path):
    result = starqa("ask", "--all", "What?", home=tmp_path / "home")
    assert result.returncode == 2
    assert result.stderr.startswith("starqa: error: --all: no documents stored in ")
    assert len(result.stderr.strip().splitlines()) == 1
