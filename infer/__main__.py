"""`python -m infer` runs the `infer` command."""

import sys

from .cli import main

sys.exit(main())
