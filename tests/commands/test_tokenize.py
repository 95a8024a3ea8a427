import os

import numpy as np
import pytest
import torch
from PIL import Image

from unitok import UniTok
from unitok.checkpoint import save_official_checkpoint
from unitok.commands import main


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
    from unitok.commands.tokenize import _unique_names
    files = ['a/x.png', 'b/x.png', 'x_1.png', 'c/x.jpg', 'y.png']
    names = _unique_names(files)
    assert len(set(names)) == len(files) and names[2] == 'x_1' and names[0] == 'x' and names[4] == 'y'


def _encoded(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_encode_in_worker_processes_writes_the_file_of_the_main_process(workdir, capsys):
    """Images of other sizes (resized by the transform) and formats, read in 2 loader workers: the
    codes file holds exactly what reading them in the main process gives, files in order."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(workdir / 'imgs' / 'im3.jpg')
    Image.fromarray(rng.integers(0, 256, (128, 64), dtype=np.uint8), 'L').save(workdir / 'imgs' / 'im4.png')
    common = [str(workdir / 'imgs'), '--model', str(workdir / 'model'), '--batch-size', '2']
    assert main(['encode', *common, '--out', str(workdir / 'w0.npz'), '--workers', '0']) == 0
    assert main(['encode', *common, '--out', str(workdir / 'w2.npz'), '--workers', '2']) == 0
    printed = capsys.readouterr().out
    assert '5 image(s) in' in printed and 'images/s; model' in printed and '(2 loader worker(s))' in printed
    a, b = _encoded(workdir / 'w0.npz'), _encoded(workdir / 'w2.npz')
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert [os.path.basename(f) for f in b['files']] == ['im0.png', 'im1.png', 'im2.png', 'im3.jpg', 'im4.png']


@pytest.mark.parametrize('workers', ['0', '2'])
def test_bad_image_in_worker_processes(workdir, capsys, workers):
    """In the second of two batches: without --skip-bad one clear error naming it (the one the main
    process gives) and no codes file; with it the file is listed and the others encoded."""
    (workdir / 'imgs' / 'im2_corrupt.png').write_bytes(b'\x89PNG broken')
    out = workdir / 'codes.npz'
    common = ['encode', str(workdir / 'imgs'), '--model', str(workdir / 'model'), '--out', str(out),
              '--batch-size', '2', '--workers', workers]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert err.startswith("unitok encode: error: cannot read image '") and err.count('\n') == 1
    assert "im2_corrupt.png': cannot identify image file" in err
    assert not out.exists() and not [f for f in os.listdir(workdir) if f.endswith('.tmp')]
    assert main(common + ['--skip-bad']) == 0
    z = _encoded(out)
    assert [os.path.basename(f) for f in z['skipped']] == ['im2_corrupt.png']
    assert [os.path.basename(f) for f in z['files']] == ['im0.png', 'im1.png', 'im2.png']
    assert 'skipped 1 unreadable' in capsys.readouterr().out


def test_throughput_accounting_on_a_fake_clock():
    from unitok.utils.throughput import Throughput, ThroughputMeter
    now = [100.0]

    def loader():                        # 2 s to decode each of 3 batches of 4 images, 0.5 s to shut down
        for _ in range(3):
            now[0] += 2
            yield 4
        now[0] += 0.5
    meter = ThroughputMeter(clock=lambda: now[0])
    for n in meter.wait(loader()):
        with meter.model(n):
            now[0] += 3                  # the model
        now[0] += 1                      # writing outputs: neither
    t = meter.result()
    assert (t.images, t.wall, t.model, t.wait) == (12, 18.5, 9.0, 6.5)
    assert t.images_per_second == 12 / 18.5 and t.model_share == 9 / 18.5 and t.wait_share == 6.5 / 18.5
    assert t.summary() == '12 image(s) in 18.5 s: 0.65 images/s; model 49% of the time, waiting for data 35%'
    both = Throughput.combine([t, Throughput(images=8, wall=10.0, model=8.0, wait=1.0)])
    assert (both.images, both.wall) == (20, 18.5) and both.images_per_second == 20 / 18.5
    assert abs(both.model_share - (9 / 18.5 + 0.8) / 2) < 1e-12 and abs(both.wait_share - (6.5 / 18.5 + 0.1) / 2) < 1e-12
