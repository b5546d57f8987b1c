"""``python -m hellbender …``: the CLI, as torchrun starts it on every rank (``-m hellbender``)."""

from hellbender.cli import main

main()
