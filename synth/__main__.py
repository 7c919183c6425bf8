"""`python -m synth` runs the `synth` command."""

import sys

from .cli import main

sys.exit(main())
