"""A Hugging Face cache filled locally, laid out as huggingface_hub's own downloads leave it, so that
``hf_hub_download`` / ``snapshot_download`` resolve hub ids from it with ``HF_HUB_OFFLINE=1``.

huggingface_hub has no public call that adds a local file to its cache, so the three parts of a cached
repository are written here: ``blobs/<hash>`` (the content), ``snapshots/<commit>/<name>`` (a relative
link to the blob) and ``refs/<revision>`` (the commit); all resolution is left to huggingface_hub.
"""
import hashlib
import os
import shutil
from pathlib import Path

COMMIT = '0123456789abcdef0123456789abcdef01234567'


def use_cache(monkeypatch, cache: Path) -> Path:
    """Point huggingface_hub at ``cache`` (as ``HF_HUB_CACHE=cache`` would, for this process and children)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return cache


def cache_repo(cache: Path, repo_id: str, files: dict[str, 'bytes | str | Path'], commit: str = COMMIT,
               revision: str = 'main') -> Path:
    """Add ``files`` (name -> bytes, or the path of a file to link or copy) to ``repo_id`` at ``revision`` in
    the cache ``cache``; returns the snapshot folder."""
    repo = Path(cache) / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo / 'snapshots' / commit
    (repo / 'blobs').mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        source = Path(content) if isinstance(content, (str, Path)) else None
        if source is None:
            digest = hashlib.sha256(content).hexdigest()
        else:
            with open(source, 'rb') as f:
                digest = hashlib.file_digest(f, 'sha256').hexdigest()
        blob = repo / 'blobs' / digest                      # the hub names LFS blobs by their sha256
        if not blob.exists():
            if source is None:
                blob.write_bytes(content)
            else:
                try:
                    os.link(source, blob)                   # big fixtures: no second copy on disk
                except OSError:
                    shutil.copyfile(source, blob)
        entry = snapshot / name
        entry.parent.mkdir(parents=True, exist_ok=True)
        if entry.exists() or entry.is_symlink():
            entry.unlink()
        try:
            entry.symlink_to(os.path.relpath(blob, entry.parent))
        except OSError:                                      # no symlinks (Windows without developer mode)
            shutil.copyfile(blob, entry)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / revision).write_text(commit)
    return snapshot

