"""What `starqa list` says about a stored document, for people (one tab-separated line) and programs (one JSON
object); the server's `GET /v1/documents` sends the same objects."""

from __future__ import annotations


def document_row(document) -> dict:
    """`starqa list --json`'s object for a starqa.store.document_store.StoredDocument."""
    m = document.manifest
    return {"name": document.name, "context_tokens": m["context_tokens"], "blocks": len(m["blocks"]),
            "model": m["model"], "dtype": m["dtype"], "kv_dtype": document.kv_dtype, "kv_bytes": m["kv_bytes"],
            "kv_bytes_per_token": round(document.kv_bytes_per_token, 1), "created": m["created"],
            "updated": m["created"], "version": m.get("version", 1),
            "first_created": m.get("first_created", m["created"]), "source": m["source"]["path"]}


def document_line(document) -> str:
    m = document.manifest  # the current version was stored ("updated") at its `created` time
    return (f"{document.name}\t{m['context_tokens']} tokens\t{len(m['blocks'])} blocks\t"
            f"{m['block_size']}/{m['anchor_size']}\t{document.kv_dtype} KV\t{m['model']}\t"
            f"updated {m['created']}\tfrom {m['source']['path']}")
