"""Files of Hugging Face hub repositories, found by ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, revisions).

* :func:`repo_files`: what a repository holds (offline: what the local cache knows of it);
* :func:`hub_file`: one file of a repository, downloaded or taken from the cache;
* :func:`resolve_file`: a weights file named by its path, a folder that holds it, or a hub id
  (e.g. ``FoundationVision/unitok_external`` for the official recipe's LPIPS, DINOv2 and Inception weights).

Every failure is one :class:`~unitok.pretrained.CheckpointError` that says what the repository, the
cache or the folder holds instead.
"""
from __future__ import annotations

import os

from .pretrained import CheckpointError, hub_error, is_hub_id

__all__ = ['repo_files', 'find_layout', 'hub_file', 'official_release', 'resolve_file', 'listing']

TOKENIZER_FILE = 'unitok_tokenizer.pth'     # the official tokenizer release (FoundationVision/unitok_tokenizer)

_SHOWN = 20         # file names an error lists before '... (+n more)'


def listing(names: list[str]) -> str:
    """``names`` for an error message: sorted, the first few, how many more; 'nothing' when empty."""
    names = sorted(names)
    more = f' ... (+{len(names) - _SHOWN} more)' if len(names) > _SHOWN else ''
    return ', '.join(names[:_SHOWN]) + more if names else 'nothing'


def repo_files(repo_id: str, revision: str | None = None) -> tuple[list[str], str]:
    """The file paths of hub repository ``repo_id`` at ``revision`` and where that list comes from:
    ``'the repository'`` (asked online), or ``'the local cache'`` (offline or when the hub cannot be
    reached: the tree listing the cache recorded, else the files of the cached snapshot)."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    if not constants.HF_HUB_OFFLINE:
        try:
            return sorted(HfApi().list_repo_files(repo_id, revision=revision)), 'the repository'
        except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise hub_error(e, repo_id, revision) from None
        except Exception:   # the hub cannot be reached (network, timeout, server error): ask the cache
            pass
    cached_tree = getattr(huggingface_hub, 'get_cached_repo_tree', None)      # huggingface_hub >= 1.x
    if cached_tree is not None:
        try:
            return sorted(f.path for f in cached_tree(repo_id, revision=revision)), 'the local cache'
        except Exception:   # no listing recorded for this revision: list the cached snapshot instead
            pass
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
    except OSError as e:
        raise hub_error(e, repo_id, revision) from None
    found = [os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/')
             for root, _, names in os.walk(folder) for name in names]
    return sorted(found), 'the local cache'


def find_layout(repo_id: str, layouts: dict[str, tuple[str, ...]], what: str, revision: str | None = None) -> str:
    """The first name of ``layouts`` (``{name: file names}``) whose files hub repository ``repo_id`` holds;
    when none fits, one CheckpointError names each layout (``what`` says what the model is) and lists what
    the repository holds."""
    files, where = repo_files(repo_id, revision)
    for name, needed in layouts.items():
        if set(needed) <= set(files):
            return name
    wanted = ' nor '.join(f'{" + ".join(needed)} ({name})' for name, needed in layouts.items())
    raise CheckpointError(f'hub model {repo_id!r} is not {what}: it holds neither {wanted}; {where} holds: '
                          f'{listing(files)}')


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> str:
    """The local path of ``filename`` of hub repository ``repo_id`` (downloaded once, then from the cache);
    a repository without it is a CheckpointError listing what the repository holds."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except LocalEntryNotFoundError as e:
        if not constants.HF_HUB_OFFLINE:
            raise hub_error(e, repo_id, revision) from None
        files, where = _files_or_none(repo_id, revision)
        if files is None:
            raise hub_error(e, repo_id, revision) from None
        raise CheckpointError(f'{filename!r} of hub repository {repo_id!r} is not in the local Hugging Face cache, '
                              f'and HF_HUB_OFFLINE=1 forbids downloading it ({where} holds: {listing(files)}). '
                              f'Download it once while online, or pass a local file.') from None
    except EntryNotFoundError:
        files, where = repo_files(repo_id, revision)
        raise CheckpointError(f'hub repository {repo_id!r} has no file {filename!r}; {where} holds: '
                              f'{listing(files)}') from None
    except (HfHubHTTPError, OSError) as e:
        raise hub_error(e, repo_id, revision) from None


def official_release(repo_id: str, revision: str | None, library_files: tuple[str, ...]) -> str | None:
    """The local path of the official tokenizer file ``unitok_tokenizer.pth`` of hub repository ``repo_id``, or
    None when the repository holds ``library_files`` (this library's layout, preferred); neither: CheckpointError."""
    layouts = {"this library's layout": library_files, 'the official release': (TOKENIZER_FILE,)}
    if find_layout(repo_id, layouts, 'a UniTok model', revision) != 'the official release':
        return None
    return hub_file(repo_id, TOKENIZER_FILE, revision)


def _files_or_none(repo_id: str, revision: str | None) -> tuple[list[str] | None, str]:
    try:
        return repo_files(repo_id, revision)
    except CheckpointError:
        return None, ''


def resolve_file(spec: str, filename: str, what: str, revision: str | None = None) -> str:
    """A local path to the weights ``filename`` named by ``spec``: that file itself, a folder holding
    ``filename``, or a hub id whose repository holds it. ``what`` names the weights in errors."""
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return spec
    if os.path.isdir(spec):
        path = os.path.join(spec, filename)
        if os.path.isfile(path):
            return path
        raise CheckpointError(f'{what}: the folder {spec!r} has no {filename} (it holds: '
                              f'{listing(os.listdir(spec))})')
    if is_hub_id(spec):
        return hub_file(spec, filename, revision)
    raise CheckpointError(f'{what}: no file or folder at {spec!r}, and it is not a Hugging Face hub id '
                          f'(owner/name) either')
