"""`python -m compactlm ...` (and `torchrun -m compactlm ...`) runs the CLI."""

import sys

from compactlm.cli import main

sys.exit(main())
