"""Answering: `ask` (Phase 2 over stored documents, questions in batches), one pass of answers (Star or full attention),
hybrid answering and its escalation to a larger model, the answer record programs get, and the event stream the CLI
and the server render.
"""
