import os

import numpy as np
import pytest
import torch
from PIL import Image

from unitok import UniTok
from unitok.checkpoint import save_official_checkpoint
from unitok.cli import main


@pytest.fixture()
def workdir(tmp_path, tiny_model):
    tiny_model.save_pretrained(str(tmp_path / 'model'))
    (tmp_path / 'imgs').mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(tmp_path / 'imgs' / f'im{i}.png')
    return tmp_path


def test_convert_info(workdir, tiny_model, capsys):
    save_official_checkpoint(tiny_model, str(workdir / 'official.pth'))
    assert main(['convert', str(workdir / 'official.pth'), str(workdir / 'converted')]) == 0
    assert UniTok.from_pretrained(str(workdir / 'converted')).config == tiny_model.config
    assert main(['info', str(workdir / 'converted')]) == 0
    out = capsys.readouterr().out
    assert 'decoder' in out and 'total' in out and '8 x 512' in out


def test_encode_decode_reconstruct(workdir, tiny_model):
    m = str(workdir / 'model')
    assert main(['encode', str(workdir / 'imgs'), '--model', m, '--out', str(workdir / 'codes.npz'),
                 '--batch-size', '2']) == 0
    with np.load(workdir / 'codes.npz') as z:
        codes, files = z['codes'], list(z['files'])
    assert codes.shape == (3, 8, 4, 4) and codes.dtype == np.int16 and len(files) == 3
    from unitok.images import to_tensor
    x = to_tensor([str(workdir / 'imgs' / 'im1.png')], size=64)
    assert np.array_equal(codes[1], tiny_model.encode(x)[0].numpy())
    assert main(['decode', str(workdir / 'codes.npz'), '--model', m, '--out-dir', str(workdir / 'dec')]) == 0
    assert sorted(os.listdir(workdir / 'dec')) == ['im0.png', 'im1.png', 'im2.png']
    decoded = np.asarray(Image.open(workdir / 'dec' / 'im1.png'))
    from unitok.images import to_uint8
    assert np.array_equal(decoded, to_uint8(tiny_model.decode(torch.from_numpy(codes[1:2]).long()))[0])
    assert main(['reconstruct', str(workdir / 'imgs'), '--model', m, '--out-dir', str(workdir / 'rec')]) == 0
    assert Image.open(workdir / 'rec' / 'im0.png').size == (128, 64)


def test_unreadable_image_stops_and_writes_nothing(workdir, capsys):
    (workdir / 'imgs' / 'zz_corrupt.png').write_bytes(b'\x89PNG broken')
    out = workdir / 'codes.npz'
    assert main(['encode', str(workdir / 'imgs'), '--model', str(workdir / 'model'), '--out', str(out)]) == 2
    assert 'zz_corrupt.png' in capsys.readouterr().err
    assert not out.exists() and not [f for f in os.listdir(workdir) if f.endswith('.tmp')]
    assert main(['encode', str(workdir / 'imgs'), '--model', str(workdir / 'model'), '--out', str(out),
                 '--skip-bad']) == 0
    with np.load(out) as z:
        assert z['codes'].shape[0] == 3 and [os.path.basename(f) for f in z['skipped']] == ['zz_corrupt.png']


def test_decode_rejects_out_of_range_codes(workdir, capsys):
    np.savez(workdir / 'bad.npz', codes=np.full((1, 8, 4, 4), 9999, np.int32))
    assert main(['decode', str(workdir / 'bad.npz'), '--model', str(workdir / 'model'),
                 '--out-dir', str(workdir / 'dec')]) == 2
    assert 'must lie in [0, 512)' in capsys.readouterr().err
    np.savez(workdir / 'float.npz', codes=np.zeros((1, 8, 4, 4), np.float32))
    assert main(['decode', str(workdir / 'float.npz'), '--model', str(workdir / 'model'),
                 '--out-dir', str(workdir / 'dec')]) == 2
    assert 'integers' in capsys.readouterr().err


def test_missing_model_is_a_clear_error(workdir, capsys):
    assert main(['info', str(workdir / 'nope')]) == 2
    assert 'no model at' in capsys.readouterr().err


def test_output_names_never_collide():
    from unitok.cli import _unique_names
    files = ['a/x.png', 'b/x.png', 'x_1.png', 'c/x.jpg', 'y.png']
    names = _unique_names(files)
    assert len(set(names)) == len(files) and names[2] == 'x_1' and names[0] == 'x' and names[4] == 'y'
