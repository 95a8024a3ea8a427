"""Loading what an evaluation needs: the generator with its tokenizer, a trained MLLM's training
record, and the labelled items of exported codes."""
from __future__ import annotations

import json
import os
import warnings

import torch

from ..data import open_source

TRAINING_INFO = 'training.json'           # written beside a trained MLLM by the training task


class GenEvalError(ValueError):
    """The generator, tokenizer and data cannot be evaluated together (named in the message)."""


class MLLMEvalError(ValueError):
    """The MLLM, its codes and the data cannot be evaluated together (named in the message)."""


def load_generator(gen_path: str, tokenizer_path: str | None = None, device: str | torch.device = 'cpu'):
    """``(generator, tokenizer, generation info)`` from ``RUN/model`` (with its ``generation.json``);
    the tokenizer defaults to the one recorded there and must be the one whose codes it was trained on."""
    from ..checkpoint import CheckpointError
    from ..generation import GeneratorModel
    from ..codes import check_agreement
    from ..model import UniTok
    from ..train.tasks.generator import GENERATION_INFO
    generator = GeneratorModel.from_pretrained(gen_path, map_location=device)
    info_path = os.path.join(gen_path, GENERATION_INFO)
    info = {}
    if os.path.isfile(info_path):
        try:
            with open(info_path, encoding='utf-8') as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f'cannot read {info_path}: {e}') from None
    tokenizer_path = tokenizer_path or info.get('tokenizer')
    if not tokenizer_path:
        raise GenEvalError(f'no tokenizer: {info_path} names none; pass --tokenizer (the UniTok model whose codes '
                           'the generator was trained on)')
    tokenizer = UniTok.from_pretrained(tokenizer_path).to(device).eval()
    if not info.get('codes_tokenizer'):
        warnings.warn(f'{info_path} records no identity of the tokenizer of the codes: the check that '
                      f'{tokenizer_path!r} is that tokenizer is skipped', stacklevel=2)
    check_agreement(info.get('codes_tokenizer') or {}, tokenizer, where=f'the generator {gen_path!r}',
                    consumer=f'the tokenizer {tokenizer_path!r}', there='in its codes', error=CheckpointError,
                    fix='not the tokenizer whose codes it was trained on')
    return generator, tokenizer, info


def read_training_info(mllm_dir: str) -> dict:
    """The ``training.json`` beside a trained MLLM ({} when absent)."""
    path = os.path.join(mllm_dir, TRAINING_INFO)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise MLLMEvalError(f'cannot read {path}: {e}') from None


def same_dataset(spec_a: str, spec_b: str) -> bool:
    a, b = spec_a.split(':'), spec_b.split(':')
    if a[0] == 'builtin' and b[0] == 'builtin':
        return a[1:2] == b[1:2]
    return os.path.abspath(spec_a.removeprefix('folder:')) == os.path.abspath(spec_b.removeprefix('folder:'))


def code_dataset(codes, label_set, what):
    from ..codes import CodeDataset
    if isinstance(codes, CodeDataset):
        if label_set is not None and codes.classnames != codes.label_sets.get(label_set):
            return CodeDataset(codes.directory, view=0, label=label_set)
        return codes if codes.view == 0 else CodeDataset(codes.directory, view=0, label=label_set)
    if not isinstance(codes, (str, os.PathLike)):
        raise MLLMEvalError(f'{what} codes must be an export directory or a CodeDataset, got {type(codes).__name__}')
    try:
        return CodeDataset(os.fspath(codes), view=0, label=label_set)
    except ValueError as e:
        raise MLLMEvalError(f'{what} codes: {e}') from None


def labelled_items(ds, model, what: str) -> list[dict]:
    """Labelled items of a code dataset: codes (K, h, w), label, name, source index."""
    from ..train.tasks.mllm import item_name
    c = model.config
    ds.check_tokenizer(model.image_tokenizer)
    ds.expect(c.num_codebooks, c.codebook_size, c.grid, what='this MLLM')
    if not ds.classnames:
        raise MLLMEvalError(f'the {what} codes in {ds.directory!r} have no class labels: export labelled data '
                            '(builtin:NAME or a folder with class sub-folders)')
    items = []
    for i in range(len(ds)):
        it = ds[i]
        if it['label'] >= 0:
            items.append(dict(codes=it['codes'], label=it['label'], name=item_name(ds.captions(i)),
                              index=it['index'], key=ds.key(i)))
    if not items:
        raise MLLMEvalError(f'the {what} codes in {ds.directory!r} hold no labelled item (empty split?)')
    return items


def open_images(ds, what: str):
    data = ds.manifest['data']
    if data.get('kind') != 'map':
        raise MLLMEvalError(f'the {what} codes in {ds.directory!r} come from streamed shards: pass the images '
                            '(a map-style source) explicitly')
    return open_source(data['spec'], data['split'], resampled=False)
