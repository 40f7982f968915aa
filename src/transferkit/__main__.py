"""`python -m transferkit` (and `torchrun -m transferkit`) runs the CLI."""

from .cli import program

program()
