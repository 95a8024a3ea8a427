"""The official release format (unitok.official, unitok.safe_pickle): round trip, strict keys, and
pickles that would run code refused before anything runs."""
import os
import pickle

import pytest
import torch

import unitok
from unitok import CheckpointError, UniTok
from unitok.official import save_official_checkpoint
from pickle_payloads import OpensFile


def test_official_format_round_trip(tiny_model, images64, tmp_path):
    path = str(tmp_path / 'official.pth')
    save_official_checkpoint(tiny_model, path)
    raw = torch.load(path, weights_only=True)
    assert 'quantizer.codebooks.0.codebook.weight' in raw['trainer']['unitok']
    loaded = unitok.load_official_checkpoint(path)
    assert torch.equal(loaded.encode(images64), tiny_model.encode(images64))
    assert UniTok.from_pretrained(path).config == tiny_model.config      # .pth goes to the official loader


def _official(tiny_model, state=None):
    return {'args': tiny_model.config.to_official_args(),
            'trainer': {'unitok': unitok.official_state_dict(tiny_model) if state is None else state}}


def test_missing_and_unexpected_keys_are_named(tiny_model, tmp_path):
    state = unitok.official_state_dict(tiny_model)
    del state['decoder.norm.weight']
    state['decoder.extra.weight'] = torch.zeros(1)
    torch.save(_official(tiny_model, state), tmp_path / 'bad.pth')
    with pytest.raises(CheckpointError, match=r'1 missing key\(s\): decoder.norm.weight; '
                                              r'1 unexpected key\(s\): decoder.extra.weight'):
        unitok.load_official_checkpoint(str(tmp_path / 'bad.pth'))


def test_shape_mismatch_is_named(tiny_model, tmp_path):
    state = unitok.official_state_dict(tiny_model)
    state['fc_norm.weight'] = torch.zeros(3)
    torch.save(_official(tiny_model, state), tmp_path / 'bad.pth')
    with pytest.raises(CheckpointError, match='shape mismatch for fc_norm.weight'):
        unitok.load_official_checkpoint(str(tmp_path / 'bad.pth'))


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tiny_model, tmp_path):
    marker = tmp_path / 'pwned'
    ckpt = _official(tiny_model)
    ckpt['trainer']['payload'] = OpensFile(str(marker))
    path = tmp_path / 'evil.pth'
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match='refused to load .* Nothing from the file was executed'):
        unitok.load_official_checkpoint(str(path))
    assert not marker.exists()
    # the same with a plain pickle file (not torch's zip format)
    path2 = tmp_path / 'evil2.pth'
    with open(path2, 'wb') as f:
        pickle.dump(OpensFile(str(marker)), f)
    with pytest.raises(CheckpointError):
        unitok.load_official_checkpoint(str(path2))
    assert not marker.exists()


@pytest.mark.parametrize('content,match', [
    (b'', 'cannot read checkpoint'),
    (b'garbage bytes that are not a checkpoint', 'cannot read checkpoint|refused'),
])
def test_corrupt_files(tmp_path, content, match):
    path = tmp_path / 'x.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        unitok.load_official_checkpoint(str(path))


def test_truncated_checkpoint(tiny_model, tmp_path):
    path = tmp_path / 'full.pth'
    torch.save(_official(tiny_model), path)
    data = path.read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='cannot read checkpoint'):
        unitok.load_official_checkpoint(str(tmp_path / 'cut.pth'))


def test_wrong_structure(tmp_path):
    torch.save({'model': {}}, tmp_path / 'x.pth')
    with pytest.raises(CheckpointError, match='not an official UniTok checkpoint'):
        unitok.load_official_checkpoint(str(tmp_path / 'x.pth'))
    with pytest.raises(CheckpointError, match='no checkpoint file'):
        unitok.load_official_checkpoint(str(tmp_path / 'missing.pth'))


# ---------------------------------------------------------------------- pickle refusal names the global
class _Call:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize('fn,name', [(os.system, 'os.system'), (exec, 'builtins.exec')])
@pytest.mark.parametrize('writer', ['torch', 'pickle'])
def test_pickle_refusal_names_the_blocked_global(tiny_model, tmp_path, fn, name, writer):
    marker = tmp_path / 'pwned'
    payload = f'touch {marker}' if fn is os.system else f'open({str(marker)!r}, "w")'
    ckpt = _official(tiny_model)
    ckpt['trainer']['payload'] = _Call(fn, payload)
    path = tmp_path / 'evil.pth'
    if writer == 'torch':
        torch.save(ckpt, path)
    else:
        with open(path, 'wb') as f:
            pickle.dump(ckpt, f, protocol=4)
    with pytest.raises(CheckpointError) as info:
        unitok.load_official_checkpoint(str(path))
    message = str(info.value)
    assert f'the file is unsafe: unpickling it would import and call {name}, which can run arbitrary code' \
        in message
    assert 'weights_only' not in message and '\x1b' not in message and 'Nothing from the file was executed' in message
    assert not marker.exists()
