"""Phase 1 (blockwise context encoding with an anchor) and Phase 2 (query encoding and decoding) of Star Attention.

    engine = StarEngine.load("smollm2-135m", device="cpu", dtype="auto")
    ctx = engine.encode_context(context_ids, block_size=256, anchor_size=256)   # Phase 1
    ids = engine.generate(ctx, query_ids, max_new_tokens=24)                    # Phase 2, greedy
    answers = engine.generate_batch(ctx, [query_1, query_2], max_new_tokens=24) # several questions at once

Phase 1: block 0 is encoded alone; block i > 0 is encoded after the anchor (the first anchor_size context tokens) at
its global positions, and only its own KV is kept. Because attention is causal, the anchor's KV does not depend on
what follows it, so it is computed once (as the head of block 0, or alone on a process that does not hold block 0)
and every later block attends to it as a prefix: exactly `[anchor, block]` encoded directly, without re-encoding the
anchor per block. An anchor larger than the block is allowed: a block that starts inside the anchor sees every token
before it (the anchor less what the block holds itself), so the blocks that start inside the anchor (the *head*) are
one causal pass over their tokens, which also gives the anchor's KV; only the blocks after them prepend the anchor.
Phase 2: the query attends to all context KV and causally to itself (starqa.engine.star_cache); several questions share
the context KV (read once per step for all of them), each with its own row of the query buffer. The model is
starqa.model.transformer's compact Llama-family decoder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from starqa.attention import backend_problem
from starqa.store.context_kv import ContextKV, EncodedBlock, chunk_starts_for
from starqa.errors import StarqaError, UsageError
from starqa.store.kv_quant import KEY_GROUP, quantize_keys, quantize_values, resolve_kv_dtype, storage_dtype
from starqa.engine.star_cache import StarCache
from starqa.documents.tokens import plan_blocks


def quantize_block(block: EncodedBlock, kv_dtype: str) -> EncodedBlock:
    """The block's KV in the stored precision `kv_dtype` (float32, bfloat16, float16 or int8; see
    starqa.store.kv_quant)."""
    if kv_dtype != "int8":
        dtype = storage_dtype(kv_dtype)
        return EncodedBlock(block.index, block.start, block.end, [k.to(dtype) for k in block.keys],
                            [v.to(dtype) for v in block.values])
    keys, key_scales = zip(*(quantize_keys(k) for k in block.keys))
    values, value_scales = zip(*(quantize_values(v) for v in block.values))
    return EncodedBlock(block.index, block.start, block.end, list(keys), list(values), list(key_scales),
                        list(value_scales))


@dataclass
class GenerationStats:
    prefill_s: float = 0.0  # Phase 2 prefill (or the full-attention pass) of the prompts
    ttft_s: float = 0.0  # from the start of the prefill to the first answer tokens
    decode_s: float = 0.0  # the steps after the first token
    steps: int = 0  # decoding steps after the first token (each gives every unfinished sequence a token)
    new_tokens: int = 0  # answer tokens of the longest sequence
    sequences: int = 1

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of one sequence (every sequence of a batch decodes at this rate)."""
        return self.steps / self.decode_s if self.steps > 0 and self.decode_s > 0 else 0.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX or AVX512-BF16), as torch's cpuinfo reports it."""
    import torch.cpu

    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and bool(check()) for check in checks)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA and on CPUs with native bfloat16 matrix instructions, float32 on other CPUs."""
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bfloat16()):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class _Ignored:
    """Stands in for a finished sequence's observer: its answer is complete, later steps are not its own."""

    def layer_heads(self, layer) -> list[int]:
        return []  # no scores are computed for it

    def observe_scores(self, layer, scores) -> None:
        pass


class StarEngine:
    """A causal LM with Star Attention on its forward path; see the module docstring.

    `model` is a starqa.model.transformer.Transformer, or a transformers model object (converted: tests, and models
    whose weights are not in safetensors files). `tokenizer` answers prompt and answer text (an HF tokenizer or a
    starqa.documents.light_tokenizer.LightTokenizer); `hf_tokenizer` is loaded on demand where document text is
    tokenized. """

    def __init__(self, model, tokenizer, *, model_name: str = "", model_dir: Path | None = None,
                 attention_backend: str = "auto", store_root: Path | None = None,
                 tokenizer_profile: dict | None = None, trust_remote_code: bool = False) -> None:
        from starqa.model.transformer import Transformer

        if not isinstance(model, Transformer):
            model = Transformer.from_hf_model(model)
        self.model = model
        self.args = model.args
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_dir = model_dir
        self.store_root = store_root  # where the tokenizer check is recorded (None: not recorded)
        self.attention_backend = attention_backend
        self.num_layers = model.args.num_layers
        self.kv_heads = model.args.num_kv_heads
        self.head_dim = model.args.head_dim
        self.device = model.device
        self.dtype = model.dtype
        self.tokenizer_profile = tokenizer_profile
        self._trust_remote_code = trust_remote_code
        self._hf_tokenizer = None if tokenizer_profile is not None and tokenizer_profile.get("light") else tokenizer
        self.stop_ids = self._stop_token_ids()
        self.last_stats = GenerationStats()
        self.phase1_blocks_encoded = 0  # counts real Phase 1 work (tests assert a cache hit skips it)
        self._fingerprints: dict[str, str] = {}
        self._text_encoder = None  # built on first use: ask does not need it
        self.weights = "bfloat16"  # what decoding reads (starqa.model.quantized_weights.attach's summary)

    # ---------------------------------------------------------------- identity and tokenization

    @property
    def hf_tokenizer(self):
        """The transformers tokenizer (document text and eval prompts need it); loaded on first use."""
        if self._hf_tokenizer is None:
            from transformers import AutoTokenizer

            self._hf_tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True,
                                                               trust_remote_code=self._trust_remote_code)
        return self._hf_tokenizer

    @property
    def model_fingerprint(self) -> str:
        if "model" not in self._fingerprints:
            from starqa.model.resolve import model_fingerprint, parameters_fingerprint

            self._fingerprints["model"] = (model_fingerprint(self.model_dir) if self.model_dir is not None
                                           else parameters_fingerprint(self.model))
        return self._fingerprints["model"]

    @property
    def tokenizer_fingerprint(self) -> str:
        if "tokenizer" not in self._fingerprints:
            from starqa.model.resolve import tokenizer_fingerprint

            profile = self.tokenizer_profile
            self._fingerprints["tokenizer"] = (profile["fingerprint"] if profile is not None
                                               else tokenizer_fingerprint(self.hf_tokenizer))
        return self._fingerprints["tokenizer"]

    @property
    def context_window(self) -> int:
        return self.args.max_position_embeddings

    @property
    def sliding_window(self) -> int | None:
        return self.args.sliding_window

    @property
    def text_encoder(self):
        """Document tokenization: tiktoken when checked identical to the HF tokenizer, else the HF tokenizer.

        The check runs on the model's first use and its outcome is recorded (see `_record_path`)."""
        if self._text_encoder is None:
            from starqa.documents.fast_tokenizer import RECORD_FILE_NAME, text_encoder_for

            self._text_encoder = text_encoder_for(self.hf_tokenizer, self._record_path(RECORD_FILE_NAME))
        return self._text_encoder

    def _record_path(self, file_name: str) -> Path | None:
        """A model converted into the store's models/ folder keeps its records in its own folder; a user's model
        directory is never written to: its records go to a file in models/, keyed like every record."""
        if self.store_root is None:
            return None
        return record_path(Path(self.store_root), self.model_dir, file_name)

    @property
    def tokenizer_engine(self) -> str:
        """The engine `encode_document_text` uses, "tiktoken" or "hf"; both give the same ids."""
        return self.text_encoder.engine

    @property
    def tokenizer_engine_reason(self) -> str:
        """Why the HF tokenizer is used instead of tiktoken ("" when tiktoken is)."""
        return self.text_encoder.reason

    def encode_document_text(self, text: str) -> list[int]:
        """Ids of document text: exactly `starqa.documents.tokens.encode_document` (special-token strings are plain
        text)."""
        return self.text_encoder.encode(text)

    @classmethod
    def load(cls, model: str, *, device: str = "auto", dtype: str = "auto",
             store_root: Path | str | None = None, attention_backend: str = "auto",
             trust_remote_code: bool = False, on_status: Callable[[str], None] | None = None,
             weights: str = "auto", activations: str = "bfloat16") -> "StarEngine":
        from starqa.model import resolve as models
        from starqa.documents.light_tokenizer import PROFILE_FILE_NAME, LightTokenizer, read_profile, write_profile
        from starqa.store.document_store import default_store_root
        from starqa.model.transformer import Transformer

        root = Path(store_root) if store_root is not None else default_store_root()
        torch_device = resolve_device(device)
        problem = backend_problem(attention_backend, torch_device)
        if problem is not None:
            raise UsageError(problem)
        torch_dtype = resolve_dtype(dtype, torch_device)
        source = models.ensure_converted(models.resolve_model(model, root / "models", torch_dtype),
                                         on_status=on_status)
        config = json.loads((source.directory / "config.json").read_text(encoding="utf-8"))
        models.check_architecture(config)
        if any(source.directory.glob("*.safetensors")):
            without = _integers_only(weights, source.directory, root, config, torch_device, torch_dtype)
            transformer = Transformer.from_directory(source.directory, dtype=torch_dtype, device=torch_device,
                                                     without=without)
        else:  # weights in PyTorch's own format: transformers reads them (safely), then we take them over
            transformer = Transformer.from_hf_model(_hf_model(source.directory, torch_dtype, trust_remote_code)
                                                    .to(torch_device))
        weights_summary = _attach_weights(transformer, weights, source.directory, root, on_status, activations)
        profile_path = record_path(root, source.directory, PROFILE_FILE_NAME)
        profile = read_profile(profile_path, source.directory)
        engine_args = dict(model_name=source.name, model_dir=source.directory, attention_backend=attention_backend,
                           store_root=root, trust_remote_code=trust_remote_code)
        if profile is not None and profile.get("light"):
            engine = cls(transformer, LightTokenizer(source.directory, profile), tokenizer_profile=profile,
                         **engine_args)
            engine.weights = weights_summary
            return engine
        from transformers import AutoTokenizer

        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        hf_tokenizer = AutoTokenizer.from_pretrained(source.directory, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
        engine = cls(transformer, hf_tokenizer, **engine_args)
        engine.weights = weights_summary
        if profile is None:  # first use of this tokenizer: record what asking needs, for the next processes
            engine.tokenizer_profile = write_profile(profile_path, source.directory, hf_tokenizer, engine.stop_ids)
        return engine

    @classmethod
    def from_settings(cls, settings, model: str | None = None, *, device: str | None = None,
                      trust_remote_code: bool = False,
                      on_status: Callable[[str], None] | None = None) -> "StarEngine":
        """`load` as the commands do: model, dtype, device, store and backend from a starqa.config.Settings, where
        `model` and `device` (a rank's GPU) override the settings'."""
        from starqa.store.document_store import DocumentStore

        name = model or settings.model
        if on_status is not None:
            on_status(f"loading model {name}")
        return cls.load(name, device=device or settings.device, dtype=settings.dtype,
                        store_root=DocumentStore(settings.store).root, attention_backend=settings.attention_backend,
                        trust_remote_code=trust_remote_code, on_status=on_status, weights=settings.weights,
                        activations=settings.activations)

    def _stop_token_ids(self) -> set[int]:
        if self.tokenizer_profile is not None and "stop_ids" in self.tokenizer_profile:
            return set(self.tokenizer_profile["stop_ids"])
        stop: set[int] = set(self.args.eos_token_id)
        if self.model_dir is not None and (Path(self.model_dir) / "generation_config.json").is_file():
            eos = json.loads((Path(self.model_dir) / "generation_config.json").read_text()).get("eos_token_id")
            if eos is not None:  # the generation config's stop tokens win over the model config's, as in HF
                stop = {eos} if isinstance(eos, int) else {int(token) for token in eos}
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            stop.add(int(self.tokenizer.eos_token_id))
        return stop

    # ---------------------------------------------------------------- forward passes

    def _new_cache(self, *, batch: int, capacity: int, prefix: ContextKV | None = None, keep_local: bool = True,
                   merge_across_ranks=None, key_valid: torch.Tensor | None = None) -> StarCache:
        return StarCache(num_layers=self.num_layers, batch=batch, kv_heads=self.kv_heads, head_dim=self.head_dim,
                         capacity=capacity, dtype=self.dtype, device=self.device, prefix=prefix,
                         keep_local=keep_local, merge_across_ranks=merge_across_ranks,
                         backend=self.attention_backend, key_valid=key_valid, sliding_window=self.sliding_window)

    @torch.inference_mode()
    def _encode(self, ids: torch.Tensor, positions: torch.Tensor, prefix: ContextKV | None = None) -> StarCache:
        """Run the decoder (no LM head) over ids [batch, n] at positions [batch, n]; the cache holds their KV."""
        cache = self._new_cache(batch=ids.shape[0], capacity=ids.shape[1], prefix=prefix)
        self.model.forward(ids, positions, cache, logits=False)
        cache.advance(ids.shape[1])
        return cache

    @torch.inference_mode()
    def _step(self, cache: StarCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Encode ids [batch, n] at positions [batch, n] after the tokens in the cache; returns each sequence's
        next-token logits [batch, vocab] (float32)."""
        logits = self.model.forward(ids, positions, cache)
        cache.advance(ids.shape[1])
        return logits.float()

    # ---------------------------------------------------------------- Phase 1

    def encode_blocks(self, context_ids: Sequence[int], block_size: int, anchor_size: int | None = None, *,
                      block_indices: Iterable[int] | None = None, batch: int = 4,
                      anchor: ContextKV | None = None) -> Iterator[EncodedBlock]:
        """Phase 1 for the given blocks (all by default), yielding each block's KV in index order.

        Block i keeps the KV of its tokens encoded at their global positions after the first min(anchor_size,
        start_i) context tokens: block 0 alone, a block after the anchor as `[anchor, block]`. The head blocks (those
        starting inside the anchor; block 0 alone when anchor_size <= block_size) are one causal pass over their
        tokens, whose first anchor_size tokens are the anchor. `anchor`: the anchor's KV [1, kv_heads, anchor_len,
        head_dim] in the compute dtype, when it is at hand without encoding the head here: the head blocks' stored
        KV, which is what their own pass gives (a re-ingest that takes them over, see starqa.engine.ingest). Without it,
        a process that holds no head block encodes the anchor alone."""
        anchor_size = block_size if anchor_size is None else anchor_size
        if block_size <= 0 or anchor_size <= 0:
            raise ValueError(f"need positive block_size ({block_size}) and anchor_size ({anchor_size})")
        if not context_ids:
            raise ValueError("the context is empty")
        spans = plan_blocks(len(context_ids), block_size)
        wanted = sorted(set(range(len(spans)) if block_indices is None else block_indices))
        ids = torch.tensor(list(context_ids), dtype=torch.long, device=self.device)
        anchor_len = min(anchor_size, len(context_ids))
        head = head_blocks(spans, anchor_len)  # blocks 0..head-1 start inside the anchor
        head_wanted = [index for index in wanted if index < head]

        if anchor is not None and (head_wanted or anchor.n_tokens != anchor_len):
            raise ValueError("an anchor given must be the first anchor_size tokens' KV, for blocks after the head")
        if head_wanted:  # one causal pass over the head blocks' tokens: their KV, and the anchor's
            end = spans[head - 1][1]
            cache = self._encode(ids[None, :end], torch.arange(end, device=self.device)[None])
            self.phase1_blocks_encoded += len(head_wanted)
            for index in head_wanted:
                yield self._block_from_cache(index, spans[index], cache, row=0, offset=spans[index][0])
            anchor = self._anchor_from(cache, anchor_len)
        later = [index for index in wanted if index >= head]
        if later and anchor is None:  # this process holds no head block: encode the anchor itself
            cache = self._encode(ids[None, :anchor_len], torch.arange(anchor_len, device=self.device)[None])
            anchor = self._anchor_from(cache, anchor_len)

        for group in _equal_length_batches(later, spans, batch):
            length = spans[group[0]][1] - spans[group[0]][0]
            block_ids = torch.stack([ids[spans[i][0] : spans[i][1]] for i in group])  # [batch, length]
            offsets = torch.tensor([spans[i][0] for i in group], device=self.device)[:, None]
            positions = offsets + torch.arange(length, device=self.device)[None]  # global position ids
            cache = self._encode(block_ids, positions, prefix=anchor)
            self.phase1_blocks_encoded += len(group)
            for row, index in enumerate(group):
                yield self._block_from_cache(index, spans[index], cache, row=row)

    @staticmethod
    def _anchor_from(cache: StarCache, anchor_len: int) -> ContextKV:
        return ContextKV(n_tokens=anchor_len, spans=[(0, anchor_len)],
                         keys=[k[:1, :, :anchor_len] for k in cache.keys],
                         values=[v[:1, :, :anchor_len] for v in cache.values])

    @staticmethod
    def _block_from_cache(index: int, span: tuple[int, int], cache: StarCache, row: int,
                          offset: int = 0) -> EncodedBlock:
        """The block's KV: row `row` of the cache, from its token `offset` on (a head block within the head pass)."""
        length = span[1] - span[0]
        return EncodedBlock(
            index=index, start=span[0], end=span[1],
            keys=[k[row, :, offset : offset + length].clone() for k in cache.keys],
            values=[v[row, :, offset : offset + length].clone() for v in cache.values],
        )

    def encode_context(self, context_ids: Sequence[int], block_size: int, anchor_size: int | None = None, *,
                       batch: int = 4, kv_dtype: str = "auto") -> ContextKV:
        """Phase 1 over the whole context, in this process; the KV kept in the precision `kv_dtype` (as stored)."""
        spans = plan_blocks(len(context_ids), block_size)
        kv_dtype = resolve_kv_dtype(kv_dtype, self.dtype)
        blocks = (quantize_block(block, kv_dtype)
                  for block in self.encode_blocks(context_ids, block_size, anchor_size, batch=batch))
        return self.context_from_blocks(blocks, len(context_ids), len(context_ids), kv_dtype=kv_dtype, spans=spans)

    def context_from_blocks(self, blocks: Iterable[EncodedBlock], n_tokens: int, held_tokens: int, *,
                            kv_dtype: str = "auto", spans: Sequence[tuple[int, int]] | None = None) -> ContextKV:
        """Lay the blocks' KV out contiguously per layer, taking `blocks` one at a time as they are produced (read
        from disk, or encoded), so that at most one block exists twice: the context's KV needs its own size in
        memory, not twice it. The KV keeps its precision `kv_dtype` (int8 blocks bring their scales; `spans`, the
        blocks' [start, end), are then needed up front to place them). Decoding never copies it again."""
        kv_dtype = resolve_kv_dtype(kv_dtype, self.dtype)
        dtype = storage_dtype(kv_dtype)
        shape = (1, self.kv_heads, held_tokens, self.head_dim)
        keys = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)]
        quantized = kv_dtype == "int8"
        chunk_starts = key_scales = value_scales = None
        if quantized:
            if spans is None:
                raise ValueError("int8 KV needs the blocks' spans up front")
            chunk_starts = chunk_starts_for(spans, KEY_GROUP)
            chunks = chunk_starts.numel() - 1
            key_scales = [torch.empty((self.kv_heads, chunks, self.head_dim), device=self.device)
                          for _ in range(self.num_layers)]
            value_scales = [torch.empty((self.kv_heads, held_tokens), device=self.device)
                            for _ in range(self.num_layers)]
        offset, chunk, held_spans = 0, 0, []
        for block in blocks:
            length = block.end - block.start
            if offset + length > held_tokens:
                raise ValueError(f"the blocks hold more than the {held_tokens} tokens announced")
            if block.keys[0].dtype != dtype:
                raise ValueError(f"block {block.index} holds {block.keys[0].dtype} KV, not {dtype}")
            groups = block.key_scales[0].shape[1] if quantized else 0
            for layer in range(self.num_layers):
                keys[layer][0, :, offset : offset + length] = block.keys[layer]
                values[layer][0, :, offset : offset + length] = block.values[layer]
                if quantized:
                    key_scales[layer][:, chunk : chunk + groups] = block.key_scales[layer]
                    value_scales[layer][:, offset : offset + length] = block.value_scales[layer]
            offset += length
            chunk += groups
            held_spans.append((block.start, block.end))
        if offset != held_tokens:
            raise ValueError(f"the blocks hold {offset} tokens, not the {held_tokens} announced")
        if spans is not None and list(spans) != held_spans:
            raise ValueError("the blocks are not the spans announced")
        return ContextKV(n_tokens=n_tokens, spans=held_spans, keys=keys, values=values, chunk_starts=chunk_starts,
                         key_scales=key_scales, value_scales=value_scales)

    # ---------------------------------------------------------------- Phase 2

    def generate(self, ctx: ContextKV, query_ids: Sequence[int], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 on_token: Callable[[int], None] | None = None, keep_local: bool = True,
                 merge_across_ranks=None, sync_token: Callable | None = None,
                 observe_prefix=None) -> list[int]:
        """Phase 2 for one question: encode the query against the context KV, then decode; returns the new ids.

        Distributed: each rank passes its own blocks in `ctx`; `merge_across_ranks` combines the ranks' partial
        attention per layer; only the query host keeps the query's KV (`keep_local`); `sync_token` makes every
        rank continue with the query host's tokens. `observe_prefix` (a starqa.evidence.observer.AttentionShares) sees
        every step's scores over the context, for the answer's sources.
        """
        return self.generate_batch(
            ctx, [query_ids], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            on_token=None if on_token is None else (lambda row, token: on_token(token)), keep_local=keep_local,
            merge_across_ranks=merge_across_ranks, sync_token=sync_token,
            observers=None if observe_prefix is None else [observe_prefix])[0]

    def generate_batch(self, ctx: ContextKV, queries: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                       on_token: Callable[[int, int], None] | None = None, keep_local: bool = True,
                       merge_across_ranks=None, sync_token: Callable | None = None,
                       observers: Sequence | None = None) -> list[list[int]]:
        """Phase 2 for several questions over one context: one row each, decoded together (each step reads the
        weights and the context KV once for all of them). Every question is answered as if asked alone: its own
        query KV, its own sampling generator seeded with `seed`. Returns each question's new ids, in order;
        `on_token(row, token)` streams them."""
        rows = len(queries)
        longest = max(len(query) for query in queries)
        pads = [longest - len(query) for query in queries]
        n = ctx.n_tokens
        ids = torch.tensor([[0] * pad + list(query) for pad, query in zip(pads, queries)], device=self.device)
        positions = torch.tensor([[n] * pad + list(range(n, n + longest - pad)) for pad in pads],
                                 device=self.device)
        capacity = longest + max_new_tokens
        key_valid = None
        if any(pads):  # left padding: every row writes at the same offset; each row's pads are hidden from it
            key_valid = torch.arange(capacity, device=self.device)[None, :] >= torch.tensor(pads, device=self.device)[:, None]
        cache = self._new_cache(batch=rows, capacity=capacity, prefix=ctx, keep_local=keep_local,
                                merge_across_ranks=merge_across_ranks, key_valid=key_valid)
        self._check_reach(n + longest + max_new_tokens)
        next_positions = [n + longest - pad for pad in pads]
        return self._decode(cache, ids, positions, next_positions, max_new_tokens, temperature, top_p, seed,
                            on_token, sync_token, observers)

    def generate_full(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 128, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int = 0, on_token: Callable[[int], None] | None = None,
                      observe_prefix=None) -> list[int]:
        """Ordinary full attention: the prompt in one causal pass, no stored context, then decoding.

        The pass covers all prompt tokens but the last; those become the prefix that the last prompt token and the
        answer attend to, through the same decoding path as Star Attention (exact: one softmax over every earlier
        token, merged by log-sum-exp), so `observe_prefix` sees the same scores as in Phase 2, over the whole prompt
        but its last token (a starqa.evidence.observer.AttentionShares keeps the context part: the tokens its spans
        name)."""
        prompt = list(prompt_ids)
        self._check_reach(len(prompt) + max_new_tokens)
        head = len(prompt) - 1
        cache = self._new_cache(batch=1, capacity=len(prompt) + max_new_tokens)
        started = time.perf_counter()
        if head > 0:
            with torch.inference_mode():
                self.model.forward(torch.tensor([prompt[:head]], device=self.device),
                                   torch.arange(head, device=self.device)[None], cache, logits=False)
            cache.advance(head)
            cache = cache.split_prefix(head, [(0, head)])
        head_s = time.perf_counter() - started
        new = self._decode(cache, torch.tensor([prompt[head:]], device=self.device),
                           torch.tensor([[head]], device=self.device), [len(prompt)], max_new_tokens, temperature,
                           top_p, seed, None if on_token is None else (lambda row, token: on_token(token)), None,
                           None if observe_prefix is None else [observe_prefix])
        self.last_stats.prefill_s += head_s
        self.last_stats.ttft_s += head_s
        return new[0]

    def _check_reach(self, reach: int) -> None:
        window = self.sliding_window
        if window is not None and reach > window:
            # Refused before the first token (not part-way through a streamed answer): beyond the window, attending
            # to every stored token is not what the model computes. star_cache checks each pass as well.
            raise StarqaError(f"this model attends to only the last {window:,} tokens in some layers (sliding-window "
                              f"attention), and document, question and answer budget reach {reach:,} tokens: starqa "
                              "cannot answer this exactly; ask with a shorter --max-new-tokens or use another model")

    def _decode(self, cache: StarCache, ids: torch.Tensor, positions: torch.Tensor, next_positions: list[int],
                max_new_tokens: int, temperature: float, top_p: float, seed: int, on_token, sync_token,
                observers) -> list[list[int]]:
        rows = ids.shape[0]
        observing = list(observers) if observers is not None else None
        cache.observers = observing
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _ in range(rows)]
        stats = GenerationStats(sequences=rows)
        started = time.perf_counter()
        logits = self._step(cache, ids, positions)
        stats.prefill_s = time.perf_counter() - started
        answers: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        decode_started = 0.0
        while True:
            tokens = [_sample(logits[row], temperature, top_p, generators[row]) for row in range(rows)]
            if sync_token is not None:
                tokens = sync_token(tokens)
            for row, token in enumerate(tokens):
                if done[row]:
                    continue
                answers[row].append(token)
                if on_token is not None:
                    on_token(row, token)
                if token in self.stop_ids or len(answers[row]) >= max_new_tokens:
                    done[row] = True
                    if observing is not None:
                        observing[row] = _Ignored()
            if stats.ttft_s == 0.0:
                stats.ttft_s = time.perf_counter() - started
                decode_started = time.perf_counter()
            if all(done):
                break
            step_ids = torch.tensor(tokens, device=self.device)[:, None]
            step_positions = torch.tensor(next_positions, device=self.device)[:, None]
            next_positions = [position + 1 for position in next_positions]
            logits = self._step(cache, step_ids, step_positions)
            stats.steps += 1
        stats.decode_s = time.perf_counter() - decode_started
        stats.new_tokens = max(len(answer) for answer in answers)
        self.last_stats = stats
        return answers


def record_path(store_root: Path, model_dir: Path | None, file_name: str) -> Path:
    """Where a model's records (tokenizer check, tokenizer profile) live: its own folder when it is a conversion in
    the store's models/ folder, else one file in models/ (a user's model directory is never written to)."""
    models_root = Path(store_root) / "models"
    if model_dir is not None and Path(model_dir).resolve().parent == models_root.resolve():
        return Path(model_dir) / file_name
    return models_root / file_name


def _packed_cache(mode: str, model_dir: Path, store_root: Path) -> tuple[Path, str]:
    """(where the model's packed weights for --weights `mode` are cached, the model's fingerprint)."""
    from starqa.model import quantized_weights
    from starqa.model.resolve import model_fingerprint

    key = model_fingerprint(model_dir)
    # A folder, not *.safetensors beside the weights: those are the model (its fingerprint and its loading).
    folder = record_path(store_root, model_dir, quantized_weights.CACHE_FOLDER)
    if folder.parent != Path(model_dir):  # a user's model directory: one folder per model in models/
        folder = folder.with_name(f"{quantized_weights.CACHE_FOLDER}-{key[:16]}")
    return folder / f"{mode}.safetensors", key


def _integers_only(mode: str, model_dir: Path, store_root: Path, config: dict, device, dtype) -> frozenset[str]:
    """The projections to load without their bfloat16 weights: those the cached packed weights hold as the GGUF's
    own integers under `mode` (starqa.model.quantized_weights.cached_integers_only)."""
    from starqa.model import quantized_weights
    from starqa.model.transformer import ModelArgs

    if mode != "auto":
        return frozenset()
    cache, key = _packed_cache(mode, model_dir, store_root)
    return quantized_weights.cached_integers_only(mode, model_dir=model_dir, cache_path=cache, model_key=key,
                                                  args=ModelArgs.from_config(config), device=device, dtype=dtype)


def _attach_weights(transformer, mode: str, model_dir: Path, store_root: Path, on_status,
                    activations: str = "bfloat16") -> str:
    """Decoding's weights under --weights `mode` and --activations (starqa.model.quantized_weights), cached beside
    the model."""
    from starqa.model import quantized_weights

    if mode == "bfloat16":
        return quantized_weights.attach(transformer, mode, activations=activations)
    cache, key = _packed_cache(mode, model_dir, store_root)
    return quantized_weights.attach(transformer, mode, model_dir=model_dir, cache_path=cache, model_key=key,
                                    on_status=on_status, activations=activations)


def _hf_model(directory: Path, dtype: torch.dtype, trust_remote_code: bool):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True,
                                                trust_remote_code=trust_remote_code)


def head_blocks(spans: Sequence[tuple[int, int]], anchor_len: int) -> int:
    """How many blocks start inside the anchor's first `anchor_len` tokens (at least block 0): Phase 1 encodes them
    in one causal pass, which also gives the anchor; every later block attends to the whole anchor."""
    return max(1, sum(1 for start, _ in spans if start < anchor_len))


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
