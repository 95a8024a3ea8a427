"""Samples files: the stage of a generator evaluation that samples, apart from the stage that measures.

A samples file ``DIR/cfg-<scale>.npz`` holds the codes a class-conditional generator sampled at one
guidance scale ``(N, K, h, w)``, their class labels ``(N,)`` and a JSON header saying what produced
them (the generator's path and weights digest, the seed, scale, sampling filters, samples per class,
chunk size). :meth:`Sampler.codes` reuses a file whose header matches and re-samples (and rewrites)
one that is missing, unreadable or made with other settings, so an interrupted evaluation resumes and
a re-measurement does not re-sample. Files hold no pickles and are written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..utils import distributed as D
from ..utils.io import atomic_write
from .sampling import gather_rows, progress_bar, sample_chunks

log = logging.getLogger(__name__)

FORMAT = 'unitok-generator-samples'
VERSION = 1
INFORMATIVE = ('generator', 'torch')      # header fields recorded but not compared


class SamplesFileError(ValueError):
    """A file cannot be read as generator samples (the message names the file and why)."""


def samples_path(directory: str, scale: float) -> str:
    return os.path.join(directory, f'cfg-{float(scale):g}.npz')


def module_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes): the identity of its weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f'{name}|{t.dtype}|{tuple(t.shape)}|'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_samples(path: str, codes: torch.Tensor, labels: torch.Tensor, header: dict) -> None:
    """Write ``codes (N, K, h, w)``, ``labels (N,)`` and ``header`` to ``path`` atomically."""
    codes_np = codes.cpu().numpy()
    small = codes_np.size == 0 or int(codes_np.max()) < np.iinfo(np.int16).max
    arrays = {'codes': codes_np.astype(np.int16 if small else np.int32),
              'labels': labels.cpu().numpy().astype(np.int32),
              'header': np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)}
    atomic_write(path, lambda f: np.savez(f, **arrays), what='samples file')


def read_samples(path: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(codes (N, K, h, w) int64, labels (N,) int64, header)`` of a samples file; any damage raises
    :class:`SamplesFileError`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {'codes', 'labels', 'header'} - set(z.files)
            if missing:
                raise SamplesFileError(f'{path!r} is not a samples file: no {sorted(missing)}')
            codes, labels, raw = z['codes'], z['labels'], z['header']
        header = json.loads(raw.tobytes().decode())
    except SamplesFileError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise SamplesFileError(f'cannot read samples file {path!r}: {type(e).__name__}: {e}') from None
    if not isinstance(header, dict) or header.get('format') != FORMAT or header.get('version') != VERSION:
        raise SamplesFileError(f'{path!r} is not a {FORMAT} file of version {VERSION}')
    if codes.ndim != 4 or labels.ndim != 1 or len(codes) != len(labels) or codes.dtype.kind != 'i':
        raise SamplesFileError(f'{path!r} holds codes {codes.shape} and labels {labels.shape}: not (N, K, h, w) '
                               'integer codes with one label each')
    return torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(labels.astype(np.int64)), header


@dataclass
class Sampler:
    """Stage 1 of a generator evaluation: the codes of every sample at one guidance scale, on the
    planned chunks (:func:`~unitok.eval.sampling.sample_chunks`); with a ``directory`` they live in
    samples files. ``cfg`` is a :class:`~unitok.eval.generation.GenEvalConfig`. Every rank of
    ``group`` calls :meth:`codes`; chunk ``i`` is sampled by rank ``i % world``."""
    generator: nn.Module
    cfg: object
    directory: str | None = None
    generator_path: str | None = None
    group: object = None
    show: bool = False

    def __post_init__(self):
        self.rank, self.world = D.rank_and_world(self.group)
        self.show = self.show and self.rank == 0
        self._digest = None

    def header(self, scale: float) -> dict:
        """What decides the samples of ``scale`` (and, in :data:`INFORMATIVE`, where they came from)."""
        c, cfg = self.generator.config, self.cfg
        if self._digest is None:
            self._digest = module_digest(self.generator)
        return {'format': FORMAT, 'version': VERSION, 'generator': self.generator_path,
                'generator_sha256': self._digest, 'num_classes': c.num_classes, 'num_codebooks': c.num_codebooks,
                'codebook_size': c.codebook_size, 'grid': list(c.grid), 'samples_per_class': cfg.samples_per_class,
                'chunk_size': cfg.chunk_size, 'seed': cfg.seed, 'cfg_scale': float(scale),
                'temperature': float(cfg.temperature), 'top_k': int(cfg.top_k), 'top_p': float(cfg.top_p),
                'torch': torch.__version__}

    def labels(self) -> torch.Tensor:
        """The class of every sample ``(N,)``: ``samples_per_class`` consecutive samples per class."""
        spc = self.cfg.samples_per_class
        return torch.arange(self.generator.config.num_classes * spc) // spc

    def codes(self, scale: float) -> torch.Tensor:
        """Codes ``(N, K, h, w)`` int64 on the CPU, in sample order, on every rank: read from the samples
        file when its header matches, else sampled (and written, by rank 0)."""
        if self.directory is None:
            return self.sample(scale)
        path = samples_path(self.directory, scale)
        found = self._reusable(path, self.header(scale)) if self.rank == 0 else None     # rank 0 decides
        found = D.broadcast_object(found, group=self.group)
        if found is not None:
            log.info('cfg %g: samples read from %s', scale, path)
            return found
        codes = self.sample(scale)
        if self.rank == 0:
            write_samples(path, codes, self.labels(), self.header(scale))
        return codes

    def sample(self, scale: float) -> torch.Tensor:
        """Sample this rank's chunks at ``scale`` and gather every rank's codes in sample order."""
        from ..generation import generate
        cfg = self.cfg
        plan = sample_chunks(self.generator.config.num_classes, cfg.samples_per_class, cfg.chunk_size, cfg.seed)
        labels, index, rows = self.labels(), [], []
        mine = plan[self.rank::self.world]
        for lo, hi, seed in progress_bar(mine, f'sampling cfg {scale:g}', len(mine), self.show):
            rows.append(generate(self.generator, labels[lo:hi].to(self.generator.device), cfg_scale=scale,
                                 temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                 generator=seed).cpu())
            index.append(torch.arange(lo, hi))
        return gather_rows(index, {'codes': rows}, self.group)['codes']

    def _reusable(self, path: str, header: dict) -> torch.Tensor | None:
        """The codes of ``path`` when it exists, reads cleanly and was made as ``header`` says; else None
        (with a warning saying why it is sampled again)."""
        if not os.path.exists(path):
            return None
        try:
            codes, labels, theirs = read_samples(path)
        except SamplesFileError as e:
            log.warning('%s; sampling again', e)
            return None
        mine = json.loads(json.dumps(header))
        changed = sorted(k for k in set(mine) | set(theirs) if k not in INFORMATIVE and mine.get(k) != theirs.get(k))
        c = self.generator.config
        if changed:
            log.warning('%s was sampled with other settings (%s); sampling again', path,
                        ', '.join(f'{k}: {theirs.get(k)!r} -> {mine.get(k)!r}' for k in changed))
        elif tuple(codes.shape) != (len(self.labels()), c.num_codebooks, *c.grid) or \
                not torch.equal(labels, self.labels()):
            log.warning('%s holds codes %s for a plan of %d samples; sampling again', path, tuple(codes.shape),
                        len(self.labels()))
        else:
            return codes
        return None
