"""`python -m train` runs the `lightning` command (LightningCLI)."""

import sys

from .cli import main

sys.exit(main())
