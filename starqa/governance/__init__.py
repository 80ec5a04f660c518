"""Governance: the audit log, scoped keys, and the `starqa audit` / `starqa keys` commands.
"""
