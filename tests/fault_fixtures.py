"""Fixtures of the fault tests: a tiny random tokenizer saved once per module, images, an encoded codes file."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from unitok import UniTok
from unitok.config import UniTokConfig
from unitok.images import to_tensor


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = UniTok(UniTokConfig.from_preset('unitok-tiny')).eval()
    d = tmp_path_factory.mktemp('model') / 'tiny'
    model.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope='module')
def model(model_dir):
    return UniTok.from_pretrained(model_dir).eval()


@pytest.fixture(autouse=True)
def cached_model(monkeypatch, model_dir, model):
    """The CLI gets the already built tiny model for ``model_dir`` (loading is tested in commands/test_tokenize.py)."""
    import unitok.commands.tokenize as cli
    original = cli._load_model
    monkeypatch.setattr(cli, '_load_model', lambda path, device, precision='fp32':
                        model if path == model_dir else original(path, device, precision))


def random_images(d, count: int):
    """``count`` random 64 px RGB PNGs ``im{i}.png`` in a new folder ``d`` (seeded)."""
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f'im{i}.png')
    return d


@pytest.fixture()
def imgs(tmp_path):
    return random_images(tmp_path / 'imgs', 3)


@pytest.fixture(scope='module')
def encoded(tmp_path_factory, model):
    from unitok.codes.npz import codebook_digest
    rng = np.random.default_rng(0)
    codes = model.encode(to_tensor([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)], 64))
    out = tmp_path_factory.mktemp('codes') / 'codes.npz'
    np.savez_compressed(out, codes=codes.numpy().astype(np.int16), files=np.array(['im0', 'im1', 'im2']),
                        config=np.array(model.config.to_json()), codebook_digest=np.array(codebook_digest(model)))
    return out


@pytest.fixture()
def codes_npz(tmp_path, encoded):
    out = tmp_path / 'codes.npz'
    out.write_bytes(encoded.read_bytes())
    return out


def leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith('.tmp') or n.startswith('.')]
