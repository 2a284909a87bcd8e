"""`python -m lmtune ...` is the same as the `lmtune` command."""

import sys

from lmtune.cli import main

sys.exit(main())
