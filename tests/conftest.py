"""Shared fixtures: tiny random-weight models (built from a config, with the bundled model's tokenizer) and an
isolated store per test. The real bundled model is converted once per test session into a shared store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

TINY_CONFIGS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", use_sliding_window=False),
}


def tiny_config(architecture: str = "llama", **changes):
    from transformers import AutoConfig

    values = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=True, rope_theta=10000.0,
    )
    values.update({k: v for k, v in TINY_CONFIGS[architecture].items() if k != "model_type"})
    values.update(changes)
    return AutoConfig.for_model(TINY_CONFIGS[architecture]["model_type"], **values)


def tiny_model(architecture: str = "llama", seed: int = 0, **changes):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, **changes), dtype=torch.float32)
    # Larger random weights than the init default make logits less flat, so greedy paths are not ties.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def bundled_tokenizer():
    from transformers import AutoTokenizer

    from starqa.model.resolve import bundled_gguf_path

    path = bundled_gguf_path("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_tokenizer) -> Path:
    """A tiny random-weight Llama saved as an HF directory, usable as `--model DIR` in CLI tests."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(directory)
    bundled_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory):
    """A store shared by the tests that need the real bundled model, so it is converted once. Removed when the
    session ends: converted models are hundreds of MB, and the CI machine's disk is shared and can run short."""
    root = tmp_path_factory.mktemp("starqa-shared-home")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty store for one test, as STARQA_HOME."""
    root = tmp_path / "home"
    monkeypatch.setenv("STARQA_HOME", str(root))
    return root


@pytest.fixture(scope="session")
def bundled_engine(shared_home):
    from starqa.engine.star_engine import StarEngine

    return StarEngine.load("smollm2-135m", device="cpu", dtype="float32", store_root=shared_home)


@pytest.fixture(scope="session")
def bundled_heads(bundled_engine):
    """The bundled model's retrieval heads, calibrated once per session and recorded in the shared store (so that
    `starqa` processes using that store read the record instead of calibrating again)."""
    from starqa.evidence.heads import retrieval_heads

    return retrieval_heads(bundled_engine)


# The suite runs on the tiny bundled model unless a test names another: the default catalogue model is a
# 1.5B that takes a minute to convert and seconds per answer (tests/test_catalogue.py covers it).
TEST_MODEL = "smollm2-135m"
os.environ["STARQA_MODEL"] = TEST_MODEL  # at import: session-scoped fixtures (shared servers) start before autouse ones


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("STARQA_MODEL", TEST_MODEL)
    os.environ.pop("NO_COLOR", None)
    # `--quiet` is process state: an in-process `cli.main([..., "--quiet"])` earlier on this worker would otherwise
    # silence the messages a later test reads from stderr (which tests share a worker depends on the run).
    from starqa import report

    report.set_quiet(False)


def planted_number_prompts(tokenizer):
    """(number, context ids, query ids) of three short documents, each with one planted "magic number" at 20, 50 and
    80 % depth: the needles the precision tests (KV dtype, decode weights) ask the bundled model to find."""
    from starqa.documents.tokens import context_ids_for, encode_document, prompt_template, query_ids_for

    template = prompt_template(tokenizer)
    filler = ("The committee reviewed the quarterly figures and agreed to meet again after the audit. "
              "Minutes were circulated to every member of the board. ") * 6
    query = query_ids_for(tokenizer, template, "What is the special magic number?")
    for number, depth in ((48213, 0.2), (73519, 0.5), (90264, 0.8)):
        cut = int(len(filler) * depth)
        text = f"{filler[:cut]}The special magic number is {number}. {filler[cut:]}"
        yield number, context_ids_for(tokenizer, template, encode_document(tokenizer, text)), query
