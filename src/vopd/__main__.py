"""`python -m vopd ...` (used by torchrun) is the same as the `vopd` command."""

import sys

from vopd.cli import main

sys.exit(main())
