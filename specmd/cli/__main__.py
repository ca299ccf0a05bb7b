"""`python -m specmd.cli`: the `specmd` command."""

import sys

from specmd.cli import main

sys.exit(main())
