"""``python -m llmtune ...`` (also what ``torchrun -m llmtune train ...`` runs)."""

from llmtune.cli import run

run()
