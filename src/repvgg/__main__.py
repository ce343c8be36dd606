"""``python -m repvgg`` (also what ``torchrun -m repvgg`` runs)."""

import sys

from repvgg.cli import main

sys.exit(main())
