"""`python -m worker.cli`: the same command line as `podembed`."""

import sys

from worker.cli import main

sys.exit(main())
