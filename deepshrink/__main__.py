"""``python -m deepshrink``: what ``torchrun --nproc-per-node N -m deepshrink ...`` runs on every rank."""

import sys

from deepshrink.cli import main

sys.exit(main())
