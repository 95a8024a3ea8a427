"""Codes written by the tokenizer, in one format with one identity (:mod:`.format`): export directories
of ``uint16`` shards for training (:mod:`.export`, :mod:`.dataset`) and the ``.npz`` of ``unitok
encode`` (:mod:`.npz`)."""
from .dataset import CodeDataset
from .export import ExportConfig, ExportResult, export_codes
from .format import CodeFormatError, check_agreement, code_space, tokenizer_identity
from .views import parse_augment

__all__ = ['CodeDataset', 'CodeFormatError', 'ExportConfig', 'ExportResult', 'check_agreement', 'code_space',
           'export_codes', 'parse_augment', 'tokenizer_identity']
