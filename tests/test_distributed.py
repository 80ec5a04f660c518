"""Distributed Star Attention (gloo CPU processes): the merge, the block plan, and the CLI under torchrun."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clihelp import REPO, json_lines, starqa, tree_snapshot
from conftest import tiny_model
from starqa.attention import attention_with_lse
from starqa.engine.distributed import DEFAULT_TIMEOUT_S, Ranks, block_plan, merge_across_ranks, phase2_spread
from starqa.engine.star_engine import StarEngine
from starqa.documents.tokens import plan_blocks
from test_engine import _NoTokenizer, _random_ids


@pytest.mark.parametrize("n_blocks,world", [(1, 1), (5, 2), (7, 3), (2, 3), (8, 4)])
def test_block_plan_gives_each_rank_a_contiguous_run_in_order(n_blocks, world):
    plans = [block_plan(n_blocks, world, rank) for rank in range(world)]
    assert [index for plan in plans for index in plan] == list(range(n_blocks))
    assert 0 in plans[0]
    assert max(map(len, plans)) - min(map(len, plans)) <= 1


def _merge_worker(rank, world, init_file, shards, result_path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    q, k, v = torch.load(shards)  # test data written by the parent test (trusted, made in this test)
    bounds = torch.linspace(0, k.shape[2], world + 1).long().tolist()
    if world == 3:
        bounds = [0, 0, k.shape[2] // 2, k.shape[2]]  # rank 0 holds an empty shard
    lo, hi = bounds[rank], bounds[rank + 1]
    out, lse = attention_with_lse(q, k[:, :, lo:hi], v[:, :, lo:hi], causal=False)
    merged_out, merged_lse = merge_across_ranks(out, lse)
    if rank == world - 1:
        torch.save((merged_out, merged_lse), result_path)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_merge_across_ranks_equals_single_pass_attention(tmp_path, world):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 3, 16, generator=generator)
    k = torch.randn(1, 2, 40, 16, generator=generator)
    v = torch.randn(1, 2, 40, 16, generator=generator)
    torch.save((q, k, v), tmp_path / "shards.pt")
    mp.spawn(_merge_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "shards.pt"),
                                  str(tmp_path / "result.pt")), nprocs=world, join=True)
    merged_out, merged_lse = torch.load(tmp_path / "result.pt")
    out, lse = attention_with_lse(q, k, v, causal=False)
    torch.testing.assert_close(merged_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse, lse, rtol=1e-5, atol=1e-5)


_CONTEXT = _random_ids(230)
_QUERY = [11, 22, 33, 44, 55]


def _phase2_logits(engine, ctx, **spread):
    """Greedy Phase 2 (8 tokens), returning the tokens and the logits of every step (prefill included)."""
    logits, step = [], engine._step

    def recording_step(*args):
        logits.append(step(*args))
        return logits[-1]
    engine._step = recording_step
    tokens = engine.generate(ctx, _QUERY, max_new_tokens=8, **spread)
    return tokens, torch.stack(logits)


def _phase2_worker(rank, world, init_file, result_path, device="cpu"):
    """One rank of Phase 2: gloo on CPU processes, or NCCL with one GPU per rank (device "cuda", tests/test_gpu.py)."""
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    ranks = Ranks(rank=rank, world=world, device=device, group=dist.group.WORLD)
    engine = StarEngine(tiny_model("llama").to(device), _NoTokenizer())
    spans = plan_blocks(len(_CONTEXT), 48)
    mine = block_plan(len(spans), world, rank)
    blocks = engine.encode_blocks(_CONTEXT, 48, 32, block_indices=mine)  # Phase 1 of this rank's blocks only
    ctx = engine.context_from_blocks(blocks, len(_CONTEXT), sum(spans[i][1] - spans[i][0] for i in mine))
    tokens, logits = _phase2_logits(engine, ctx, **phase2_spread(ranks))  # as `starqa ask` spreads it
    torch.save((tokens, logits.cpu()), f"{result_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_phase2_on_ranks_gives_the_logits_of_one_process(tmp_path, world):
    """Each rank holds only its blocks; every step's logits equal one process holding all of them."""
    mp.spawn(_phase2_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=world,
             join=True)
    engine = StarEngine(tiny_model("llama"), _NoTokenizer())
    tokens, logits = _phase2_logits(engine, engine.encode_context(_CONTEXT, 48, 32))
    assert len(plan_blocks(len(_CONTEXT), 48)) == 5  # 2 ranks hold 3 + 2 blocks, 3 ranks 2 + 2 + 1
    for rank in range(world):  # every rank continues with the same tokens and computes the same logits
        rank_tokens, rank_logits = torch.load(tmp_path / f"result.{rank}")
        assert rank_tokens == tokens
        torch.testing.assert_close(rank_logits, logits, rtol=1e-5, atol=2e-5)  # seen: 7e-6 of logits up to 7


DOCUMENT = (
    "Clause 1. The supplier delivers the reports every Tuesday.\n\n"
    "Clause 2. Either party may end this agreement with ninety days of written notice.\n\n"
    "Clause 3. The fee is 4,200 euros per month, payable within thirty days.\n\n"
) * 4


@pytest.fixture
def doc_file(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text(DOCUMENT)
    return path


def _ask_json(home, model_dir, nproc, *extra):
    result = starqa("ask", "--doc", "terms", "What is the fee?", "--json", "--max-new-tokens", "8",
                    "--nproc", str(nproc), "--model", str(model_dir), *extra, home=home)
    assert result.returncode == 0, result.stderr
    return json_lines(result.stdout)[0]["answer"]


@pytest.mark.slow
def test_two_ranks_answer_token_for_token_like_one(tmp_path, doc_file, tiny_model_dir):
    answers = {}
    for nproc in (1, 2):
        home = tmp_path / f"home{nproc}"
        # float32: the same tokens from any number of ranks (in bfloat16 their partial sums round differently)
        result = starqa("ingest", str(doc_file), "--block-size", "48", "--nproc", str(nproc), "--dtype", "float32",
                        "--model", str(tiny_model_dir), home=home)
        assert result.returncode == 0, result.stderr
        manifest = json.loads(next(home.glob("objects/terms.*/manifest.json")).read_text())
        assert manifest["nproc"] == nproc  # Phase 1 really ran on this many ranks
        answers[nproc] = _ask_json(home, tiny_model_dir, nproc)
    assert answers[1] == answers[2] != ""
    # A cache written by 2 ranks is read by 1 and by 3, and one written by 1 is read by 2.
    assert _ask_json(tmp_path / "home2", tiny_model_dir, 1) == answers[1]
    assert _ask_json(tmp_path / "home2", tiny_model_dir, 3) == answers[1]
    assert _ask_json(tmp_path / "home1", tiny_model_dir, 2) == answers[1]


@pytest.mark.parametrize("args", [("--help",), ("ask", "--doc", "nosuch", "What?"), ("gc",)])
def test_a_torchrun_rank_ends_with_its_exit_code_and_all_its_output(tmp_path, args):
    # Ranks end with os._exit (no interpreter finalization, see distributed.exit_rank): piped output must still be
    # flushed and the exit code kept, exactly as the same command outside torchrun.
    rank_env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    plain = starqa(*args, home=tmp_path / "home")
    as_rank = starqa(*args, home=tmp_path / "home", env=rank_env)
    assert (as_rank.returncode, as_rank.stdout, as_rank.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert as_rank.stdout or as_rank.stderr


def test_questions_from_stdin_and_usage_errors_keep_their_meaning_on_two_ranks(tmp_path, doc_file, tiny_model_dir):
    home = tmp_path / "home"
    assert starqa("ingest", str(doc_file), "--block-size", "48", "--dtype", "float32", "--model", str(tiny_model_dir),
                  home=home).returncode == 0
    questions = "What is the fee?\nWhen are the reports delivered?\n"
    answers = {}
    for nproc in (1, 2):  # standard input is read once, by the launching process, and reaches every rank
        result = starqa("ask", "--doc", "terms", "--questions", "-", "--json", "--max-new-tokens", "6", "--nproc",
                        str(nproc), "--model", str(tiny_model_dir), home=home, stdin=questions)
        assert result.returncode == 0, result.stderr
        answers[nproc] = [(row["question"], row["answer"]) for row in json_lines(result.stdout)]
    assert answers[2] == answers[1] and len(answers[1]) == 2
    result = starqa("ask", "--doc", "nosuch", "What?", "--nproc", "2", home=home)
    assert result.returncode == 2, result.stderr  # a usage error exits 2 under the launcher too
    assert "no document named 'nosuch'" in result.stderr


def test_full_attention_runs_in_one_process_whatever_nproc_asks(tmp_path, doc_file, tiny_model_dir):
    # One full-attention pass cannot be shared by ranks; with --nproc 2 each rank would only repeat it.
    answers = []
    for nproc in (1, 2):
        home = tmp_path / f"home{nproc}"
        result = starqa("ask", "--doc", str(doc_file), "What is the fee?", "--attention", "full", "--json",
                        "--max-new-tokens", "8", "--block-size", "48", "--nproc", str(nproc),
                        "--model", str(tiny_model_dir), home=home)
        assert result.returncode == 0, result.stderr
        assert "rank 1" not in result.stderr
        answers.append(json_lines(result.stdout)[0]["answer"])
        manifest = json.loads(next(home.glob("objects/terms.*/manifest.json")).read_text())
        assert manifest["nproc"] == 1  # the file was ingested in the same single process
    assert answers[0] == answers[1]


@pytest.mark.slow
def test_more_ranks_than_blocks_answer_like_one(tmp_path, doc_file, tiny_model_dir):
    """A rank with no block of its own (3 ranks, 2 blocks) encodes nothing and adds nothing to the merge."""
    home = tmp_path / "home"
    result = starqa("ingest", str(doc_file), "--block-size", "160", "--nproc", "3", "--model", str(tiny_model_dir),
                    home=home)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(next(home.glob("objects/terms.*/manifest.json")).read_text())
    assert len(manifest["blocks"]) == 2 and manifest["nproc"] == 3
    assert _ask_json(home, tiny_model_dir, 3) == _ask_json(home, tiny_model_dir, 1) != ""


@pytest.mark.slow
def test_a_rank_failing_in_phase1_fails_the_command_and_leaves_the_store_unchanged(tmp_path, doc_file,
                                                                                    tiny_model_dir):
    home = tmp_path / "home"
    assert starqa("ingest", str(doc_file), "--name", "kept", "--block-size", "48", "--model",
                  str(tiny_model_dir), home=home).returncode == 0
    before = tree_snapshot(home)
    started = time.monotonic()
    # The subprocess may outlive the collective timeout, so that a rank left waiting for the failed one ends there,
    # with its error, and the bound below is what fails (it could never fail under a subprocess timeout of 240 s).
    result = starqa("ingest", str(doc_file), "--name", "lost", "--block-size", "48", "--nproc", "2",
                    "--model", str(tiny_model_dir), home=home, env={"STARQA_FAIL_PHASE1_RANK": "1"},
                    timeout=DEFAULT_TIMEOUT_S + 120)
    elapsed = time.monotonic() - started
    assert elapsed < 240, f"a rank failing in Phase 1 took {elapsed:.0f} s to end the command (collectives " \
                          f"time out after {DEFAULT_TIMEOUT_S} s)"
    assert result.returncode == 1, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("starqa: error:")]
    assert "rank 1" in line and "Phase 1" in line and "RuntimeError: injected failure (STARQA_FAIL" in line, line
    assert result.stderr.endswith(line + "\n") and "Traceback" not in result.stderr
    assert tree_snapshot(home) == before


@pytest.mark.slow
def test_two_ranks_answer_like_one_with_the_bundled_model(tmp_path, doc_file, shared_home, bundled_heads):
    # The shared store already holds the converted bundled model and its retrieval heads (the fixtures put them
    # there once per session).
    answers = []
    for nproc in (1, 2):
        result = starqa("ask", "--doc", str(doc_file), "--name", f"terms{nproc}", "What is the fee?", "--json",
                        "--block-size", "64", "--max-new-tokens", "12", "--nproc", str(nproc), home=shared_home)
        assert result.returncode == 0, result.stderr
        row = json_lines(result.stdout)[0]
        assert row["cache_hit"] is False
        answers.append(row["answer"])
    assert answers[0] == answers[1]
    assert "4,200" in answers[0] or "4200" in answers[0]


def _fake_launcher(monkeypatch, outcome):
    import torch.distributed.launcher.api as launcher_api

    def elastic_launch(config, entrypoint):
        def run(*args):
            if outcome is not None:
                raise outcome
        return run

    monkeypatch.setattr(launcher_api, "elastic_launch", elastic_launch)


def test_ctrl_c_or_sigterm_to_the_launcher_is_one_line_and_exit_130(monkeypatch, capsys):
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from starqa.engine.distributed import launch

    _fake_launcher(monkeypatch, SignalException("Process 1 got signal: 2", sigval=2))
    assert launch(2, ["ingest", "x.txt"], "cpu") == 130
    assert capsys.readouterr().err == "starqa: error: interrupted\n"


def test_cpu_ranks_are_not_limited_by_the_visible_gpus(monkeypatch):
    from starqa.engine.distributed import launch
    from starqa.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _fake_launcher(monkeypatch, None)
    assert launch(2, ["ingest", "x.txt", "--device", "cpu"], "cpu") == 0
    with pytest.raises(UsageError, match="more processes than the 1 visible GPUs"):
        launch(2, ["ingest", "x.txt"], "auto")


@pytest.mark.parametrize("cuda,device,nproc,expected", [
    (True, "auto", "auto", 4), (True, "cuda", "auto", 4), (True, "cpu", "auto", 1), (True, "cuda:1", "auto", 1),
    (False, "auto", "auto", 1), (True, "cpu", 3, 3), (False, "cpu", "2", 2),
])
def test_nproc_auto_follows_the_device(monkeypatch, cuda, device, nproc, expected):
    """`auto` means one rank per GPU only where the work runs on the GPUs (`--device cpu` gave 4 CPU ranks)."""
    from starqa.engine.distributed import requested_nproc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4 if cuda else 0)
    assert requested_nproc(nproc, device) == expected
