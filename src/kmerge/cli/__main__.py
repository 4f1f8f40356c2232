"""``python -m kmerge.cli``."""

import sys

from kmerge.cli import main

sys.exit(main())
