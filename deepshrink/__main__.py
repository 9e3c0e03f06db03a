"""``python -m deepshrink``: the same as the ``deepshrink`` command."""

import sys

from deepshrink.cli import main

sys.exit(main())
