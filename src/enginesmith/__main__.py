"""``python -m enginesmith ...``: the same command line as the ``enginesmith`` script."""

from .cli import main

main()
