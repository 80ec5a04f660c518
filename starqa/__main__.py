"""`python -m starqa` (also how torchrun launches starqa on every rank)."""

import sys

from starqa.cli import main

sys.exit(main())
