"""``python -m unitok``: the ``unitok`` command (see :mod:`unitok.commands`)."""
import sys

from .commands import main

if __name__ == '__main__':
    sys.exit(main())
