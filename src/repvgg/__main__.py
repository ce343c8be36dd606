"""``python -m repvgg`` (also what ``torchrun -m repvgg`` runs)."""

from repvgg.cli import run_and_exit

run_and_exit()
