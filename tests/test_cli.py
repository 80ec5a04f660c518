"""The working tool end to end: ingest the samples, ask from the stored KV in a new process, list/info/rm, config."""

from __future__ import annotations

import json
import re

import pytest
import torch

from clihelp import REPO, json_lines, starqa
from starqa.config import load_settings
from starqa.errors import UsageError

JSON_KEYS = {"question", "answer", "doc", "attention", "cache_hit", "context_tokens", "query_tokens",
             "answer_tokens", "phase1_s", "prefill_s", "ttft_s", "decode_tokens_per_s", "sources", "evidence",
             "grounded"}


@pytest.mark.slow
def test_round_trip_ingest_then_ask_in_a_new_process_skips_phase1(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    model = ("--model", str(tiny_model_dir), "--max-new-tokens", "6")
    # `ask --doc FILE` ingests first (Phase 1 runs in that process) and answers.
    first = starqa("ask", "--doc", "samples/contract.txt", "What is the monthly fee?", "--json", "--block-size",
                   "512", *model, home=home)
    assert first.returncode == 0, first.stderr
    fresh = json_lines(first.stdout)[0]
    assert fresh["cache_hit"] is False and fresh["phase1_s"] > 0
    # A new process answers the same from the KV on disk, without Phase 1.
    second = starqa("ask", "--doc", "contract", "What is the monthly fee?", "--json", *model, home=home)
    assert second.returncode == 0, second.stderr
    cached = json_lines(second.stdout)[0]
    assert set(cached) >= JSON_KEYS
    assert cached["cache_hit"] is True and cached["phase1_s"] == 0
    assert cached["answer"] == fresh["answer"]
    assert cached["context_tokens"] == fresh["context_tokens"] > 4000
    # Ingesting the same source with the same settings again does nothing, and says so.
    again = starqa("ingest", "samples/contract.txt", "--block-size", "512", "--model", str(tiny_model_dir),
                   home=home)
    assert again.returncode == 0 and "nothing to do" in again.stderr


@pytest.mark.slow
def test_ingest_pdf_ask_questions_file_list_info_rm(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    ingest = starqa("ingest", "samples/contract.pdf", "--name", "msa", "--block-size", "1024", "--model",
                    str(tiny_model_dir), home=home)
    assert ingest.returncode == 0, ingest.stderr
    assert ingest.stdout == ""  # stdout is for answers only
    asked = starqa("ask", "--doc", "msa", "--questions", "samples/contract-questions.txt", "--json",
                   "--max-new-tokens", "4", "--model", str(tiny_model_dir), home=home)
    assert asked.returncode == 0, asked.stderr
    rows = json_lines(asked.stdout)
    questions = [q for q in (REPO / "samples/contract-questions.txt").read_text().splitlines() if q.strip()]
    assert [row["question"] for row in rows] == questions
    assert all(row["doc"] == "msa" and row["attention"] == "star" for row in rows)

    listed = starqa("list", "--json", home=home)
    assert [row["name"] for row in json_lines(listed.stdout)] == ["msa"]
    info = json.loads(starqa("info", "msa", "--json", home=home).stdout)
    assert info["pages"] == 7 and info["block_size"] == 1024 and info["source"]["kind"] == "pdf"
    assert all(block["pages"] for block in info["blocks"])
    assert starqa("verify", "msa", home=home).returncode == 0

    full = starqa("ask", "--doc", "msa", "Who signed?", "--attention", "full", "--json", "--max-new-tokens", "3",
                  "--model", str(tiny_model_dir), home=home)
    assert full.returncode == 0 and json_lines(full.stdout)[0]["attention"] == "full"

    assert starqa("rm", "msa", home=home).returncode == 0
    assert starqa("list", "--json", home=home).stdout == ""
    assert not any((home / "objects").iterdir())


@pytest.mark.parametrize("command", [(), ("ingest",), ("ask",), ("eval",)])
def test_help_shows_a_type_after_options_that_take_a_value_and_none_after_flags(tmp_path, command):
    import typer

    from starqa import cli

    result = starqa(*command, "--help", home=tmp_path)
    assert result.returncode == 0, result.stderr
    click_command = typer.main.get_command(cli.app)
    click_command = click_command.commands[command[0]] if command else click_command
    context = click_command.make_context("starqa", [], resilient_parsing=True)
    options = [param for param in click_command.get_params(context) if param.param_type_name == "option"]
    assert any(option.is_flag for option in options)  # --help at least
    assert not command or any(not option.is_flag for option in options)
    rows = {}  # each option's first help line as words: ["--quiet", "-q", "Only", "answers", ...]
    for line in result.stdout.splitlines():
        if re.match(r"[\s*]{0,6}--[\w-]+\s", line.strip("\u2502")):  # not a help text's wrapped line
            words = line.strip("\u2502 ").lstrip("* ").split()
            rows[words[0]] = words
    for option in options:
        long_name = next(name for name in option.opts if name.startswith("--"))
        words = rows[long_name]
        shown = words[1 + len([name for name in option.opts + option.secondary_opts if name != long_name]):]
        takes_a_type = bool(shown) and shown[0].startswith("<") and shown[0].endswith(">")
        assert takes_a_type != option.is_flag, f"{' '.join(command)} --help: {' '.join(words)}"


def test_config_file_layers_over_defaults_and_flags_win(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("block_size: 512\nmax_new_tokens: 32\n")
    settings = load_settings(config, max_new_tokens=8)
    assert settings.block_size == 512 and settings.effective_anchor_size == 512
    assert settings.max_new_tokens == 8
    assert load_settings().block_size == "auto"


def test_config_rejects_unknown_keys_and_wrong_types_by_name(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("blocksize: 512\n")
    with pytest.raises(UsageError, match="blocksize"):
        load_settings(config)
    config.write_text("block_size: lots\n")
    with pytest.raises(UsageError, match="block_size"):
        load_settings(config)


@pytest.mark.parametrize("dtype,kv_dtype", [("float32", "auto"), ("bfloat16", "auto"), ("float32", "float16"),
                                            ("bfloat16", "int8")])
def test_kv_read_back_from_the_store_equals_phase1_in_memory(tmp_path, home, tiny_model_dir, dtype, kv_dtype):
    """What ask loads from disk is bit for bit what Phase 1 computed and stored in its precision (layers, keys and
    values, int8 scales, positions in order)."""
    from starqa import cli
    from starqa.answer.passes import load_context
    from starqa.engine.star_engine import StarEngine
    from starqa.store.document_store import DocumentStore

    source = tmp_path / "terms.txt"
    source.write_text("Clause 1. The supplier delivers the reports every Tuesday.\n\n" * 12, encoding="utf-8")
    assert cli.main(["ingest", str(source), "--block-size", "40", "--anchor-size", "24", "--dtype", dtype,
                     "--kv-dtype", kv_dtype, "--model", str(tiny_model_dir), "--quiet"]) == 0
    engine = StarEngine.load(str(tiny_model_dir), device="cpu", dtype=dtype, store_root=home)
    store = DocumentStore(home)
    document = store.get("terms")
    stored = dtype if kv_dtype == "auto" else kv_dtype
    assert document.kv_dtype == document.manifest["kv_dtype"] == stored
    assert len(document.blocks) >= 4
    loaded = load_context(engine, store, document)
    computed = engine.encode_context(document.context_ids(), 40, 24, kv_dtype=kv_dtype)
    assert loaded.spans == computed.spans and loaded.n_tokens == computed.n_tokens
    assert len(loaded.keys) == len(computed.keys) == engine.num_layers
    assert torch.equal(loaded.chunk_starts, computed.chunk_starts)
    for layer in range(engine.num_layers):
        assert loaded.keys[layer].dtype == getattr(torch, stored)
        assert torch.equal(loaded.keys[layer], computed.keys[layer])
        assert torch.equal(loaded.values[layer], computed.values[layer])
        if stored == "int8":
            assert torch.equal(loaded.key_scales[layer], computed.key_scales[layer])
            assert torch.equal(loaded.value_scales[layer], computed.value_scales[layer])
    assert not torch.equal(loaded.keys[0], loaded.values[0])  # keys and values are not the same tensor twice
    info = json.loads(_run_cli(["info", "terms", "--json"]))
    assert info["kv_dtype"] == stored
    assert info["kv_bytes_per_token"] == pytest.approx(info["kv_bytes"] / info["context_tokens"], abs=0.1)


def _run_cli(args):
    import contextlib
    import io

    from starqa import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(args) == 0
    return out.getvalue()


@pytest.mark.slow
def test_a_document_stored_before_kv_precision_and_bf16_existed_is_still_answered(tmp_path, tiny_model_dir):
    """An old store: float32 KV, a manifest without kv_dtype. The default (auto) settings answer it in float32."""
    home = tmp_path / "home"
    source = tmp_path / "terms.txt"
    source.write_text("Clause 1. The fee is 4,200 euros per month.\n\n" * 8, encoding="utf-8")
    args = ("--doc", "terms", "What is the fee?", "--json", "--max-new-tokens", "5", "--model", str(tiny_model_dir))
    assert starqa("ingest", str(source), "--dtype", "float32", "--model", str(tiny_model_dir), home=home).returncode == 0
    before = starqa("ask", *args, home=home)
    assert before.returncode == 0, before.stderr
    manifest_path = next(home.glob("objects/terms.*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    del manifest["kv_dtype"]  # as written by starqa before --kv-dtype
    manifest_path.write_text(json.dumps(manifest))
    after = starqa("ask", *args, home=home)
    assert after.returncode == 0, after.stderr
    assert json_lines(after.stdout)[0]["answer"] == json_lines(before.stdout)[0]["answer"]
    assert "float32 / float32" in after.stderr  # answered in its own dtype, its KV read as float32
    again = starqa("ingest", str(source), "--model", str(tiny_model_dir), home=home)  # default dtype: auto
    assert again.returncode == 0 and "nothing to do" in again.stderr
