"""``torchrun -m unitok.train.cli ARGS``: the same as ``unitok train ARGS`` (see :mod:`unitok.commands.train`)."""
import sys

from ..commands import main

if __name__ == '__main__':
    sys.exit(main(['train', *sys.argv[1:]]))
