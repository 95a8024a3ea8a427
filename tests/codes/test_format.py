"""The one tokenizer identity and the one agreement check, for export directories and ``.npz`` files."""
import copy
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import unitok
from unitok.codes import CodeDataset, CodeFormatError, ExportConfig, check_agreement, export_codes, tokenizer_identity
from unitok.codes import format as codes_format
from unitok.codes.npz import check_codes_match, read_codes_file, write_codes_file
from unitok.quantizers import MultiCodebookQuantizer


def _model(seed, **overrides):
    torch.manual_seed(seed)
    return unitok.create_model('unitok-tiny', **overrides).eval()


@pytest.fixture(scope='module')
def model():
    return _model(0)


@pytest.fixture(scope='module')
def other_seed():
    return _model(1)                                     # same configuration, other code vectors


@pytest.fixture(scope='module')
def export_dir(model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('codes') / 'val')
    export_codes(model, ExportConfig('builtin:emoji', split='val', limit=2, batch_size=2), out)
    return out


@pytest.fixture(scope='module')
def npz(model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('npz') / 'codes.npz')
    codes = model.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    write_codes_file(out, model, codes, ['a.png', 'b.png'], 64, [], 'fp32')
    return out


def _other_quantizer(model):
    """The same weights behind a quantizer of another registry name."""
    other = copy.deepcopy(model)
    other.quantizer.__class__ = type('OtherQuantizer', (MultiCodebookQuantizer,), {})
    other.quantizer.name = 'other_quantizer'
    return other


def test_identity_is_kept_by_save_and_load_and_changes_with_the_code_vectors(model, other_seed, tmp_path):
    model.save_pretrained(str(tmp_path / 'm'))
    ident = tokenizer_identity(model)
    assert tokenizer_identity(unitok.UniTok.from_pretrained(str(tmp_path / 'm'))) == ident
    assert ident['quantizer'] == 'multi_codebook' and ident['vocab_sizes'] == [512] * 8 and ident['grid'] == [4, 4]
    assert ident['digest'] == model.quantizer.identity()['digest']
    json.dumps(ident)                                                        # JSON-able
    theirs = tokenizer_identity(other_seed)
    assert theirs['config_sha256'] == ident['config_sha256'] and theirs['digest'] != ident['digest']
    other = tokenizer_identity(_other_quantizer(model))
    assert other['quantizer'] == 'other_quantizer' and other['digest'] != ident['digest']
    bare = tokenizer_identity(model.config)
    assert bare['digest'] is None and bare['config_sha256'] == ident['config_sha256']
    # training-only fields do not change what codes mean
    assert tokenizer_identity(model.config.replace(drop_path=0.1))['config_sha256'] == ident['config_sha256']


def test_export_refuses_each_difference_with_one_error(model, other_seed, export_dir):
    ds = CodeDataset(export_dir)
    ds.check_tokenizer(model)
    ds.check_tokenizer(model.config)
    cases = [(_model(0, num_codebooks=4), r'another configuration \(num_codebooks 8 there, 4 in this tokenizer'),
             (_model(0, codebook_size=1024), 'codebook_size 512 there, 1024 in this tokenizer'),
             (_model(0, image_size=128), 'grid 4x4 there, 8x8 in this tokenizer'),
             (other_seed, r'with other codebooks \(quantizer digest [0-9a-f]{16} there, [0-9a-f]{16} in this '
                          r'tokenizer\): the code ids would mean other vectors'),
             (_other_quantizer(model), "quantizer \"multi_codebook\" there, \"other_quantizer\" in this tokenizer")]
    for tokenizer, match in cases:
        with pytest.raises(CodeFormatError, match=match) as e:
            ds.check_tokenizer(tokenizer)
        assert str(e.value).startswith(f'the export {export_dir!r} does not fit this tokenizer: another tokenizer')
    vocab = {**ds.manifest['tokenizer'], 'vocab_sizes': [512] * 7 + [256]}
    with pytest.raises(CodeFormatError, match=r'vocab_sizes \[512, .*256\] there, \[512, .*512\] in this tokenizer'):
        check_agreement(vocab, model, where='codes', consumer='this tokenizer')
    with pytest.raises(CodeFormatError, match='num_codebooks 8 there, 4 in the generator'):
        ds.expect(num_codebooks=4, what='the generator')


def test_npz_refuses_each_difference_with_one_error(model, other_seed, npz, tmp_path):
    data = read_codes_file(npz)
    assert data.tokenizer == {**tokenizer_identity(model), 'grid': [4, 4], 'image_size': 64}
    check_codes_match(npz, data, model)
    cases = [(_model(0, num_codebooks=4), 'num_codebooks 8 in the file, 4 in the model'),
             (_model(0, codebook_size=1024), 'codebook_size 512 in the file, 1024 in the model'),
             (other_seed, r'with other codebooks \(quantizer digest .*: the code ids would mean other vectors'),
             (_other_quantizer(model), 'quantizer "multi_codebook" in the file, "other_quantizer" in the model')]
    for tokenizer, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            check_codes_match(npz, data, tokenizer)
        assert str(e.value).endswith('; decode it with that model, or pass --ignore-mismatch')
    data.tokenizer = {**data.tokenizer, 'vocab_sizes': [512] * 7 + [256]}
    with pytest.raises(ValueError, match=r'vocab_sizes \[512, .*256\] in the file'):
        check_codes_match(npz, data, model)
    # the grid is the decoder's to choose (4x4 codes decode with a model of 8x8): not a mismatch
    check_codes_match(npz, read_codes_file(npz), _model(0, image_size=128))


def _write_old_npz(path, model):
    digest = hashlib.sha256(model.quantizer.codebook.detach().float().numpy().tobytes()).hexdigest()[:16]
    codes = model.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    np.savez_compressed(path, codes=codes.numpy().astype(np.int16), files=np.array(['a']),
                        config=np.array(model.config.to_json()), codebook_digest=np.array(digest))


def test_old_npz_is_still_checked_or_warns_that_the_codebook_check_is_skipped(model, other_seed, tmp_path,
                                                                           monkeypatch):
    path = str(tmp_path / 'old.npz')
    _write_old_npz(path, model)
    data = read_codes_file(path)
    assert data.tokenizer is None and len(data.codebook_digest) == 16
    check_codes_match(path, data, model)
    with pytest.raises(ValueError, match=r'other codebooks \(codebook sha256 .* in the file'):
        check_codes_match(path, data, other_seed)
    with pytest.raises(ValueError, match='num_codebooks 8 in the file, 4 in the model'):
        check_codes_match(path, data, _model(0, num_codebooks=4))
    monkeypatch.setattr(codes_format, 'legacy_codebook_sha256', lambda m: None)   # a quantizer without one
    with pytest.warns(UserWarning, match=r'old.npz.* records only a codebook sha256.*the codebook check is skipped'):
        check_codes_match(path, data, other_seed)


def test_old_manifest_is_still_read_and_checked(model, other_seed, export_dir, tmp_path):
    out = tmp_path / 'old'
    out.mkdir()
    for name in os.listdir(export_dir):
        (out / name).write_bytes(open(os.path.join(export_dir, name), 'rb').read())
    m = json.loads((out / 'manifest.json').read_text())
    tok = m['tokenizer']
    table = model.quantizer.codebook.detach().float().numpy().tobytes()
    m['tokenizer'] = {'config_sha256': tok['config_sha256'], 'codebook_sha256': hashlib.sha256(table).hexdigest(),
                      'num_codebooks': 8, 'codebook_size': 512, 'grid': [4, 4], 'image_size': 64,
                      'config': tok['config']}
    (out / 'manifest.json').write_text(json.dumps(m))
    ds = CodeDataset(str(out))
    assert (ds.num_codebooks, ds.codebook_size, ds.grid, len(ds)) == (8, 512, (4, 4), 2)
    ds.check_tokenizer(model)
    with pytest.raises(CodeFormatError, match=r'other codebooks \(codebook sha256 .* there'):
        ds.check_tokenizer(other_seed)
    with pytest.raises(CodeFormatError, match='config sha256'):
        ds.check_tokenizer(_model(0, code_dim=16))
