"""``python -m llmtune ...`` (also what ``torchrun -m llmtune train ...`` runs)."""

from llmtune.cli import main

raise SystemExit(main())
