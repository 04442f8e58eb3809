"""`python -m svdfuse.study ...`: the same as `svdfuse study ...` (the command line imports the
study, never the other way round)."""

import sys

from svdfuse.cli import main

sys.exit(main(["study", *sys.argv[1:]]))
