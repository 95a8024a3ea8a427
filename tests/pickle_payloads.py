"""Objects whose pickle would run code when loaded unrestricted: the safe loaders must refuse them
and leave ``marker`` uncreated."""
import os


class RunsShell:
    """Unpickled, it would run a shell command that creates ``marker``."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


class OpensFile:
    """Unpickled, it would create ``marker`` through ``open``."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))
