"""`block_size: auto`: a document's block size is a quarter of its context (to the nearest multiple of 1,024, at least
1,024), chosen when it is first stored and kept by `ingest --update`. Runs on the tiny random-weight model."""

from __future__ import annotations

import pytest

from starqa.config import auto_block_size, load_settings
from starqa.errors import UsageError
from test_reuse import clauses, error_lines, manifest, run

AUTO = ("--block-size", "auto")
LONG = clauses(1, 250)  # ~7,000 context tokens: blocks of 2,048


@pytest.mark.parametrize("tokens, block", [(1, 1024), (4420, 1024), (6143, 1024), (6144, 2048), (8100, 2048),
                                           (10240, 3072), (16300, 4096), (31000, 8192)])
def test_the_auto_block_size_is_a_quarter_to_the_nearest_1024_and_at_least_1024(tokens, block):
    assert auto_block_size(tokens) == block


def test_settings_take_auto_or_a_positive_number_and_refuse_other_words(tmp_path):
    assert load_settings(None, block_size="auto").block_size == "auto"
    assert load_settings(None, block_size="512").block_size == 512  # --block-size 512 arrives as text
    config = tmp_path / "config.yaml"
    config.write_text("block_size: auto\n", encoding="utf-8")
    assert load_settings(config).block_size == "auto"
    for wrong in ("fast", "-5", "0", "1.5"):
        with pytest.raises(UsageError, match="setting 'block_size' must be a positive number of tokens or auto"):
            load_settings(None, block_size=wrong)


def test_auto_stores_a_long_document_in_quarters_and_a_short_one_in_blocks_of_1024(capsys, home, tmp_path,
                                                                                   tiny_model_dir):
    long, short = tmp_path / "long.txt", tmp_path / "short.txt"
    long.write_text(LONG, encoding="utf-8")
    short.write_text(clauses(1, 30), encoding="utf-8")
    for source in (long, short):
        code, _, err = run(capsys, "ingest", source, *AUTO, "--model", tiny_model_dir)
        assert code == 0, err
    stored = manifest(home, "long")
    assert 6144 <= stored["context_tokens"] < 10240
    assert (stored["block_size"], stored["anchor_size"]) == (2048, 2048)
    assert [block["start"] for block in stored["blocks"]] == list(range(0, stored["context_tokens"], 2048))
    assert (manifest(home, "short")["block_size"], manifest(home, "short")["anchor_size"]) == (1024, 1024)
    # The stored sizes are the document's own: asking with auto (or without sizes) is not refused.
    code, out, err = run(capsys, "ask", "--doc", "long", "--block-size", "auto", "--max-new-tokens", "2", "--json",
                         "--no-server", "--model", tiny_model_dir, "What does the supplier deliver on Tuesdays?")
    assert code == 0, err


def test_an_update_keeps_the_stored_sizes_so_its_unchanged_blocks_are_taken_over(capsys, home, tmp_path,
                                                                                tiny_model_dir):
    source = tmp_path / "doc.txt"
    source.write_text(LONG, encoding="utf-8")
    code, _, err = run(capsys, "ingest", source, "--name", "doc", *AUTO, "--model", tiny_model_dir)
    assert code == 0, err
    first = manifest(home)
    # Cut to ~5,600 tokens: auto alone would now choose 1,024-token blocks and take nothing over.
    source.write_text(clauses(1, 200), encoding="utf-8")
    code, _, err = run(capsys, "ingest", source, "--name", "doc", "--update", *AUTO, "--model", tiny_model_dir)
    assert code == 0, err
    cut = manifest(home)
    assert auto_block_size(cut["context_tokens"]) == 1024
    assert (cut["block_size"], cut["anchor_size"]) == (first["block_size"], first["anchor_size"]) == (2048, 2048)
    assert cut["blocks_reused"] == cut["context_tokens"] // 2048 == 2  # every whole block before the cut
    # Unchanged now: skipped, although its sizes are not what auto would choose for it today.
    code, _, err = run(capsys, "ingest", source, "--name", "doc", "--update", *AUTO, "--model", tiny_model_dir)
    assert code == 0, err
    assert "unchanged" in err and manifest(home) == cut


def test_a_document_stored_with_numbers_is_the_one_asked_for_under_auto(capsys, home, tmp_path, tiny_model_dir):
    source = tmp_path / "doc.txt"
    source.write_text(clauses(1, 30), encoding="utf-8")
    code, _, err = run(capsys, "ingest", source, "--name", "doc", "--block-size", "64", "--model", tiny_model_dir)
    assert code == 0, err
    code, _, err = run(capsys, "ingest", source, "--name", "doc", *AUTO, "--model", tiny_model_dir)
    assert code == 0 and "nothing to do" in err, err
    assert manifest(home)["block_size"] == 64
    code, _, err = run(capsys, "ingest", source, "--name", "doc", "--block-size", "big", "--model", tiny_model_dir)
    assert code == 2 and error_lines(err) == [
        "starqa: error: setting 'block_size' must be a positive number of tokens or auto, not 'big'"], err
