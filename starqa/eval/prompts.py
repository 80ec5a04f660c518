"""A case's prompt in starqa's layout (starqa.documents.tokens): the context part and the query part, tokenized
separately.

    prompts = PromptBuilder(engine.tokenizer)
    context_ids, query_ids = prompts.context_ids(case.context_text), prompts.query_ids(case.question)
    prompts.count(context_text, question)   # == len(context_ids) + len(query_ids), what the generators size by

This is exactly what `starqa ingest` / `starqa ask` build, so an eval measures the prompts users actually get.
"""

from __future__ import annotations

from starqa.documents.tokens import context_ids_for, encode_document, prompt_template, query_ids_for


class PromptBuilder:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.template = prompt_template(tokenizer)
        self.document_offset = len(context_ids_for(tokenizer, self.template, []))  # template tokens before the document
        self._query_tokens: dict[str, int] = {}

    def context_ids(self, context_text: str) -> list[int]:
        return context_ids_for(self.tokenizer, self.template, encode_document(self.tokenizer, context_text))

    def query_ids(self, question: str) -> list[int]:
        return query_ids_for(self.tokenizer, self.template, question)

    def count(self, context_text: str, question: str) -> int:
        """Tokens of the whole prompt: the context part's head and document, plus the query part."""
        if question not in self._query_tokens:
            self._query_tokens[question] = len(self.query_ids(question))
        return self.document_offset + len(encode_document(self.tokenizer, context_text)) + self._query_tokens[question]
