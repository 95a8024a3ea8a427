"""Data: deterministic resumable streams, sources, builtin dataset integrity."""
import json

import pytest
import torch

from unitok.data import TrainStream, open_source, train_loader, train_transform
from unitok.data.stream import map_positions
from unitok.modules.text import tokenize


def test_builtin_dataset_integrity():
    train, val = open_source('builtin:emoji', 'train'), open_source('builtin:emoji', 'val')
    assert (len(train), len(val)) == (3432, 380)
    assert not {s['unified'] for s in train.samples} & {s['unified'] for s in val.samples}   # unseen emoji
    image, caption, label = val.read(len(val) - 1)
    assert image.size == (64, 64) and image.mode == 'RGB' and caption.startswith('an emoji of')
    assert {s['style'] for s in train.samples} == {'Noto', 'Twemoji'}


def test_map_positions_partition_each_epoch():
    n, shards = 50, 4
    seen = []
    for s in range(shards):
        it = map_positions(n, s, shards, seed=3)
        seen += [next(it)[1] for _ in range(n // shards)]
    epochs = {e for e, _ in seen}
    assert epochs == {0} and len({i for _, i in seen}) == shards * (n // shards)   # no repeats in an epoch
    it = map_positions(n, 1, shards, seed=3, start=25)
    again = map_positions(n, 1, shards, seed=3)
    for _ in range(25):
        next(again)
    assert [next(it) for _ in range(5)] == [next(again) for _ in range(5)]        # seek == replay


@pytest.mark.parametrize('workers', [0, 2])
def test_stream_resumes_exactly(workers):
    source = open_source('builtin:emoji', 'train')

    def loader(positions=None, offset=0):
        stream = TrainStream(source, train_transform(32), lambda c: tokenize(c, 16)[0], seed=5,
                             num_workers=workers, start_positions=positions, worker_offset=offset)
        return iter(train_loader(stream, 4, workers))

    full = loader()
    batches = [next(full) for _ in range(7)]
    positions = {}
    for b in batches[:3]:
        positions[b['worker']] = b['position'] + 1
    resumed = loader(positions, offset=3 % max(1, workers))
    for expected in batches[3:]:
        got = next(resumed)
        assert got['worker'] == expected['worker'] and torch.equal(got['image'], expected['image'])
        assert torch.equal(got['text'], expected['text'])


def test_folder_source_scan_and_captions(tmp_path):
    from PIL import Image
    for cls in ('cat', 'dog'):
        (tmp_path / 'scan' / cls).mkdir(parents=True)
        Image.new('RGB', (20, 20)).save(tmp_path / 'scan' / cls / 'a.png')
    s = open_source(f'folder:{tmp_path / "scan"}')
    assert s.classnames == ['cat', 'dog'] and s.read(1)[1] == 'a photo of a dog' and s.read(1)[2] == 1
    (tmp_path / 'cap').mkdir()
    Image.new('RGB', (20, 20)).save(tmp_path / 'cap' / 'x.png')
    (tmp_path / 'cap' / 'captions.jsonl').write_text(json.dumps({'file': 'x.png', 'caption': ['one', 'two']}) + '\n')
    assert open_source(str(tmp_path / 'cap')).read(0)[1] == ['one', 'two']
    (tmp_path / 'cap' / 'captions.jsonl').write_text('{"file": "x.png"}\n')
    with pytest.raises(ValueError, match='needs "file" and "caption"'):
        open_source(str(tmp_path / 'cap'))


def test_bad_specs():
    with pytest.raises(FileNotFoundError, match='no such directory'):
        open_source('folder:/nonexistent')
    with pytest.raises(FileNotFoundError, match='missing'):
        open_source('/nonexistent/shard-{000..003}.tar')
    with pytest.raises(ValueError, match='unknown built-in dataset'):
        open_source('builtin:nope')


@pytest.mark.parametrize('row,match', [
    ({'file': 'x.png', 'caption': 5}, 'caption must be a string or a list of strings'),
    ({'file': 'x.png', 'caption': ['ok', 3]}, 'every caption in the list must be a string'),
    ({'file': 'x.png', 'caption': 'c', 'label': 3}, 'label must be a class name'),
    ({'file': 7, 'caption': 'c'}, 'file must be a string path'),
    ([1, 2], 'must be an object'),
])
def test_caption_rows_of_the_wrong_type_are_named(tmp_path, row, match):
    (tmp_path / 'captions.jsonl').write_text(json.dumps(row) + '\n')
    with pytest.raises(ValueError, match=f'captions.jsonl: row 1.*{match}'):
        open_source(str(tmp_path))


def test_unreadable_and_empty_caption_files(tmp_path):
    (tmp_path / 'captions.csv').write_bytes(b'file,caption\nx.png,\xff\xfe caf\xe9\n')
    with pytest.raises(ValueError, match='captions.csv: not UTF-8'):
        open_source(str(tmp_path))
    (tmp_path / 'captions.csv').write_text('file,caption\n')
    with pytest.raises(ValueError, match='captions.csv lists no images'):
        open_source(str(tmp_path))


def test_transform_arguments_are_checked():
    from unitok.data import eval_transform
    from unitok.train import TrainConfig
    from unitok.config import ConfigError
    with pytest.raises(ValueError, match='crop scale'):
        train_transform(32, scale=(1.0, 0.5))
    with pytest.raises(ValueError, match='positive integer'):
        eval_transform(0)
    with pytest.raises(ConfigError, match='data.crop_scale'):
        TrainConfig().override(['data.crop_scale=[0, 1]']).validate()
