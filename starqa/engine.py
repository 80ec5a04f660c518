"""Phase 1 (blockwise context encoding with an anchor) and Phase 2 (query encoding and decoding) of Star Attention.

    engine = StarEngine.load("smollm2-135m", device="cpu", dtype="float32")
    ctx = engine.encode_context(context_ids, block_size=256, anchor_size=256)   # Phase 1
    ids = engine.generate(ctx, query_ids, max_new_tokens=24)                    # Phase 2, greedy

Phase 1: block 0 is encoded alone; block i > 0 is encoded after the anchor (the first anchor_size context tokens) at
its global positions, and only its own KV is kept. Because attention is causal, the anchor's KV does not depend on
what follows it, so it is computed once (as the head of block 0, or alone on a process that does not hold block 0)
and every later block attends to it as a prefix: exactly `[anchor, block]` encoded directly, without re-encoding the
anchor per block. Phase 2: the query attends to all context KV and causally to itself; see hf_hook.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from starqa import hf_hook
from starqa.attention import backend_problem
from starqa.errors import StarqaError, UsageError
from starqa.tokens import plan_blocks


@dataclass
class EncodedBlock:
    """One context block's KV, as Phase 1 produces it and the store keeps it."""

    index: int
    start: int  # global token offset in the context
    end: int
    keys: list[torch.Tensor]  # per layer [kv_heads, end - start, head_dim]
    values: list[torch.Tensor]


@dataclass
class ContextKV:
    """The context KV one process holds for Phase 2: its blocks, laid out contiguously per layer."""

    n_tokens: int  # length of the whole context: query positions start here
    spans: list[tuple[int, int]]  # global [start, end) of each block held, in order
    keys: list[torch.Tensor]  # per layer [1, kv_heads, held_tokens, head_dim]
    values: list[torch.Tensor]


@dataclass
class GenerationStats:
    prefill_s: float = 0.0  # Phase 2 prefill (or the full-attention pass) of the prompt
    ttft_s: float = 0.0  # from the start of the prefill to the first answer token
    decode_s: float = 0.0  # the tokens after the first
    new_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        later = self.new_tokens - 1
        return later / self.decode_s if later > 0 and self.decode_s > 0 else 0.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class StarEngine:
    """A causal LM with Star Attention on its forward path; see the module docstring."""

    def __init__(self, model, tokenizer, *, model_name: str = "", model_dir: Path | None = None,
                 attention_backend: str = "auto", store_root: Path | None = None) -> None:
        from starqa.models import check_architecture

        check_architecture(model.config)
        model.set_attn_implementation(hf_hook.ATTN_IMPLEMENTATION)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_dir = model_dir
        self.store_root = store_root  # where the tokenizer check is recorded (None: not recorded)
        self.attention_backend = attention_backend
        config = model.config
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.stop_ids = self._stop_token_ids()
        self.last_stats = GenerationStats()
        self.phase1_blocks_encoded = 0  # counts real Phase 1 work (tests assert a cache hit skips it)
        self._fingerprints: dict[str, str] = {}
        self._text_encoder = None  # built on first use: ask does not need it

    # ---------------------------------------------------------------- identity and tokenization

    @property
    def model_fingerprint(self) -> str:
        if "model" not in self._fingerprints:
            from starqa.models import model_fingerprint, parameters_fingerprint

            self._fingerprints["model"] = (model_fingerprint(self.model_dir) if self.model_dir is not None
                                           else parameters_fingerprint(self.model))
        return self._fingerprints["model"]

    @property
    def tokenizer_fingerprint(self) -> str:
        if "tokenizer" not in self._fingerprints:
            from starqa.models import tokenizer_fingerprint

            self._fingerprints["tokenizer"] = tokenizer_fingerprint(self.tokenizer)
        return self._fingerprints["tokenizer"]

    @property
    def context_window(self) -> int:
        from starqa.models import model_context_window

        return model_context_window(self.config)

    @property
    def sliding_window(self) -> int | None:
        from starqa.models import model_sliding_window

        return model_sliding_window(self.config)

    @property
    def text_encoder(self):
        """Document tokenization: tiktoken when checked identical to the HF tokenizer, else the HF tokenizer.

        The check runs on the model's first use and its outcome is recorded (see `_tokenizer_check_record`)."""
        if self._text_encoder is None:
            from starqa.fast_tokenizer import text_encoder_for

            self._text_encoder = text_encoder_for(self.tokenizer, self._tokenizer_check_record())
        return self._text_encoder

    def _tokenizer_check_record(self) -> Path | None:
        """A model converted into the store's models/ folder keeps the record in its own folder; a user's model
        directory is never written to: its record goes to a file in models/ keyed like every record."""
        if self.store_root is None:
            return None
        from starqa.fast_tokenizer import RECORD_FILE_NAME

        models_root = Path(self.store_root) / "models"
        if self.model_dir is not None and Path(self.model_dir).resolve().parent == models_root.resolve():
            return Path(self.model_dir) / RECORD_FILE_NAME
        return models_root / RECORD_FILE_NAME

    @property
    def tokenizer_engine(self) -> str:
        """The engine `encode_document_text` uses, "tiktoken" or "hf"; both give the same ids."""
        return self.text_encoder.engine

    @property
    def tokenizer_engine_reason(self) -> str:
        """Why the HF tokenizer is used instead of tiktoken ("" when tiktoken is)."""
        return self.text_encoder.reason

    def encode_document_text(self, text: str) -> list[int]:
        """Ids of document text: exactly `starqa.tokens.encode_document` (special-token strings are plain text)."""
        return self.text_encoder.encode(text)

    @classmethod
    def load(cls, model: str = "smollm2-135m", *, device: str = "auto", dtype: str = "auto",
             store_root: Path | str | None = None, attention_backend: str = "auto",
             trust_remote_code: bool = False, on_status: Callable[[str], None] | None = None) -> "StarEngine":
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from starqa import models

        # Our own progress and messages go to stderr through starqa.report; transformers' bars would only add noise.
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        from starqa.store import default_store_root

        root = Path(store_root) if store_root is not None else default_store_root()
        torch_device = resolve_device(device)
        problem = backend_problem(attention_backend, torch_device)
        if problem is not None:
            raise UsageError(problem)
        source = models.ensure_converted(models.resolve_model(model, root / "models"), on_status=on_status)
        torch_dtype = resolve_dtype(dtype, torch_device)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.directory, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
        models.check_architecture(config)
        hf_model = AutoModelForCausalLM.from_pretrained(
            source.directory, dtype=torch_dtype, attn_implementation=hf_hook.ATTN_IMPLEMENTATION,
            local_files_only=True, trust_remote_code=trust_remote_code,
        ).to(torch_device)
        tokenizer = AutoTokenizer.from_pretrained(source.directory, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
        return cls(hf_model, tokenizer, model_name=source.name, model_dir=source.directory,
                   attention_backend=attention_backend, store_root=root)

    @classmethod
    def from_settings(cls, settings, model: str | None = None, *, device: str | None = None,
                      trust_remote_code: bool = False,
                      on_status: Callable[[str], None] | None = None) -> "StarEngine":
        """`load` as the commands do: model, dtype, device, store and backend from a starqa.config.Settings, where
        `model` and `device` (a rank's GPU) override the settings'."""
        from starqa.store import DocumentStore

        name = model or settings.model
        if on_status is not None:
            on_status(f"loading model {name}")
        return cls.load(name, device=device or settings.device, dtype=settings.dtype,
                        store_root=DocumentStore(settings.store).root, attention_backend=settings.attention_backend,
                        trust_remote_code=trust_remote_code, on_status=on_status)

    def _stop_token_ids(self) -> set[int]:
        stop: set[int] = set()
        generation_config = getattr(self.model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
        if eos is None:
            eos = self.config.eos_token_id
        if isinstance(eos, int):
            stop.add(eos)
        elif eos:
            stop.update(int(token) for token in eos)
        if self.tokenizer.eos_token_id is not None:
            stop.add(int(self.tokenizer.eos_token_id))
        return stop

    # ---------------------------------------------------------------- forward passes

    def _new_cache(self, *, batch: int, capacity: int, prefix: tuple[list, list] | None = None,
                   keep_local: bool = True, merge_across_ranks=None) -> hf_hook.StarCache:
        return hf_hook.StarCache(
            num_layers=self.num_layers, batch=batch, kv_heads=self.kv_heads, head_dim=self.head_dim,
            capacity=capacity, dtype=self.dtype, device=self.device,
            prefix_keys=prefix[0] if prefix else None, prefix_values=prefix[1] if prefix else None,
            keep_local=keep_local, merge_across_ranks=merge_across_ranks, backend=self.attention_backend,
        )

    @torch.inference_mode()
    def _encode(self, ids: torch.Tensor, positions: torch.Tensor, prefix=None) -> hf_hook.StarCache:
        """Run the decoder (no LM head) over ids [batch, n] at positions [batch, n]; the cache holds their KV."""
        cache = self._new_cache(batch=ids.shape[0], capacity=ids.shape[1], prefix=prefix)
        self.model.base_model(input_ids=ids, position_ids=positions, cache=cache, star_cache=cache, use_cache=True)
        cache.advance(ids.shape[1])
        return cache

    @torch.inference_mode()
    def _step(self, cache: hf_hook.StarCache, token_ids: Sequence[int], first_position: int) -> torch.Tensor:
        """Encode tokens after those in the cache; returns the next-token logits [vocab] (float32)."""
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(first_position, first_position + len(token_ids), device=self.device)[None]
        output = self.model(input_ids=ids, position_ids=positions, cache=cache, star_cache=cache,
                            use_cache=True, logits_to_keep=1)
        cache.advance(len(token_ids))
        return output.logits[0, -1].float()

    # ---------------------------------------------------------------- Phase 1

    def encode_blocks(self, context_ids: Sequence[int], block_size: int, anchor_size: int | None = None, *,
                      block_indices: Iterable[int] | None = None, batch: int = 4) -> Iterator[EncodedBlock]:
        """Phase 1 for the given blocks (all by default), yielding each block's KV in index order."""
        anchor_size = block_size if anchor_size is None else anchor_size
        if block_size <= 0 or anchor_size <= 0 or anchor_size > block_size:
            raise ValueError(f"need 0 < anchor_size ({anchor_size}) <= block_size ({block_size})")
        if not context_ids:
            raise ValueError("the context is empty")
        spans = plan_blocks(len(context_ids), block_size)
        wanted = sorted(set(range(len(spans)) if block_indices is None else block_indices))
        ids = torch.tensor(list(context_ids), dtype=torch.long, device=self.device)
        anchor_len = min(anchor_size, len(context_ids))

        anchor_kv = None
        if 0 in wanted:
            start, end = spans[0]
            cache = self._encode(ids[None, start:end], torch.arange(start, end, device=self.device)[None])
            self.phase1_blocks_encoded += 1
            yield self._block_from_cache(0, spans[0], cache, row=0)
            anchor_kv = ([k[:, :, :anchor_len] for k in cache.keys], [v[:, :, :anchor_len] for v in cache.values])
        later = [index for index in wanted if index > 0]
        if later and anchor_kv is None:  # this process does not hold block 0: encode the anchor itself
            cache = self._encode(ids[None, :anchor_len], torch.arange(anchor_len, device=self.device)[None])
            anchor_kv = (cache.keys, cache.values)

        for group in _equal_length_batches(later, spans, batch):
            length = spans[group[0]][1] - spans[group[0]][0]
            block_ids = torch.stack([ids[spans[i][0] : spans[i][1]] for i in group])  # [batch, length]
            offsets = torch.tensor([spans[i][0] for i in group], device=self.device)[:, None]
            positions = offsets + torch.arange(length, device=self.device)[None]  # global position ids
            cache = self._encode(block_ids, positions, prefix=anchor_kv)
            self.phase1_blocks_encoded += len(group)
            for row, index in enumerate(group):
                yield self._block_from_cache(index, spans[index], cache, row=row)

    @staticmethod
    def _block_from_cache(index: int, span: tuple[int, int], cache: hf_hook.StarCache, row: int) -> EncodedBlock:
        return EncodedBlock(
            index=index, start=span[0], end=span[1],
            keys=[k[row].clone() for k in cache.keys], values=[v[row].clone() for v in cache.values],
        )

    def encode_context(self, context_ids: Sequence[int], block_size: int, anchor_size: int | None = None, *,
                       batch: int = 4) -> ContextKV:
        """Phase 1 over the whole context, in this process."""
        held = sum(end - start for start, end in plan_blocks(len(context_ids), block_size))
        blocks = self.encode_blocks(context_ids, block_size, anchor_size, batch=batch)
        return self.context_from_blocks(blocks, len(context_ids), held)

    def context_from_blocks(self, blocks: Iterable[EncodedBlock], n_tokens: int, held_tokens: int) -> ContextKV:
        """Lay the blocks' KV out contiguously per layer, taking `blocks` one at a time as they are produced (read
        from disk, or encoded), so that at most one block exists twice: the context's KV needs its own size in
        memory, not twice it. Decoding never copies it again."""
        shape = (1, self.kv_heads, held_tokens, self.head_dim)
        keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        offset, spans = 0, []
        for block in blocks:
            length = block.end - block.start
            if offset + length > held_tokens:
                raise ValueError(f"the blocks hold more than the {held_tokens} tokens announced")
            for layer in range(self.num_layers):
                keys[layer][0, :, offset : offset + length] = block.keys[layer]
                values[layer][0, :, offset : offset + length] = block.values[layer]
            offset += length
            spans.append((block.start, block.end))
        if offset != held_tokens:
            raise ValueError(f"the blocks hold {offset} tokens, not the {held_tokens} announced")
        return ContextKV(n_tokens=n_tokens, spans=spans, keys=keys, values=values)

    # ---------------------------------------------------------------- Phase 2

    def generate(self, ctx: ContextKV, query_ids: Sequence[int], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 on_token: Callable[[int], None] | None = None, keep_local: bool = True,
                 merge_across_ranks=None, sync_token: Callable[[int], int] | None = None,
                 observe_prefix=None) -> list[int]:
        """Phase 2: encode the query against the context KV, then decode; returns the new token ids.

        Distributed: each rank passes its own blocks in `ctx`; `merge_across_ranks` combines the ranks' partial
        attention per layer; only the query host keeps the query's KV (`keep_local`); `sync_token` makes every
        rank continue with the query host's token. `observe_prefix` (a starqa.sources.AttentionShares) sees every
        layer's scores over the context, for the answer's sources.
        """
        cache = self._new_cache(batch=1, capacity=len(query_ids) + max_new_tokens,
                                prefix=(ctx.keys, ctx.values), keep_local=keep_local,
                                merge_across_ranks=merge_across_ranks)
        cache.observe_prefix = observe_prefix
        return self._decode(cache, list(query_ids), ctx.n_tokens, max_new_tokens, temperature, top_p, seed, on_token,
                            sync_token)

    def generate_full(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 128, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int = 0, on_token: Callable[[int], None] | None = None) -> list[int]:
        """Ordinary full attention: the whole prompt in one causal pass, no stored context, then decoding."""
        cache = self._new_cache(batch=1, capacity=len(prompt_ids) + max_new_tokens)
        return self._decode(cache, list(prompt_ids), 0, max_new_tokens, temperature, top_p, seed, on_token)

    def _decode(self, cache, prompt_ids, first_position, max_new_tokens, temperature, top_p, seed, on_token,
                sync_token=None):
        window = self.sliding_window
        reach = first_position + len(prompt_ids) + max_new_tokens  # the whole context, on every rank
        if window is not None and reach > window:
            # Refused before the first token (not part-way through a streamed answer): beyond the window, attending
            # to every stored token is not what the model computes. hf_hook checks each pass as well.
            raise StarqaError(f"this model attends to only the last {window:,} tokens in some layers (sliding-window "
                              f"attention), and document, question and answer budget reach {reach:,} tokens: starqa "
                              "cannot answer this exactly; ask with a shorter --max-new-tokens or use another model")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        stats = GenerationStats()
        started = time.perf_counter()
        logits = self._step(cache, prompt_ids, first_position)
        stats.prefill_s = time.perf_counter() - started
        position = first_position + len(prompt_ids)
        new_ids: list[int] = []
        decode_started = 0.0
        while True:
            token = _sample(logits, temperature, top_p, generator)
            if sync_token is not None:
                token = sync_token(token)
            new_ids.append(token)
            if len(new_ids) == 1:
                stats.ttft_s = time.perf_counter() - started
                decode_started = time.perf_counter()
            if on_token is not None:
                on_token(token)
            if token in self.stop_ids or len(new_ids) >= max_new_tokens:
                break
            logits = self._step(cache, [token], position)
            position += 1
        stats.decode_s = time.perf_counter() - decode_started
        stats.new_tokens = len(new_ids)
        self.last_stats = stats
        return new_ids


def _equal_length_batches(indices: list[int], spans, batch: int) -> Iterator[list[int]]:
    group: list[int] = []
    for index in indices:
        length = spans[index][1] - spans[index][0]
        if group and (len(group) == batch or spans[group[0]][1] - spans[group[0]][0] != length):
            yield group
            group = []
        group.append(index)
    if group:
        yield group


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # the smallest set reaching top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
