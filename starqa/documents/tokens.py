"""The prompt, split once into a context part and a query part, tokenized separately; and the block plan.

Layout (PROMPT_LAYOUT_VERSION 1), for a chat model whose template renders `[system] user-message assistant-header`:

    context part = template prefix up to the user message + INSTRUCTION + "\\n\\nDocument:\\n" + document text
    query part   = "\\n\\nQuestion: " + question + "\\nAnswer briefly." + template suffix (end of user turn,
                   assistant header)

No token spans the boundary: the two parts are tokenized separately. Phase 1 encodes the context part once; every
question only tokenizes and encodes its query part.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_LAYOUT_VERSION = 1
INSTRUCTION = (
    "Read the document below, then answer the question that follows it. "
    "Answer briefly and only from the document."
)
_SENTINEL = "\u2063STARQA-USER-MESSAGE\u2063"


@dataclass(frozen=True)
class PromptTemplate:
    prefix: str  # rendered text before the user message (system turn, user header)
    suffix: str  # rendered text after it (end of turn, assistant header)
    bos_id: int | None  # prepended when the tokenizer adds BOS itself and the template does not write it


def prompt_template(tokenizer) -> PromptTemplate:
    """Render the model's chat template around a sentinel user message to find prefix and suffix (or take the one
    a starqa.documents.light_tokenizer.LightTokenizer recorded)."""
    recorded = getattr(tokenizer, "recorded_template", None)
    if recorded is not None:
        return recorded
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        prefix, _, suffix = rendered.partition(_SENTINEL)
    else:  # a base model: plain text
        prefix, suffix = "", "\nAnswer:"
    bos_id = None
    bos_token = getattr(tokenizer, "bos_token", None)
    if bos_token and not prefix.startswith(bos_token):
        probe = tokenizer("a").input_ids
        if probe and probe[0] == tokenizer.bos_token_id:
            bos_id = tokenizer.bos_token_id
    return PromptTemplate(prefix=prefix, suffix=suffix, bos_id=bos_id)


def context_head_text(template: PromptTemplate) -> str:
    return f"{template.prefix}{INSTRUCTION}\n\nDocument:\n"


def query_text(template: PromptTemplate, question: str) -> str:
    return f"\n\nQuestion: {question.strip()}\nAnswer briefly.{template.suffix}"


def encode_special(tokenizer, text: str) -> list[int]:
    """Template text: special tokens written in it (e.g. <|im_start|>) become their ids."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_document(tokenizer, text: str) -> list[int]:
    """Document text: never parsed for special tokens, so a document cannot forge turns of the chat."""
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def context_ids_for(tokenizer, template: PromptTemplate, document_ids: list[int]) -> list[int]:
    head = encode_special(tokenizer, context_head_text(template))
    bos = [template.bos_id] if template.bos_id is not None else []
    return bos + head + document_ids


def query_ids_for(tokenizer, template: PromptTemplate, question: str) -> list[int]:
    return encode_special(tokenizer, query_text(template, question))


def plan_blocks(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """Spans [start, end) of the context blocks; the last one may be shorter."""
    return [(start, min(start + block_size, n_tokens)) for start in range(0, n_tokens, block_size)]
