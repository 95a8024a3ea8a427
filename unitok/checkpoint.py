"""Former home of saving and loading, kept for the names other modules and users import from here:
the contract is :mod:`unitok.pretrained`, the official release format :mod:`unitok.official`."""
from __future__ import annotations

from .model import UniTok
from .official import load_official_checkpoint, official_state_dict, read_official_checkpoint, save_official_checkpoint
from .pretrained import CheckpointError

__all__ = ['CheckpointError', 'load_pretrained', 'save_pretrained', 'push_to_hub',
           'read_official_checkpoint', 'load_official_checkpoint', 'official_state_dict', 'save_official_checkpoint']


def load_pretrained(path_or_hub_id: str, map_location='cpu', revision: str | None = None) -> UniTok:
    """``UniTok.from_pretrained(path_or_hub_id, map_location, revision)``."""
    return UniTok.from_pretrained(path_or_hub_id, map_location, revision)


def save_pretrained(model: UniTok, directory: str, repo_id: str | None = None) -> None:
    """``model.save_pretrained(directory, repo_id=repo_id)``."""
    model.save_pretrained(directory, repo_id=repo_id)


def push_to_hub(model: UniTok, repo_id: str, **kwargs) -> str:
    """``model.push_to_hub(repo_id, **kwargs)``."""
    return model.push_to_hub(repo_id, **kwargs)
