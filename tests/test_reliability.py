"""Fault cases of issue 9 outside the training loop: each bad input or failing environment gets one
clear error, nothing half-written, no silently wrong result."""
import errno
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import unitok
from unitok import UniTok
from unitok.codes.npz import read_codes_file
from unitok.commands import main
from unitok.config import ConfigError, UniTokConfig
from unitok.images import ImageReadError, load_image, to_rgb, to_tensor


# ---------------------------------------------------------------------- fixtures
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


@pytest.fixture()
def imgs(tmp_path):
    d = tmp_path / 'imgs'
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f'im{i}.png')
    return d


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


# ---------------------------------------------------------------------- 6: small webdataset shards
def write_shard(path, n):
    with tarfile.open(path, 'w') as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new('RGB', (16, 16), (i * 20, 0, 0)).save(buf, 'PNG')
            for ext, data in (('png', buf.getvalue()), ('txt', f'caption {i}'.encode())):
                info = tarfile.TarInfo(f'{i:04d}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize('resampled', [True, False])
def test_small_webdataset_shard_streams_with_the_default_buffer(tmp_path, resampled):
    from unitok.data import WebDatasetSource
    write_shard(tmp_path / 'shard.tar', 10)
    source = WebDatasetSource(str(tmp_path / 'shard.tar'), resampled=resampled)   # shuffle_buffer=1000
    stream = source.iter_raw(0, 1, seed=0)
    got = [next(stream) for _ in range(150)]
    assert [p for p, _ in got] == list(range(150))
    assert {s['__key__'] for _, s in got} == {f'{i:04d}' for i in range(10)}
    resumed = source.iter_raw(0, 1, seed=0, start=120)
    assert [s['__key__'] for _, s in (next(resumed) for _ in range(30))] == [s['__key__'] for _, s in got[120:]]


def test_webdataset_shards_without_samples_still_stop(tmp_path):
    from unitok.data import WebDatasetSource
    (tmp_path / 'empty.tar').write_bytes(b'\0' * 1024)
    with pytest.raises(RuntimeError, match='no readable samples in 1 shard'):
        next(WebDatasetSource(str(tmp_path / 'empty.tar')).iter_raw(0, 1, seed=0))
    with pytest.raises(ValueError, match='shuffle_buffer'):
        WebDatasetSource(str(tmp_path / 'empty.tar'), shuffle_buffer=-1)


# ---------------------------------------------------------------------- 7: disk full / read-only
def test_encode_disk_full_is_one_error_and_writes_nothing(tmp_path, imgs, model_dir, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(np, 'savez_compressed', full)
    out = tmp_path / 'codes.npz'
    assert main(['encode', str(imgs), '--model', model_dir, '--out', str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'disk is full' in err and 'codes.npz' in err
    assert not out.exists() and not leftovers(tmp_path)


def test_decode_disk_full_leaves_no_output(tmp_path, codes_npz, model_dir, monkeypatch, capsys):
    calls = []

    def full(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:                   # the second PNG: the first one is already written
            raise OSError(errno.ENOSPC, 'No space left on device')
        return original(self, fp, *args, **kwargs)
    original = Image.Image.save
    monkeypatch.setattr(Image.Image, 'save', full)
    out = tmp_path / 'dec'
    assert main(['decode', str(codes_npz), '--model', model_dir, '--out-dir', str(out), '--batch-size', '1']) == 1
    err = capsys.readouterr().err
    assert 'disk is full' in err and str(out) in err
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize('code,words', [(errno.EROFS, 'read-only'), (errno.EACCES, 'permission denied')])
@pytest.mark.parametrize('command', ['encode', 'decode', 'reconstruct', 'convert', 'eval'])
def test_unwritable_output_fails_before_the_work(tmp_path, imgs, model_dir, monkeypatch, capsys, command, code,
                                                 words):
    import tempfile

    import unitok.commands.tokenize as cli
    import unitok.eval as ev
    np.savez(tmp_path / 'codes.npz', codes=np.zeros((1, 8, 4, 4), np.int16))
    work = []
    monkeypatch.setattr(cli, '_load_model', lambda *a: work.append('model'))
    monkeypatch.setattr(unitok.checkpoint, 'load_official_checkpoint', lambda *a: work.append('model'))
    monkeypatch.setattr(ev, 'run_evaluation', lambda *a, **k: work.append('eval'))

    def refused(*args, **kwargs):         # tests run as root, which chmod cannot stop: simulate it
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(tempfile, 'mkstemp', refused)
    out = str(tmp_path / 'out' / 'x.npz')
    argv = {'encode': ['encode', str(imgs), '--model', model_dir, '--out', out],
            'decode': ['decode', str(tmp_path / 'codes.npz'), '--model', model_dir, '--out-dir', out],
            'reconstruct': ['reconstruct', str(imgs), '--model', model_dir, '--out-dir', out],
            'convert': ['convert', str(tmp_path / 'official.pth'), out],
            'eval': ['eval', '--model', model_dir, '--data', 'builtin:emoji', '--out', out]}[command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert words in err and 'x.npz' in err and len(err.strip().splitlines()) == 1
    assert work == [] and not os.path.exists(tmp_path / 'out')


def test_output_paths_of_the_wrong_kind(tmp_path, imgs, model_dir, capsys):
    (tmp_path / 'adir').mkdir()
    assert main(['encode', str(imgs), '--model', model_dir, '--out', str(tmp_path / 'adir')]) == 1
    assert 'existing directory' in capsys.readouterr().err
    (tmp_path / 'afile').write_text('x')
    assert main(['reconstruct', str(imgs), '--model', model_dir, '--out-dir', str(tmp_path / 'afile')]) == 1
    assert 'existing file' in capsys.readouterr().err


def test_convert_refuses_to_overwrite_a_model_without_force(tmp_path, model, capsys):
    from unitok.checkpoint import save_official_checkpoint
    save_official_checkpoint(model, str(tmp_path / 'official.pth'))
    out = tmp_path / 'converted'
    assert main(['convert', str(tmp_path / 'official.pth'), str(out)]) == 0
    stamp = os.stat(out / 'model.safetensors').st_mtime_ns
    assert main(['convert', str(tmp_path / 'official.pth'), str(out)]) == 1
    assert '--force' in capsys.readouterr().err and os.stat(out / 'model.safetensors').st_mtime_ns == stamp
    assert main(['convert', str(tmp_path / 'official.pth'), str(out), '--force']) == 0
    (tmp_path / 'file').write_text('x')
    assert main(['convert', str(tmp_path / 'official.pth'), str(tmp_path / 'file')]) == 1
    assert 'existing file' in capsys.readouterr().err


def test_staged_directory_is_all_or_nothing(tmp_path):
    from unitok.utils.io import staged_directory
    target = tmp_path / 'a' / 'b' / 'out'
    with pytest.raises(KeyError):
        with staged_directory(str(target)) as d:
            (open(os.path.join(d, '1.png'), 'w')).close()
            raise KeyError('late failure')
    assert not (tmp_path / 'a').exists()
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep.txt').write_text('old')
    with staged_directory(str(tmp_path / 'out')) as d:
        (tmp_path / 'new.txt').write_text('new')
        os.replace(tmp_path / 'new.txt', os.path.join(d, 'new.txt'))
    assert sorted(os.listdir(tmp_path / 'out')) == ['keep.txt', 'new.txt'] and not leftovers(tmp_path)


# ---------------------------------------------------------------------- 8: every PIL mode
RAMP8 = np.tile(np.arange(256, dtype=np.uint8), (4, 1))                   # mean 127.5
RAMP16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))


def _palette_grey():
    im = Image.fromarray(RAMP8, 'L').convert('P')
    return im


def _transparent(mode, colour):
    im = Image.new(mode, (8, 8), colour)
    if mode in ('P', 'PA'):
        im.putpalette([0, 0, 0] * 256)
    return im


MODES = {
    '1': (lambda: Image.fromarray(RAMP8 >= 128), 127.5),
    'L': (lambda: Image.fromarray(RAMP8, 'L'), 127.5),
    'P': (_palette_grey, 127.5),
    'RGB': (lambda: Image.fromarray(np.stack([RAMP8] * 3, -1), 'RGB'), 127.5),
    'I;16': (lambda: Image.frombytes('I;16', (256, 4), RAMP16.astype('<u2').tobytes()), 127.5),
    'I;16L': (lambda: Image.frombytes('I;16L', (256, 4), RAMP16.astype('<u2').tobytes()), 127.5),
    'I;16B': (lambda: Image.frombytes('I;16B', (256, 4), RAMP16.astype('>u2').tobytes()), 127.5),
    'I;16N': (lambda: Image.frombytes('I;16N', (256, 4), RAMP16.astype('=u2').tobytes()), 127.5),
    'I': (lambda: Image.fromarray(RAMP16.astype(np.int32)), 127.5),
    'F': (lambda: Image.fromarray(RAMP16.astype(np.float32) / 65535, 'F'), 127.5),
    'RGBA': (lambda: _transparent('RGBA', (0, 0, 0, 0)), 255.0),
    'RGBa': (lambda: _transparent('RGBa', (0, 0, 0, 0)), 255.0),
    'LA': (lambda: _transparent('LA', (0, 0)), 255.0),
    'La': (lambda: _transparent('La', (50, 100)), (127.5 * 100 + 255 * 155) / 255),   # premultiplied
    'PA': (lambda: _transparent('PA', (0, 0)), 255.0),
    'CMYK': (lambda: Image.new('CMYK', (8, 8), (0, 0, 0, 0)), 255.0),
    'YCbCr': (lambda: Image.new('YCbCr', (8, 8), (128, 128, 128)), 128.0),
    'LAB': (lambda: Image.new('LAB', (8, 8), (255, 128, 128)), 254.3),   # L* = 100 is white (PIL: 254,255,254)
    'HSV': (lambda: Image.new('HSV', (8, 8), (0, 0, 200)), 200.0),
}


@pytest.mark.parametrize('mode', sorted(MODES))
def test_every_image_mode_maps_to_the_right_rgb(mode):
    make, mean = MODES[mode]
    im = make()
    assert im.mode == mode
    rgb = np.asarray(to_rgb(im))
    assert rgb.dtype == np.uint8 and rgb.shape[-1] == 3
    assert rgb.mean() == pytest.approx(mean, abs=0.8)


def test_16_bit_png_file_is_not_white(tmp_path):
    Image.fromarray(np.tile(RAMP16, (4, 1))).save(tmp_path / 'g16.png')           # 16 x 256, mode I;16
    assert np.asarray(load_image(tmp_path / 'g16.png')).mean() == pytest.approx(127.5, abs=0.5)
    x = to_tensor(str(tmp_path / 'g16.png'), resize='none')
    assert float(x.mean()) == pytest.approx(0.0, abs=0.01)


def test_transparency_key_and_exif_orientation(tmp_path):
    im = Image.new('RGB', (16, 16), (0, 0, 0))
    im.save(tmp_path / 'key.png', transparency=(0, 0, 0))       # tRNS: black is transparent
    assert np.asarray(load_image(tmp_path / 'key.png')).min() == 255
    tall = Image.new('RGB', (16, 32), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                                           # rotate 90 degrees to display
    tall.save(tmp_path / 'rot.jpg', exif=exif)
    assert load_image(tmp_path / 'rot.jpg').size == (32, 16)


@pytest.mark.parametrize('make,match', [
    (lambda: Image.fromarray(np.full((4, 4), 200.0, np.float32), 'F'), r'\[0, 1\]'),
    (lambda: Image.fromarray(np.full((4, 4), -5, np.int32)), '16-bit range'),
    (lambda: Image.fromarray(np.full((4, 4), 70000, np.int32)), '16-bit range'),
])
def test_modes_that_cannot_be_mapped_are_refused(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        to_rgb(make())
    make().save(tmp_path / 'x.tiff')
    with pytest.raises(ImageReadError, match='x.tiff'):
        load_image(tmp_path / 'x.tiff')


def test_uint16_arrays_scale_like_16_bit_files():
    x = to_tensor(np.tile(RAMP16[:, :, None], (4, 1, 3)), resize='none')
    assert float(x.mean()) == pytest.approx(0.0, abs=0.01)


# ---------------------------------------------------------------------- 10/11/13: codes files
def test_codes_from_another_configuration_are_refused(tmp_path, imgs, model_dir, capsys):
    torch.manual_seed(1)
    other = UniTok(UniTokConfig.from_preset('unitok-tiny', codebook_size=256)).eval()
    other.save_pretrained(str(tmp_path / 'm256'))
    out = tmp_path / 'c256.npz'
    assert main(['encode', str(imgs), '--model', str(tmp_path / 'm256'), '--out', str(out)]) == 0
    assert main(['decode', str(out), '--model', model_dir, '--out-dir', str(tmp_path / 'dec')]) == 2
    err = capsys.readouterr().err
    assert 'another configuration' in err and 'codebook_size 256 in the file, 512 in the model' in err
    assert not (tmp_path / 'dec').exists()
    assert main(['decode', str(out), '--model', model_dir, '--out-dir', str(tmp_path / 'dec'),
                 '--ignore-mismatch']) == 0
    assert len(os.listdir(tmp_path / 'dec')) == 3


def test_codes_from_other_codebooks_are_refused(tmp_path, codes_npz, capsys):
    torch.manual_seed(7)                      # same configuration, other weights
    UniTok(UniTokConfig.from_preset('unitok-tiny')).save_pretrained(str(tmp_path / 'other'))
    assert main(['decode', str(codes_npz), '--model', str(tmp_path / 'other'), '--out-dir', str(tmp_path / 'd')]) == 2
    assert 'other codebooks' in capsys.readouterr().err and not (tmp_path / 'd').exists()


def test_bad_entry_late_in_the_file_writes_nothing(tmp_path, model_dir, capsys):
    codes = np.zeros((12, 8, 4, 4), np.int16)
    codes[9, 3, 1, 1] = 600                    # entry 9 out of range for 512 codes
    np.savez(tmp_path / 'c.npz', codes=codes)
    out = tmp_path / 'dec'
    assert main(['decode', str(tmp_path / 'c.npz'), '--model', model_dir, '--out-dir', str(out),
                 '--batch-size', '2']) == 2
    assert 'entry 9' in capsys.readouterr().err
    assert not out.exists() and not leftovers(tmp_path)


def test_reconstruct_with_a_late_corrupt_image_writes_nothing(tmp_path, imgs, model_dir, capsys):
    (imgs / 'zz_bad.png').write_bytes(b'\x89PNG truncated')
    out = tmp_path / 'rec'
    assert main(['reconstruct', str(imgs), '--model', model_dir, '--out-dir', str(out), '--batch-size', '1']) == 2
    assert 'zz_bad.png' in capsys.readouterr().err
    assert not out.exists() and not leftovers(tmp_path)
    assert main(['reconstruct', str(imgs), '--model', model_dir, '--out-dir', str(out), '--skip-bad']) == 0
    assert sorted(os.listdir(out)) == ['im0.png', 'im1.png', 'im2.png']


def _truncated(path, tmp_path):
    data = path.read_bytes()
    (tmp_path / 'bad.npz').write_bytes(data[:len(data) // 2])


def _corrupt_member(path, tmp_path):
    data = bytearray(path.read_bytes())
    data[60:200] = b'\xff' * 140                      # inside the compressed "codes" member
    (tmp_path / 'bad.npz').write_bytes(bytes(data))


@pytest.mark.parametrize('make,match', [
    (_truncated, 'truncated or corrupt'),
    (_corrupt_member, 'truncated or corrupt'),
    (lambda p, t: np.savez(t / 'bad.npz', codes=np.array(5)), r'must be an array \(N, K, h, w\)'),
    (lambda p, t: (t / 'bad.npz').write_text('hello, I am text'), 'not a codes file'),
    (lambda p, t: np.savez(t / 'bad.npz', codes=np.zeros((1, 8, 4, 4), np.int16),
                           files=np.array([{'x': 1}], dtype=object)), 'pickled'),
    (lambda p, t: np.savez(t / 'bad.npz', images=np.zeros(3)), 'no "codes" array'),
    (lambda p, t: np.savez(t / 'bad.npz', codes=np.zeros((2, 8, 4, 4), np.int16), files=np.array(['a'])),
     r'names 1 file\(s\) for 2'),
])
def test_broken_codes_files_get_one_clear_error(tmp_path, codes_npz, model_dir, capsys, make, match):
    make(codes_npz, tmp_path)
    with pytest.raises((ValueError, TypeError), match=match):
        read_codes_file(str(tmp_path / 'bad.npz'))
    assert main(['decode', str(tmp_path / 'bad.npz'), '--model', model_dir, '--out-dir', str(tmp_path / 'd')]) == 2
    err = capsys.readouterr().err
    assert 'bad.npz' in err and len(err.strip().splitlines()) == 1 and not (tmp_path / 'd').exists()


# ---------------------------------------------------------------------- 12/14: model inputs
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_cast(model, images64, dtype):
    x = images64[:1, :, :32, :32].to(dtype)               # small: bfloat16 is slow on CPU
    ref = model.encode(x.float())                       # the same pixels at float32 precision
    assert torch.equal(model.encode(x), ref) if dtype == torch.float64 else model.encode(x).shape == ref.shape
    assert model.reconstruct(x).dtype == torch.float32
    assert model.encode_image(x).shape == (1, model.config.embed_dim)
    assert model(x).codes.shape[0] == 1


def test_bad_model_arguments(model):
    K = model.config.num_codebooks
    codes = torch.zeros(1, K, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r'grid must be \(h, w\), two positive integers'):
        model.decode(codes.flatten(2), grid=(-4, -4))
    with pytest.raises(ValueError, match=r'\(B, 8, h, w\).*batch axis'):
        model.decode(torch.zeros(K, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match='texts must be a string'):
        model.encode_text(None)
    with pytest.raises(TypeError, match='holding int'):
        model.encode_text(['ok', 3])
    with pytest.raises(ValueError, match='exactly one {}'):
        model.zero_shot_classifier(['cat', 'dog'], ['a photo'])
    with pytest.raises(ValueError, match=r'\(128, C\)'):
        model.classify(torch.zeros(1, 3, 64, 64), torch.zeros(5, 2))
    with pytest.raises(ValueError, match='recon_batch_size'):
        model(torch.zeros(1, 3, 64, 64), recon_batch_size=-1)
    with pytest.raises(ValueError, match='at least one image'):
        to_tensor([])
    with pytest.raises(ValueError, match='positive int'):
        to_tensor(np.zeros((16, 16, 3), np.uint8), size=0)


def test_recon_batch_size_means_the_same_in_model_and_training_config(model, images64):
    from unitok.train import TrainConfig
    assert model(images64, recon_batch_size=None).reconstruction.shape[0] == 2    # None: all
    assert model(images64, recon_batch_size=1).reconstruction.shape[0] == 1
    assert model(images64, recon_batch_size=0).reconstruction is None           # 0: none
    with pytest.raises(ConfigError, match='recon_batch_size must be null'):      # training needs >= 1
        TrainConfig().override(['data.recon_batch_size=0']).validate()
    TrainConfig().override(['data.recon_batch_size=null']).validate()


@pytest.mark.parametrize('argv,match', [
    (['--batch-size', '0'], 'must be >= 1'),
    (['--batch-size', '-1'], 'must be >= 1'),
    (['--size', '0'], 'must be >= 1'),
    (['--size', '20'], 'multiple of 16'),
    (['--device', 'nonsense'], 'not a torch device'),
])
def test_bad_command_line_values(tmp_path, imgs, model_dir, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(['encode', str(imgs), '--model', model_dir, '--out', str(tmp_path / 'c.npz'), *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a GPU')
def test_cuda_device_without_a_gpu(tmp_path, imgs, model_dir, capsys):
    with pytest.raises(SystemExit):
        main(['encode', str(imgs), '--model', model_dir, '--out', str(tmp_path / 'c.npz'), '--device', 'cuda'])
    assert 'no CUDA GPU is available' in capsys.readouterr().err


# ---------------------------------------------------------------------- 15: config files
@pytest.mark.parametrize('field,value,match', [
    ('drop_path', 'x', "drop_path: expected a number, got 'x'"),
    ('decoder_conv_depths', ['a', 'b'], r"decoder_conv_depths\[0\]: expected an integer, got 'a'"),
    ('decoder_conv_depths', [1, 2, 3], 'expected 2 values'),
    ('entropy_loss', 'no', "entropy_loss: expected a boolean"),
    ('num_query', 1.5, 'num_query: expected an integer'),
    ('encoder', 5, 'encoder: expected a string'),
])
def test_model_config_file_errors_name_file_field_and_type(tmp_path, field, value, match):
    d = UniTokConfig.from_preset('unitok-tiny').to_dict()
    d[field] = value
    path = tmp_path / 'config.json'
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match) as e:
        UniTokConfig.from_json(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize('text', ['null', '"hello"', '[1, 2]'])
def test_config_files_that_are_not_mappings(tmp_path, text):
    from unitok.train import TrainConfig
    (tmp_path / 'config.json').write_text(text)
    with pytest.raises(ConfigError, match='expected a JSON object of fields') as e:
        UniTokConfig.from_json(str(tmp_path / 'config.json'))
    assert 'config.json' in str(e.value)
    with pytest.raises(ConfigError, match='expected a JSON object of fields') as e:
        TrainConfig.load(str(tmp_path / 'config.json'))
    if text != 'null':                    # an empty / null YAML file means the defaults
        (tmp_path / 'train.yaml').write_text(text)
        with pytest.raises(ConfigError, match='expected a YAML mapping') as e:
            TrainConfig.load(str(tmp_path / 'train.yaml'))
        assert 'train.yaml' in str(e.value)


def test_empty_yaml_is_the_defaults(tmp_path):
    from unitok.train import TrainConfig
    (tmp_path / 'train.yaml').write_text('')
    assert TrainConfig.load(str(tmp_path / 'train.yaml')) == TrainConfig()


def test_training_config_file_errors_name_file_and_field_path(tmp_path):
    from unitok.train import TrainConfig
    cases = [('loss:\n  local_loss: "no"\n', 'loss.local_loss: expected a boolean'),
             ('optim:\n  betas: [0.9, x]\n', r"optim.betas\[1\]: expected a number, got 'x'"),
             ('data:\n  crop_scale: 0.9\n', 'data.crop_scale: expected a list of 2'),
             ('model:\n  drop_path: "x"\n', "model.drop_path: expected a number"),
             ('steps: ten\n', "steps: expected an integer, got 'ten'"),
             ('data: 3\n', 'data: expected a mapping of DataConfig fields')]
    for text, match in cases:
        (tmp_path / 't.yaml').write_text(text)
        with pytest.raises(ConfigError, match=match) as e:
            TrainConfig.load(str(tmp_path / 't.yaml')).validate()
        assert 't.yaml' in str(e.value) or text.startswith('model')


def test_one_serialiser_for_both_configs(tmp_path):
    """UniTokConfig and TrainConfig convert through unitok.utils.dataclass_io and keep their files."""
    from unitok.train import TrainConfig
    from unitok.utils import dataclass_io
    cfg = UniTokConfig.from_preset('unitok-tiny')
    assert dataclass_io.to_dict(cfg) == cfg.to_dict() and cfg.to_dict()['decoder_conv_depths'] == [1, 1]
    assert dataclass_io.from_dict(UniTokConfig, cfg.to_dict()) == cfg == UniTokConfig.from_dict(cfg.to_dict())
    train = TrainConfig().override(['data.crop_scale=[0.8, 1.0]', 'model.num_codebooks=4'])
    assert dataclass_io.to_dict(train) == train.to_dict()
    assert train.to_dict()['data']['crop_scale'] == [0.8, 1.0]
    train.save(str(tmp_path / 'config.yaml'))
    assert TrainConfig.load(str(tmp_path / 'config.yaml')) == train
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['l3'\] in loss"):
        TrainConfig.from_dict({'loss': {'l3': 1}})
    with pytest.raises(ConfigError, match='known:.*codebook_size'):
        UniTokConfig.from_dict({'codebok_size': 3})


def test_sequence_helpers_check_their_arguments():
    from unitok import codes_to_sequence, sequence_to_codes
    seq = torch.zeros(1, 16, 8, dtype=torch.long)
    with pytest.raises(ValueError, match='grid must be'):
        sequence_to_codes(seq, grid=(-4, -4))
    with pytest.raises(ValueError, match='num_query must be'):
        sequence_to_codes(seq, num_query=16)
    with pytest.raises(TypeError, match='torch.Tensor'):
        codes_to_sequence(np.zeros((1, 8, 4, 4)))
