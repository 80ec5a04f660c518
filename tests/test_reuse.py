"""Block reuse on re-ingest (--force, --update): a new version takes over every block whose key the version it
replaces holds, encodes only the rest, and is exactly what one ingest of the new file gives. Everything runs on the
tiny random-weight model; most commands run in-process, what needs real processes (SIGKILL, --nproc) runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clihelp import REPO, json_lines, starqa, tree_snapshot
from starqa import cli

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
BLOCK = ("--block-size", "64", "--anchor-size", "56")  # the anchor (56 tokens) reaches past the prompt's head (~50)
QUESTION = "What does the supplier deliver every Tuesday?"


def clauses(first: int, count: int) -> str:
    return "".join(f"Clause {i}. The supplier delivers report {i} every {DAYS[i % 7]} and keeps it for {i + 2} "
                   "years.\n\n" for i in range(first, first + count))


V1 = clauses(1, 30)  # ~650 context tokens: 11 blocks of 64
V2 = V1 + clauses(31, 6)  # ~20 % appended
V3 = V2.replace("report 17 every", "the seventeenth report every")  # a middle block edited


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("starqa: error:")]


def ingest(capsys, model: Path, source: Path, *extra) -> dict:
    """`starqa ingest SOURCE --name doc` in this process; the stored version's manifest."""
    code, _, err = run(capsys, "ingest", source, "--name", "doc", *BLOCK, "--model", model, *extra)
    assert code == 0, err
    return manifest(Path(os.environ["STARQA_HOME"]))


def manifest(home: Path, name: str = "doc") -> dict:
    return json.loads(((home / "documents" / name).resolve() / "manifest.json").read_text(encoding="utf-8"))


def stored_kv(home: Path, name: str = "doc") -> dict[int, list[torch.Tensor]]:
    """Every block's tensors (keys, values, and scales where int8), by block index."""
    from starqa.store.document_store import read_block_file

    folder = (home / "documents" / name).resolve()
    return {block["index"]: [t for part in read_block_file(folder / block["file"]) for t in part]
            for block in manifest(home, name)["blocks"]}


def assert_same_kv(a: dict, b: dict, *, exact: bool = True) -> None:
    assert sorted(a) == sorted(b)
    for index in a:
        assert len(a[index]) == len(b[index])
        for x, y in zip(a[index], b[index]):
            if exact:
                assert x.dtype == y.dtype and torch.equal(x, y), f"block {index} differs"
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=2e-5)


def answer(capsys, model: Path) -> tuple[str, list]:
    code, out, err = run(capsys, "ask", "--doc", "doc", QUESTION, "--json", "--max-new-tokens", "8", "--model", model)
    assert code == 0, err
    row = json_lines(out)[0]
    return row["answer"], row["sources"]


def write(folder: Path, text: str, name: str = "doc.txt") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def reused_flags(version: dict) -> list[bool]:
    return [block["reused"] for block in version["blocks"]]


# ---------------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("anchor", [56, 160])
def test_a_document_built_by_appending_and_editing_equals_one_ingest(capsys, monkeypatch, tmp_path, tiny_model_dir,
                                                                     anchor):
    """v1 -> v2 (appended) -> v3 (a middle block edited) by `--update` has, at each step, the KV (bit for bit: one
    block per Phase 1 batch, so the batching is the same), the greedy answer and the sources of one ingest of that
    version. Block 0 is taken over, so the anchor is the head of its stored KV, not encoded again. With an anchor
    of 160 over blocks of 64, the head is blocks 0-2 (block 2 ends past the anchor): all three are taken over."""
    config = write(tmp_path, "phase1_batch: 1\n", "batch1.yaml")
    model = tiny_model_dir
    updated, fresh = tmp_path / "updated", tmp_path / "fresh"
    monkeypatch.setenv("STARQA_HOME", str(updated))
    source = write(tmp_path, V1)
    flags = ("--config", config, "--anchor-size", str(anchor))  # after BLOCK: it wins
    assert ingest(capsys, model, source, *flags)["anchor_size"] == anchor
    for step, text in (("appended", V2), ("edited", V3)):
        monkeypatch.setenv("STARQA_HOME", str(updated))
        write(tmp_path, text)
        version = ingest(capsys, model, source, "--update", *flags)
        assert 0 < version["blocks_reused"] < len(version["blocks"]), step
        assert all(reused_flags(version)[:(anchor - 1) // 64 + 1]), step  # the head blocks
        kv, said = stored_kv(updated), answer(capsys, model)
        monkeypatch.setenv("STARQA_HOME", str(fresh / step))
        one_go = ingest(capsys, model, source, *flags)
        assert one_go["blocks_reused"] == 0
        assert [b["key"] for b in one_go["blocks"]] == [b["key"] for b in version["blocks"]]
        assert_same_kv(kv, stored_kv(fresh / step))
        assert said == answer(capsys, model) and said[0] != ""
    assert sum(reused_flags(version)) >= 3  # the edit left the blocks before it alone


def test_with_batched_phase1_and_int8_kv_a_new_version_still_equals_one_ingest(capsys, monkeypatch, tmp_path,
                                                                               tiny_model_dir):
    """Default batching (blocks grouped differently than in one ingest) and int8 KV (the anchor encoded, since the
    stored block 0 is not in the compute dtype): the KV within the Phase 1 tests' tolerance, the same answer."""
    source = write(tmp_path, V1)
    for kv_dtype in ("auto", "int8"):
        monkeypatch.setenv("STARQA_HOME", str(tmp_path / kv_dtype / "updated"))
        ingest(capsys, tiny_model_dir, source, "--dtype", "float32", "--kv-dtype", kv_dtype)
        write(tmp_path, V2)
        version = ingest(capsys, tiny_model_dir, source, "--update", "--dtype", "float32", "--kv-dtype", kv_dtype)
        assert version["blocks_reused"] > 0
        kv, said = stored_kv(tmp_path / kv_dtype / "updated"), answer(capsys, tiny_model_dir)
        monkeypatch.setenv("STARQA_HOME", str(tmp_path / kv_dtype / "fresh"))
        ingest(capsys, tiny_model_dir, source, "--dtype", "float32", "--kv-dtype", kv_dtype)
        fresh = stored_kv(tmp_path / kv_dtype / "fresh")
        if kv_dtype == "int8":  # compare what decoding reads: the dequantized KV
            from starqa.store.kv_quant import dequantize_keys, dequantize_values, group_starts
            for store in (kv, fresh):
                for index, (keys_and_values) in store.items():
                    n = len(keys_and_values) // 4
                    k, v, ks, vs = (keys_and_values[i * n:(i + 1) * n] for i in range(4))
                    starts = group_starts(k[0].shape[1])
                    store[index] = ([dequantize_keys(x, s, starts, torch.float32) for x, s in zip(k, ks)]
                                    + [dequantize_values(x, s, torch.float32) for x, s in zip(v, vs)])
        assert_same_kv(kv, fresh, exact=False)
        assert said == answer(capsys, tiny_model_dir)
        write(tmp_path, V1)


# ------------------------------------------------------------------------------------------------ what is reused


def test_a_block_key_changes_with_everything_its_kv_depends_on_and_nothing_else():
    from starqa.store.reuse import block_keys

    repeated = list(range(500, 564))
    ids = list(range(100, 164)) + repeated + repeated + list(range(900, 908))  # blocks 1 and 2: the same ids
    spans = [(0, 64), (64, 128), (128, 192), (192, 200)]
    signature = {"model_fingerprint": "m", "tokenizer_fingerprint": "t", "prompt_layout_version": 1,
                 "dtype": "float32", "kv_dtype": "bfloat16", "block_size": 64, "anchor_size": 56}
    keys = block_keys(ids, spans, 56, signature)
    assert len(set(keys)) == 4  # blocks 1 and 2 differ by their start only
    for setting, other in (("model_fingerprint", "m2"), ("tokenizer_fingerprint", "t2"),
                           ("prompt_layout_version", 2), ("dtype", "bfloat16"), ("kv_dtype", "float16"),
                           ("kv_dtype", "int8")):
        assert not set(block_keys(ids, spans, 56, dict(signature, **{setting: other}))) & set(keys), setting
    assert block_keys(ids, spans, 56, dict(signature, block_size=96, anchor_size=64)) == keys  # only via the ids
    assert not set(block_keys(ids, spans, 48, signature)) & set(keys)  # another anchor: every block
    edited = ids[:100] + [7] + ids[101:]  # one token of block 1 (offset 100): only block 1's key
    assert [a == b for a, b in zip(block_keys(edited, spans, 56, signature), keys)] == [True, False, True, True]


def test_with_an_anchor_larger_than_the_block_a_key_changes_with_every_anchor_token():
    """Anchor 160 over blocks of 64: an edit inside the anchor, even past block 0, changes every block's key (the
    later blocks attended to it, the head blocks lie in it); an edit past the anchor only its own block's."""
    from starqa.store.reuse import block_keys

    ids = list(range(100, 420))
    spans = [(start, min(start + 64, 320)) for start in range(0, 320, 64)]
    signature = {"model_fingerprint": "m", "tokenizer_fingerprint": "t", "prompt_layout_version": 1,
                 "dtype": "float32", "kv_dtype": "float32"}
    keys = block_keys(ids, spans, 160, signature)
    assert len(set(keys)) == 5
    for offset in (100, 150):  # in block 1 and in block 2, both inside the anchor
        assert not set(block_keys(ids[:offset] + [7] + ids[offset + 1:], spans, 160, signature)) & set(keys)
    past = ids[:200] + [7] + ids[201:]  # block 3, past the anchor
    assert [a == b for a, b in zip(block_keys(past, spans, 160, signature), keys)] == [True, True, True, False, True]
    for other in (64, 128, 192):  # another anchor: no block in common, block 0 included
        assert not set(block_keys(ids, spans, other, signature)) & set(keys)


@pytest.fixture
def api(home, tiny_model_dir):
    """The ingest function with one engine whose Phase 1 work is counted: (ingest(path, **options), engine)."""
    return counting_api(home, tiny_model_dir, anchor_size=56)


@pytest.fixture
def api_large_anchor(home, tiny_model_dir):
    """As `api`, with an anchor of 160 tokens over blocks of 64: blocks 0-2 start inside it (block 2 ends past it)."""
    return counting_api(home, tiny_model_dir, anchor_size=160)


def counting_api(home: Path, tiny_model_dir: Path, *, anchor_size: int):
    from starqa.config import load_settings
    from starqa.engine.star_engine import StarEngine
    from starqa.engine.ingest import ingest as ingest_one
    from starqa.store.document_store import DocumentStore

    settings = load_settings(None, model=str(tiny_model_dir), block_size=64, anchor_size=anchor_size, device="cpu")
    engine = StarEngine.load(str(tiny_model_dir), device="cpu", store_root=home)
    store = DocumentStore(home)
    encoded_tokens = []
    real_encode = engine._encode

    def counting_encode(ids, positions, prefix=None):  # every token Phase 1 runs the model on, anchors included
        encoded_tokens.append(ids.numel())
        return real_encode(ids, positions, prefix)

    engine._encode = counting_encode

    def ingest_file(path: Path, **options):
        before = engine.phase1_blocks_encoded
        encoded_tokens.clear()
        result = ingest_one(str(path), settings, engine, store, name="doc", **options)
        return result, engine.phase1_blocks_encoded - before, sum(encoded_tokens)

    return ingest_file, store


def unchanged_blocks(old_ids: list[int], new_ids: list[int], block: int = 64, anchor: int = 56) -> list[int]:
    """Independently of the keys: the blocks whose tokens, start and anchor tokens are the same in both versions."""
    if old_ids[:anchor] != new_ids[:anchor]:
        return []
    return [index for index, start in enumerate(range(0, len(new_ids), block))
            if old_ids[start:start + block] == new_ids[start:start + block]]


def test_appending_encodes_only_the_last_partial_block_and_the_new_ones(api, tmp_path):
    ingest_file, store = api
    source = write(tmp_path, V1)
    first, blocks, _ = ingest_file(source)
    old_ids = store.get("doc").context_ids()
    assert blocks == first.blocks_encoded == len(first.document.blocks) and first.blocks_reused == 0
    assert len(old_ids) % 64 != 0  # v1's last block is partial
    write(tmp_path, V2)
    second, blocks, tokens = ingest_file(source, update=True)
    new_ids = store.get("doc").context_ids()
    same = unchanged_blocks(old_ids, new_ids)
    assert same == list(range(len(old_ids) // 64))  # every full block of v1, not its partial last one
    assert second.blocks_reused == len(same) and blocks == second.blocks_encoded == len(new_ids) // 64 + 1 - len(same)
    assert reused_flags(second.document.manifest) == [i in same for i in range(len(second.document.blocks))]
    # Nothing taken over is computed again, the anchor included: only the encoded blocks' own tokens ran.
    assert tokens == len(new_ids) - 64 * len(same)
    assert round(second.phase1_s, 3) == second.document.manifest["phase1_s"] > 0


def test_an_unchanged_file_is_skipped_without_extraction_and_force_takes_every_block_over(api, tmp_path,
                                                                                          monkeypatch, capsys):
    import starqa.documents.extraction

    ingest_file, store = api
    source = write(tmp_path, V1)
    ingest_file(source)
    capsys.readouterr()
    before = tree_snapshot(store.root)

    def no_extraction(*args, **kwargs):
        raise AssertionError("an unchanged file was extracted")

    monkeypatch.setattr(starqa.documents.extraction, "extract_document", no_extraction)
    result, blocks, tokens = ingest_file(source, update=True)
    assert (result.phase1_ran, blocks, tokens) == (False, 0, 0)
    assert [line for line in capsys.readouterr().err.splitlines() if line.strip()] == [
        f"'doc' is unchanged ({source}): skipped"]
    assert tree_snapshot(store.root) == before
    monkeypatch.undo()
    forced, blocks, tokens = ingest_file(source, force=True)  # a new version; nothing to encode
    assert forced.phase1_ran and (blocks, tokens) == (0, 0) and forced.blocks_encoded == 0
    assert forced.document.manifest["version"] == 2


def test_an_edit_in_the_anchor_encodes_every_block(api, tmp_path):
    ingest_file, store = api
    source = write(tmp_path, V1)
    ingest_file(source)
    old_ids = store.get("doc").context_ids()
    write(tmp_path, V1.replace("Clause 1. The supplier", "Clause 1. A supplier", 1))  # inside the first 56 tokens
    result, blocks, _ = ingest_file(source, update=True)
    new_ids = store.get("doc").context_ids()
    assert old_ids[56:] == new_ids[56:] and old_ids[:56] != new_ids[:56]  # every block but the first is unchanged
    assert result.blocks_reused == 0 and blocks == len(result.document.blocks) > 5


def test_with_an_anchor_larger_than_the_block_appending_takes_the_head_over_and_an_edit_in_it_nothing(
        api_large_anchor, tmp_path):
    """Anchor 160 over blocks of 64. Appending takes every full block over, the head blocks (0-2) included, and the
    anchor is read from their stored KV (only the encoded blocks' own tokens run). An edit inside the anchor past
    block 0 (block 0's tokens unchanged) takes nothing over: no block computed with the old anchor is reused."""
    ingest_file, store = api_large_anchor
    source = write(tmp_path, V1)
    ingest_file(source)
    old_ids = store.get("doc").context_ids()
    write(tmp_path, V2)
    second, blocks, tokens = ingest_file(source, update=True)
    new_ids = store.get("doc").context_ids()
    same = unchanged_blocks(old_ids, new_ids, anchor=160)
    assert same == list(range(len(old_ids) // 64)) and len(same) > 3
    assert second.blocks_reused == len(same) and blocks == second.blocks_encoded
    assert tokens == len(new_ids) - 64 * len(same)  # the anchor was not encoded again
    edited = V2.replace("report 4 every", "the fourth report every", 1)
    write(tmp_path, edited)
    third, blocks, _ = ingest_file(source, update=True)
    edited_ids = store.get("doc").context_ids()
    assert edited_ids[:64] == new_ids[:64] and edited_ids[:160] != new_ids[:160]  # inside the anchor, past block 0
    assert third.blocks_reused == 0 and blocks == len(third.document.blocks)


def test_a_damaged_block_of_the_previous_version_is_encoded_again(api, tmp_path, capsys):
    ingest_file, store = api
    source = write(tmp_path, V1)
    ingest_file(source)
    block = (store.root / "documents" / "doc").resolve() / "blocks" / "block_00002.safetensors"
    data = bytearray(block.read_bytes())
    data[-7] ^= 0x40
    block.write_bytes(bytes(data))  # its modification time changes, so its checksum is computed again
    capsys.readouterr()
    write(tmp_path, V2)
    result, blocks, _ = ingest_file(source, update=True)
    assert "'doc': the stored files of block(s) 2 do not match their checksums; encoding them again" in \
        capsys.readouterr().err
    assert not result.document.manifest["blocks"][2]["reused"] and result.document.manifest["blocks"][1]["reused"]
    store.check_files(result.document, full=True)


@pytest.mark.parametrize("flags", [("--kv-dtype", "int8"), ("--dtype", "float32"), ("--dtype", "bfloat16"),
                                   ("--block-size", "96", "--anchor-size", "56")],
                         ids=["kv-dtype", "dtype-float32", "dtype-bfloat16", "block-size"])
def test_other_settings_reuse_nothing(capsys, home, tmp_path, tiny_model_dir, flags):
    source = write(tmp_path, V1)
    first = ingest(capsys, tiny_model_dir, source)
    if ("--dtype", first["dtype"]) == flags:
        pytest.skip(f"the stored document is {first['dtype']} already")  # dtype auto chose it on this CPU
    code, _, err = run(capsys, "ingest", source, "--name", "doc", *BLOCK, *flags, "--update", "--model", tiny_model_dir)
    assert code == 0, err
    version = manifest(home)
    assert version["blocks_reused"] == 0 and version["blocks_encoded"] == len(version["blocks"])
    assert version["version"] == 2 and version["history"][1]["blocks_encoded"] == first["blocks_encoded"]


# ------------------------------------------------------------------------------------------ files and the store


def test_taken_over_files_are_hard_links_with_their_checksums_else_copies(capsys, monkeypatch, home, tmp_path,
                                                                          tiny_model_dir):
    import errno

    source = write(tmp_path, V1)
    first = ingest(capsys, tiny_model_dir, source)
    old_folder = (home / "documents" / "doc").resolve()
    inodes = {b["file"]: (old_folder / b["file"]).stat().st_ino for b in first["blocks"]}
    write(tmp_path, V2)
    second = ingest(capsys, tiny_model_dir, source, "--update")
    new_folder = (home / "documents" / "doc").resolve()
    assert not old_folder.exists() and second["blocks_reused"] > 0
    for block in second["blocks"]:
        path = new_folder / block["file"]
        assert (path.stat().st_ino == inodes.get(block["file"])) == block["reused"], block["file"]
        if block["reused"]:
            assert second["files"][block["file"]] == first["files"][block["file"]]
    assert run(capsys, "verify", "doc")[0] == 0

    def no_links(source_path, target_path):  # a store on a file system without hard links
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    inodes = {b["file"]: (new_folder / b["file"]).stat().st_ino for b in second["blocks"]}
    write(tmp_path, V3)
    third = ingest(capsys, tiny_model_dir, source, "--update")
    copies = [b["file"] for b in third["blocks"] if b["reused"]]
    assert copies
    for relative in copies:
        path = (home / "documents" / "doc").resolve() / relative
        assert path.stat().st_ino != inodes[relative] and path.stat().st_nlink == 1
        assert third["files"][relative] == second["files"][relative]
    assert run(capsys, "verify", "doc")[0] == 0


def _spawn(home: Path, *args, env: dict | None = None) -> subprocess.Popen:
    environment = dict(os.environ, STARQA_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "starqa", *map(str, args)], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(condition, process: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"starqa exited ({process.returncode}) before {what}: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_sigkill_during_an_update_leaves_the_previous_version_whole_and_gc_cleans_up(capsys, home, tmp_path,
                                                                                     tiny_model_dir):
    source = write(tmp_path, V1)
    first = ingest(capsys, tiny_model_dir, source)
    said = answer(capsys, tiny_model_dir)
    previous = (home / "documents" / "doc").resolve()
    before = tree_snapshot(home)
    write(tmp_path, V2)
    update = ("ingest", source, "--name", "doc", *BLOCK, "--update", "--model", tiny_model_dir)
    full_blocks = first["context_tokens"] // 64

    # 1. Killed in Phase 1: the unchanged blocks are linked into the staging folder, one new block is written.
    staged = lambda: sum(1 for _ in (home / "objects").glob(".tmp-doc.*/blocks/*.safetensors"))  # noqa: E731
    writer = _spawn(home, *update, env={"STARQA_TEST_PAUSE_AT": f"after-block:{full_blocks + 1}"})
    _kill_when(lambda: staged() >= full_blocks + 1, writer, "the linked blocks and one encoded block")
    assert (previous / "blocks" / "block_00000.safetensors").stat().st_nlink == 2  # shared with the leftover
    assert (home / "documents" / "doc").resolve() == previous
    assert {k: v for k, v in tree_snapshot(home).items() if ".tmp-" not in k} == before
    assert run(capsys, "verify", "doc")[0] == 0 and answer(capsys, tiny_model_dir) == said
    code, _, err = run(capsys, "gc")
    assert code == 0 and "removed 1 leftover item(s)" in err, err
    assert tree_snapshot(home) == before
    assert (previous / "blocks" / "block_00000.safetensors").stat().st_nlink == 1

    # 2. Killed after the new version's folder is complete, before the link swap.
    writer = _spawn(home, *update, env={"STARQA_TEST_PAUSE_AT": "before-link-swap"})
    _kill_when(lambda: len(list((home / "objects").glob("doc.*"))) == 2, writer, "the new object folder")
    assert (home / "documents" / "doc").resolve() == previous and tree_snapshot(home) != before
    assert run(capsys, "verify", "doc")[0] == 0 and answer(capsys, tiny_model_dir) == said
    code, _, err = run(capsys, "gc")
    assert code == 0 and "removed 1 leftover item(s)" in err, err
    assert tree_snapshot(home) == before

    # 3. The next update completes, taking the same blocks over.
    version = ingest(capsys, tiny_model_dir, source, "--update")
    assert version["blocks_reused"] == full_blocks
    assert [p.name for p in (home / "objects").iterdir()] == [(home / "documents" / "doc").resolve().name]


@pytest.mark.slow
@pytest.mark.parametrize("anchor", [(), ("--anchor-size", "160")], ids=["anchor-56", "anchor-160"])
def test_two_cpu_ranks_take_blocks_over_and_encode_only_their_share_of_the_rest(tmp_path, tiny_model_dir, anchor):
    """With an anchor larger than the block too: rank 1 then holds no head block and reads the anchor from the
    head blocks' stored files (or encodes it, in the first ingest)."""
    source = write(tmp_path, V1)
    home, fresh = tmp_path / "home", tmp_path / "fresh"
    flags = ("--name", "doc", *BLOCK, *anchor, "--dtype", "float32", "--device", "cpu", "--model",
             str(tiny_model_dir))
    result = starqa("ingest", str(source), *flags, "--nproc", "2", home=home)
    assert result.returncode == 0, result.stderr
    first = manifest(home)
    inodes = {b["file"]: ((home / "documents" / "doc").resolve() / b["file"]).stat().st_ino for b in first["blocks"]}
    write(tmp_path, V3)
    trace = tmp_path / "trace"  # each rank records the blocks it encodes (tests/rank_trace/sitecustomize.py)
    trace.mkdir()
    result = starqa("ingest", str(source), *flags, "--nproc", "2", "--update", home=home,
                    env={"PYTHONPATH": str(Path(__file__).parent / "rank_trace"), "STARQA_TEST_RANK_TRACE": str(trace)})
    assert result.returncode == 0, result.stderr
    assert re.search(r"blocks reused / encoded\s*\S?\s*(\d+) / (\d+)", result.stderr), result.stderr
    version = manifest(home)
    assert version["nproc"] == 2 and version["blocks_reused"] > 0 and version["blocks_encoded"] >= 2
    # Only their share: the ranks encoded disjoint sets of blocks, each some, together exactly the changed ones.
    encoded = {rank: [index for line in (trace / f"rank-{rank}.jsonl").read_text().splitlines()
                      for index in json.loads(line)] for rank in (0, 1)}
    changed = [index for index, block in enumerate(version["blocks"]) if not block["reused"]]
    assert encoded[0] and encoded[1] and not set(encoded[0]) & set(encoded[1]), encoded
    assert sorted(encoded[0] + encoded[1]) == changed, (encoded, changed)
    for block in version["blocks"]:
        path = (home / "documents" / "doc").resolve() / block["file"]
        assert (path.stat().st_ino == inodes.get(block["file"])) == block["reused"]
    assert starqa("ingest", str(source), *flags, home=fresh).returncode == 0
    assert_same_kv(stored_kv(home), stored_kv(fresh), exact=False)


# -------------------------------------------------------------------------------------------- --update, list, info


def test_update_over_a_glob_skips_unchanged_files_replaces_changed_ones_and_adds_new_ones(capsys, home, tmp_path,
                                                                                          tiny_model_dir):
    folder = tmp_path / "docs"
    folder.mkdir()
    write(folder, V1, "kept.txt")
    write(folder, V1, "changed.txt")
    pattern = str(folder / "*.txt")
    code, _, err = run(capsys, "ingest", pattern, "--update", *BLOCK, "--model", tiny_model_dir)
    assert code == 0, err
    write(folder, V2, "changed.txt")
    write(folder, V3, "new.txt")
    code, out, err = run(capsys, "ingest", pattern, "--update", *BLOCK, "--model", tiny_model_dir)
    assert code == 0 and out == "" and error_lines(err) == [], err
    assert [line for line in err.splitlines() if "unchanged" in line] == [
        f"'kept' is unchanged ({folder / 'kept.txt'}): skipped"]
    assert "ingested 'changed'" in err and "ingested 'new'" in err and "ingested 'kept'" not in err
    versions = {name: manifest(home, name) for name in ("kept", "changed", "new")}
    assert [versions[name]["version"] for name in ("kept", "changed", "new")] == [1, 2, 1]
    assert versions["changed"]["blocks_reused"] > 0 and versions["new"]["blocks_reused"] == 0


def test_list_says_when_and_from_which_file_and_info_keeps_the_last_five_versions(capsys, home, tmp_path,
                                                                                  tiny_model_dir):
    source = write(tmp_path, V1)
    ingest(capsys, tiny_model_dir, source)
    write(tmp_path, V2)
    for _ in range(5):
        current = ingest(capsys, tiny_model_dir, source, "--force")  # each a new version, every block taken over
    assert current["version"] == 6 and current["blocks_encoded"] == 0
    history = current["history"]
    assert len(history) == 5 and history[0]["created"] == current["created"]
    assert [entry["blocks_encoded"] for entry in history[:4]] == [0, 0, 0, 0]  # newest first; v1 has dropped out
    assert history[4]["blocks_encoded"] > 0 and history[4]["blocks_reused"] > 0  # v2: appended to v1
    assert history[4]["context_tokens"] == current["context_tokens"]
    code, out, _ = run(capsys, "list", "--json")
    [row] = json_lines(out)
    assert row["updated"] == current["created"] and row["source"] == str(source.resolve())
    assert row["version"] == 6 and row["first_created"] == current["first_created"]
    code, out, _ = run(capsys, "list")
    assert out.rstrip("\n").endswith(f"\tupdated {current['created']}\tfrom {source.resolve()}")
    code, out, _ = run(capsys, "info", "doc")
    assert f"{current['blocks_reused']} / 0 blocks" in out and out.count("previous version") == 1
    assert len([line for line in out.splitlines() if re.search(r"\d+ reused, \d+ encoded", line)]) == 4
    info = json.loads(run(capsys, "info", "doc", "--json")[1])
    assert info["history"] == history and info["blocks_reused"] == current["blocks_reused"]
