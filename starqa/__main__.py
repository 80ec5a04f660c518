"""`python -m starqa` (also how torchrun launches starqa on every rank)."""

from starqa.cli import run

run()
