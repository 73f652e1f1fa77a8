"""`python -m openmae ...` (and `torchrun -m openmae pretrain ...`) runs the `mae` command."""

import sys

from openmae.cli import main

sys.exit(main())
