"""Neutral helpers shared by every layer (model, checkpoint, data, train, eval): atomic file writes
with clear write errors, and process-group helpers. Nothing here imports another ``unitok`` package."""
from .io import OutputError, atomic_write, check_writable_dir, check_writable_file

__all__ = ['OutputError', 'atomic_write', 'check_writable_dir', 'check_writable_file']
