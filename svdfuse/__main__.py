"""`python -m svdfuse ...` (what `torchrun -m svdfuse merge ...` runs): the command line."""

import sys

from svdfuse.cli import main

sys.exit(main())
