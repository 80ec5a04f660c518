"""The document store on disk and the KV cache's forms: stored versions, their root, listing, the JSON records of
models/, KV precision, the KV as Phase 2 holds it, and block reuse across versions.
"""
