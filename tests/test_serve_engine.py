"""The server's engine thread, in one process (no HTTP): it loads the model it decodes with, so that one thread runs
every parallel region as in `starqa ask`'s own process; an ask that is not streamed is not decoded to text per token
(and sends no event before its answer), and still stops at the next token when its client goes away."""

from __future__ import annotations

import threading

import pytest

from starqa.config import load_settings
from starqa.engine.star_engine import StarEngine
from starqa.engine.ingest import ingest
from starqa.serve import protocol
from starqa.serve.worker import Job, Worker
from starqa.store.document_store import DocumentStore

DOCUMENT = ("Clause 1. The supplier delivers the reports every Tuesday.\n\n"
            "Clause 2. The fee is 4,200 euros per month, payable within thirty days.\n\n") * 3
QUESTION = "What is the fee?"


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_model_dir):
    """Settings and a store holding 'terms', ingested with the tiny model."""
    home = tmp_path_factory.mktemp("serve-engine") / "home"
    settings = load_settings(model=str(tiny_model_dir), dtype="float32", block_size=48, store=str(home),
                             max_new_tokens=8)
    source = home.parent / "terms.txt"
    source.write_text(DOCUMENT)
    store = DocumentStore(settings.store)
    ingest(str(source), settings, StarEngine.from_settings(settings), store, name="terms")
    return settings, store


class Spied:
    """The engine a worker loads, with the thread that loaded it, the threads that decoded with it, the calls of its
    tokenizer's `decode` and its decoding steps counted."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.loaded_in: threading.Thread | None = None
        self.decoded_in: set[threading.Thread] = set()
        self.text_decodes = 0
        self.steps = 0
        self.before_decoding = lambda: None

    def load(self):
        self.loaded_in = threading.current_thread()
        engine = StarEngine.from_settings(self.settings)
        generate_batch, step, decode = engine.generate_batch, engine._step, engine.tokenizer.decode

        def spied_generate_batch(*args, **kwargs):
            self.decoded_in.add(threading.current_thread())
            self.before_decoding()
            return generate_batch(*args, **kwargs)

        def spied_step(*args, **kwargs):
            self.steps += 1
            return step(*args, **kwargs)

        def spied_decode(*args, **kwargs):
            self.text_decodes += 1
            return decode(*args, **kwargs)

        engine.generate_batch, engine._step, engine.tokenizer.decode = spied_generate_batch, spied_step, spied_decode
        return engine


def _answer(worker: Worker, settings, **body) -> tuple[list[dict], Job]:
    """Submit one ask and wait for its events (deadline: a busy machine)."""
    received: list[dict] = []
    finished = threading.Event()

    def deliver(event):
        if event is None:
            finished.set()
        else:
            received.append(event)

    request = protocol.parse_ask({"doc": "terms", "question": QUESTION, **body}, settings, False)
    job = Job(request, deliver)
    worker.submit(job)
    assert finished.wait(300), "the ask was not answered"
    return received, job


@pytest.fixture
def served(stored):
    settings, store = stored
    spied = Spied(settings)
    worker = Worker(spied.load, settings, store, trust_remote_code=False, log=lambda line: None)
    worker.start()
    yield worker, spied, settings
    worker.stop()
    worker.join(30)


def test_the_engine_thread_loads_the_model_it_decodes_with(served):
    worker, spied, settings = served
    assert spied.loaded_in is worker._thread and spied.loaded_in is not threading.current_thread()
    events, _ = _answer(worker, settings)
    assert [event["type"] for event in events][-1] == "done" and events[-1]["exit_code"] == 0
    assert spied.decoded_in == {spied.loaded_in}


def test_a_failing_load_is_raised_by_start(stored):
    settings, store = stored

    def load():
        raise RuntimeError("no such model")

    worker = Worker(load, settings, store, trust_remote_code=False, log=lambda line: None)
    with pytest.raises(RuntimeError, match="no such model"):
        worker.start()


def test_an_ask_not_streamed_is_decoded_to_text_once_with_the_same_answer(served):
    worker, spied, settings = served
    streamed, _ = _answer(worker, settings, stream=True)
    per_token = spied.text_decodes
    spied.text_decodes = 0
    whole, _ = _answer(worker, settings, stream=False)
    answer = next(event for event in whole if event["type"] == "answer")
    assert answer["text"] == next(event for event in streamed if event["type"] == "answer")["text"]
    tokens = answer["answer"]["answer_tokens"]
    assert tokens >= 4  # (the tiny random model rarely stops early; fewer would make this test weak)
    assert "delta" in {event["type"] for event in streamed}
    assert "delta" not in {event["type"] for event in whole}
    # Streamed: the text so far is decoded after each token; not streamed: not once per token.
    assert spied.text_decodes <= per_token - (tokens - 1), (spied.text_decodes, per_token, tokens)


def test_an_ask_not_streamed_stops_at_the_next_token_when_its_client_goes_away(served):
    worker, spied, settings = served
    # A first ask calibrates the model's retrieval heads when this process's store has none recorded yet (6 short
    # generations: 144 steps that no client can cancel); the hook below must see the cancelled ask's decoding only.
    _answer(worker, settings, stream=False)
    spied.steps = 0
    jobs: list[Job] = []
    spied.before_decoding = lambda: jobs[0].cancelled.set()  # the client goes away as decoding begins
    original = worker.submit
    worker.submit = lambda job: (jobs.append(job), original(job))
    before = worker.counts["cancelled"]
    events, _ = _answer(worker, settings, stream=False, max_new_tokens=200)
    assert worker.counts["cancelled"] == before + 1
    assert "answer" not in {event["type"] for event in events}
    assert spied.steps <= 3, spied.steps  # the prefill and a step or two, not 200


def test_an_ask_for_other_weights_or_activations_than_the_servers_is_answered_by_its_own_process(served):
    worker, _, settings = served
    other = "int8" if settings.weights != "int8" else "bfloat16"
    request = protocol.parse_ask({"doc": "terms", "question": QUESTION, "weights": other}, settings, False)
    with pytest.raises(protocol.RequestError) as refused:
        worker.prepare(request)
    assert refused.value.status == 409 and f"--weights {other}" in refused.value.message
    other = "int8" if settings.activations != "int8" else "bfloat16"
    request = protocol.parse_ask({"doc": "terms", "question": QUESTION, "activations": other}, settings, False)
    with pytest.raises(protocol.RequestError) as refused:
        worker.prepare(request)
    assert refused.value.status == 409 and f"--activations {other}" in refused.value.message
    with pytest.raises(protocol.RequestError) as refused:
        protocol.parse_ask({"doc": "terms", "question": QUESTION, "activations": "int4"}, settings, False)
    assert refused.value.status == 400 and "activations" in refused.value.message
    worker.prepare(protocol.parse_ask({"doc": "terms", "question": QUESTION}, settings, False))  # its own: served
