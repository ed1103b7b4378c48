"""``python -m unifusion.train``: the training command line (see `unifusion.train.cli`)."""

import sys

from .cli import main

sys.exit(main())
