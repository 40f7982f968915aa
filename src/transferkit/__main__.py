"""`python -m transferkit` (and `torchrun -m transferkit`) runs the CLI."""

from .cli import entry

raise SystemExit(entry())
