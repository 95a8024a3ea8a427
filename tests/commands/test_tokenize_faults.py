"""Faults of the tokenizer commands (encode, decode, reconstruct, convert, eval): full or read-only
disks, wrong output paths, codes files of another model, late bad entries, bad argument values;
each gets one clear error and writes nothing half-done."""
import errno
import os

import numpy as np
import pytest
import torch
from PIL import Image

import unitok
from unitok import UniTok
from unitok.codes.npz import read_codes_file
from unitok.commands import main
from unitok.config import UniTokConfig
from fault_fixtures import cached_model, codes_npz, encoded, imgs, leftovers, model, model_dir  # noqa: F401


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
