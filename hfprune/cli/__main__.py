"""``python -m hfprune.cli``: the ``hfprune`` command."""

import sys

from hfprune.cli import main

sys.exit(main())
