"""Star Attention's two phases: the engine (Phase 1 blockwise encoding with an anchor, Phase 2 query and decoding), the
attention step over a prefix and a buffer, several processes, and ingest (a document through Phase 1 into the store).
"""
