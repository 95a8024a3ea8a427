"""CodeDataset: an export is checked when it is opened (codes in range, labels in their set, caption
rows whole), so bad data stops a training before its run folder or first step, naming shard and item."""
import json
import shutil

import numpy as np
import pytest

from train_helpers import saved_tiny_tokenizer
from unitok.codes import CodeDataset, CodeFormatError, ExportConfig, export_codes


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('codes')
    model = saved_tiny_tokenizer(root)
    out = root / 'val'
    export_codes(model, ExportConfig('builtin:emoji', split='val', shard_size=4, batch_size=4, limit=8), str(out))
    return out


@pytest.fixture()
def codes(export_dir, tmp_path):
    copy = tmp_path / 'codes'
    shutil.copytree(export_dir, copy)
    return copy


def _shard(directory, part):
    return sorted(directory.glob(f'{part}-*'))[1]           # the second shard: items 4..7 of the export


def test_a_good_export_opens(codes):
    ds = CodeDataset(str(codes))
    assert len(ds) == 8 and int(ds[5]['codes'].max()) < ds.codebook_size


def test_an_out_of_range_code_is_found_at_open_naming_shard_and_item(codes):
    path = _shard(codes, 'codes')
    a = np.load(path)
    a[2, 0, 3, 1, 1] = 512                              # one code among all, item 2 of the shard, sub-codebook 3
    np.save(path, a)
    with pytest.raises(CodeFormatError, match=r"item 2 of shard \S+ \(item 6 of the export, key .*\) has code 512 "
                                              r"in sub-codebook 3, outside \[0, 512\)") as e:
        CodeDataset(str(codes))
    assert path.name in str(e.value)


def test_a_label_outside_its_set_is_found_at_open(codes):
    path = _shard(codes, 'labels')
    a = np.load(path)
    a[1, 0] = 10_000
    np.save(path, a)
    with pytest.raises(CodeFormatError, match=r"item 1 of shard .* has label 10000 in label set 'category'"):
        CodeDataset(str(codes))


def test_a_cut_captions_file_is_found_at_open(codes):
    path = _shard(codes, 'meta')
    text = path.read_text()
    path.write_text(text[:len(text) // 2])               # cut in the middle of a row
    with pytest.raises(CodeFormatError, match=r'the row of item 1 of shard .* is not JSON .*cut or damaged'):
        CodeDataset(str(codes))
    rows = text.splitlines(keepends=True)
    path.write_text(''.join(rows[:2]))                   # cut at a row boundary
    with pytest.raises(CodeFormatError, match=r'has 2 rows, the manifest says 4; the file is cut'):
        CodeDataset(str(codes))
    bad = [json.loads(r) for r in rows]
    bad[3]['captions'] = [7]
    path.write_text(''.join(json.dumps(r) + '\n' for r in bad))
    with pytest.raises(CodeFormatError, match=r'the row of item 3 of shard .* has no list of caption strings'):
        CodeDataset(str(codes))
