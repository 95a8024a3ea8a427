"""Code export (``unitok export-codes``) and reading the codes back (CodeDataset)."""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

import unitok
from unitok.cli import main as cli_main
from unitok.data import eval_transform, open_source
from unitok.codes import CodeDataset, CodeFormatError, ExportConfig, export_codes, tokenizer_identity

SPEC = 'builtin:emoji'


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    torch.manual_seed(0)
    model = unitok.create_model('unitok-tiny')
    path = tmp_path_factory.mktemp('tok') / 'model'
    model.save_pretrained(str(path))
    return unitok.UniTok.from_pretrained(str(path)).eval(), str(path)


@pytest.fixture(scope='module')
def exported(tokenizer, tmp_path_factory):
    model, _ = tokenizer
    out = str(tmp_path_factory.mktemp('codes') / 'val')
    cfg = ExportConfig(SPEC, split='val', augment=('flip', 'tencrop'), shard_size=4, batch_size=3, limit=7)
    return export_codes(model, cfg, out), out


def _files(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), 'rb') as f:
            out[name] = f.read()
    return out


def test_exported_codes_decode_to_the_images_of_encode_and_decode(tokenizer, exported):
    """Every view, built here independently with PIL / torchvision and encoded in the exporter's
    batches (shards of 4 images, batches of 3: rare near-ties of the nearest-code search can depend
    on the float summation order of the batch), gives exactly the exported codes."""
    model, _ = tokenizer
    result, out = exported
    ds = CodeDataset(out)
    source = open_source(SPEC, 'val')
    size = model.config.image_size
    assert len(ds) == 7 and ds.num_views == 12 and ds.view_names[:3] == ['center', 'center-flip', 'tencrop-tl']
    big = round(size * 1.1)
    tencrop = T.Compose([T.Resize(big, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                         T.CenterCrop(big), T.TenCrop(size)])

    def views(image):
        crops = [T.ToTensor()(c) * 2 - 1 for c in tencrop(image)]
        return torch.stack([eval_transform(size)(image), eval_transform(size)(ImageOps.mirror(image)), *crops])

    for batch in ([0, 1, 2], [3], [4, 5, 6]):
        x = torch.cat([views(source.read(i)[0]) for i in batch])          # (n * 12, 3, 64, 64)
        expected = model.encode(x).view(len(batch), 12, 8, 4, 4)
        got = torch.stack([ds[i]['codes'] for i in batch])
        assert got.dtype == torch.int64 and torch.equal(got, expected)
        assert torch.equal(model.decode(got[:, :2].flatten(0, 1)), model.decode(expected[:, :2].flatten(0, 1)))
        assert torch.equal(model.decode(got[:, 0]), model.reconstruct(x[::12]))
    for i in range(len(ds)):
        image, caption, label = source.read(i)
        item = ds[i]
        assert item['label'] == label and item['caption'] == caption and item['index'] == i
        assert np.array_equal(ds.codes(i), item['codes'].numpy().astype(np.uint16))   # the raw memory-mapped view
    assert not torch.equal(ds[0]['codes'][0], ds[0]['codes'][1])    # the flip is a different view


def test_manifest_records_what_the_codes_mean(tokenizer, exported):
    model, _ = tokenizer
    result, out = exported
    with open(os.path.join(out, 'manifest.json')) as f:
        m = json.load(f)
    assert m == result.manifest and m['complete'] is True
    speed = result.throughput                  # 7 images through the encoder, timed against the wall clock
    assert speed.images == result.images == 7 and speed.wall == result.seconds > 0
    assert 0 < speed.model and 0 < speed.wait and speed.model + speed.wait <= speed.wall
    ident = tokenizer_identity(model)
    assert {k: m['tokenizer'][k] for k in ident} == ident
    assert (m['tokenizer']['num_codebooks'], m['tokenizer']['codebook_size'], m['tokenizer']['grid']) == (8, 512, [4, 4])
    assert m['augment'] == ['flip', 'tencrop'] and len(m['views']) == m['num_views'] == 12
    assert m['data'] == dict(spec=SPEC, split='val', limit=7, kind='map', items=7, tars=None)
    assert [s['count'] for s in m['shards']] == [4, 3] and m['num_items'] == 7 and m['skipped'] == []
    sets = {s['name']: s['classnames'] for s in m['label_sets']}
    assert list(sets) == ['category', 'subcategory'] and len(sets['category']) == 9 and len(sets['subcategory']) > 60
    assert 'animals & nature' in sets['category']
    # the subcategory column holds the builtin source's subcategory labels
    sub = open_source('builtin:emoji:subcategory', 'val')
    assert [CodeDataset(out, label='subcategory')[i]['label'] for i in range(7)] == sub.labels[:7]
    codes = np.load(os.path.join(out, 'codes-00000-00001.npy'), mmap_mode='r', allow_pickle=False)
    assert isinstance(codes, np.memmap) and codes.dtype == np.uint16 and codes.shape == (3, 12, 8, 4, 4)


def test_dataset_views_captions_and_pickling(exported):
    _, out = exported
    full = CodeDataset(out)
    rand = CodeDataset(out, view='random', caption='random', seed=3)
    draws = [rand[i]['codes'] for i in range(len(rand))]
    again = [rand[i]['codes'] for i in range(len(rand))]
    assert all(torch.equal(a, b) for a, b in zip(draws, again))               # seeded, not stateful
    chosen = [next(v for v in range(12) if torch.equal(full[i]['codes'][v], d)) for i, d in enumerate(draws)]
    rand.set_epoch(1)
    chosen1 = [next(v for v in range(12) if torch.equal(full[i]['codes'][v], rand[i]['codes'])) for i in range(7)]
    assert chosen != chosen1 and len(set(chosen + chosen1)) > 3            # epochs draw other views
    assert torch.equal(CodeDataset(out, view=1)[4]['codes'], full[4]['codes'][1])
    assert CodeDataset(out, caption='random', seed=3)[2]['caption'] == full[2]['caption']   # val: one caption each
    blob = pickle.dumps(full)                                         # DataLoader workers re-open the maps
    assert len(blob) < sum(full.codes(i).nbytes for i in range(len(full)))
    clone = pickle.loads(blob)
    assert torch.equal(clone[6]['codes'], full[6]['codes'])
    with pytest.raises(ValueError, match='view must be'):
        CodeDataset(out, view=12)
    with pytest.raises(ValueError, match="unknown label set 'colour'"):
        CodeDataset(out, label='colour')


def test_unreadable_images_are_skipped_and_listed(tokenizer, tmp_path):
    model, _ = tokenizer
    source = open_source(SPEC, 'val')
    for i in range(5):
        d = tmp_path / 'images' / ('cat' if i % 2 else 'dog')
        d.mkdir(parents=True, exist_ok=True)
        source.read(i)[0].save(d / f'{i}.png')
    (tmp_path / 'images' / 'cat' / 'broken.png').write_bytes(b'not a png')
    out = str(tmp_path / 'codes')
    result = export_codes(model, ExportConfig(f'folder:{tmp_path / "images"}', shard_size=4, batch_size=2), out)
    m = result.manifest
    assert m['num_items'] == 5 and len(m['skipped']) == 1
    skip = m['skipped'][0]
    assert skip['key'] == os.path.join('cat', 'broken.png') and 'cannot read image' in skip['reason']
    ds = CodeDataset(out)
    assert len(ds) == 5 and ds.classnames == ['cat', 'dog'] and ds.skipped == m['skipped']
    files = sorted(os.path.join(c, f) for c in ('cat', 'dog') for f in os.listdir(tmp_path / 'images' / c))
    kept = [f for f in files if 'broken' not in f]
    assert [ds.key(i) for i in range(5)] == kept
    for i, f in enumerate(kept):
        x = eval_transform(64)(Image.open(tmp_path / 'images' / f).convert('RGB'))[None]
        assert torch.equal(ds[i]['codes'][0], model.encode(x)[0])
        assert ds[i]['label'] == ds.classnames.index(f.split(os.sep)[0])


def test_an_export_where_no_image_is_readable_fails(tokenizer, tmp_path, capsys):
    _, path = tokenizer
    (tmp_path / 'images' / 'cat').mkdir(parents=True)
    for i in range(3):
        (tmp_path / 'images' / 'cat' / f'{i}.png').write_bytes(b'not a png')
    out = tmp_path / 'codes'
    assert cli_main(['export-codes', '--model', path, '--data', f'folder:{tmp_path / "images"}', '--out', str(out),
                     '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert 'no readable image' in err and '3 unreadable' in err and os.path.join('cat', '0.png') in err
    manifest = json.loads((out / 'manifest.json').read_text()) if (out / 'manifest.json').exists() else {}
    assert not manifest.get('complete')
    with pytest.raises(CodeFormatError, match='incomplete|no exported codes'):
        CodeDataset(str(out))


def test_interrupted_export_resumes_to_the_same_files(tokenizer, tmp_path, monkeypatch):
    model, _ = tokenizer
    cfg = ExportConfig(SPEC, split='val', augment=('flip',), shard_size=4, batch_size=2, limit=14)
    export_codes(model, cfg, str(tmp_path / 'full'))
    calls, real_encode = [0], model.encode

    def failing(x):
        calls[0] += 1
        if calls[0] == 5:                     # in the middle of the third shard
            raise RuntimeError('interrupted')
        return real_encode(x)
    monkeypatch.setattr(model, 'encode', failing)
    with pytest.raises(RuntimeError, match='interrupted'):
        export_codes(model, cfg, str(tmp_path / 'cut'))
    names = sorted(os.listdir(tmp_path / 'cut'))
    assert [n for n in names if n.startswith('done-')] == ['done-00000-00000.json', 'done-00000-00001.json']
    assert not any(n.endswith('.tmp') for n in names)
    with pytest.raises(CodeFormatError, match='incomplete'):
        CodeDataset(str(tmp_path / 'cut'))
    calls[0] = 100
    result = export_codes(model, cfg, str(tmp_path / 'cut'))
    assert calls[0] - 100 == 3 and result.images == 6                  # only the two unfinished shards
    assert _files(tmp_path / 'cut') == _files(tmp_path / 'full')


def test_export_killed_with_sigkill_then_rerun_gives_the_files_of_an_uninterrupted_one(tokenizer, tmp_path):
    """kill -9 (no handler runs) after the first finished shard, then the same command: the same files."""
    import signal
    import time
    from train_helpers import CLI_ENV, run_unitok
    _, path = tokenizer
    args = ['export-codes', '--model', path, '--data', SPEC, '--split', 'val', '--limit', '160', '--shard-size', '4',
            '--batch-size', '2', '--workers', '0', '--device', 'cpu']
    run_unitok([*args, '--out', str(tmp_path / 'full')])
    cut = tmp_path / 'cut'
    proc = subprocess.Popen([sys.executable, '-m', 'unitok.cli', *args, '--out', str(cut)], env=CLI_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not list(cut.glob('done-*.json')):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the export ended before it could be killed: make it longer'
    assert not (cut / 'manifest.json').exists() or not json.loads((cut / 'manifest.json').read_text())['complete']
    run_unitok([*args, '--out', str(cut)])
    assert _files(cut) == _files(tmp_path / 'full')


def test_codes_of_another_tokenizer_or_grid_get_one_clear_error(tokenizer, exported, tmp_path):
    model, _ = tokenizer
    _, out = exported
    ds = CodeDataset(out)
    ds.check_tokenizer(model)
    ds.check_tokenizer(model.config)
    ds.check_tokenizer(model.config.replace(drop_path=0.1, grad_checkpointing=True))   # training-only fields
    torch.manual_seed(1)
    other = unitok.create_model('unitok-tiny')                        # same config, other weights
    with pytest.raises(CodeFormatError, match='another tokenizer, with other codebooks.*quantizer digest'):
        ds.check_tokenizer(other)
    bigger = model.config.replace(codebook_size=1024, image_size=128)
    with pytest.raises(CodeFormatError, match=r'codebook_size 512 there, 1024 in this tokenizer.*grid 4x4 there, 8x8'):
        ds.check_tokenizer(bigger)
    with pytest.raises(CodeFormatError, match='grid 4x4 there, 8x8 in the model'):
        ds.expect(num_codebooks=8, grid=(8, 8))
    with pytest.raises(CodeFormatError, match='num_codebooks 8 there, 4 in the model'):
        ds.expect(num_codebooks=4)
    # refusing to mix exports in one directory
    with pytest.raises(CodeFormatError, match=r'different export \(augment: \["flip", "tencrop"\] there, \[\] now'):
        export_codes(model, ExportConfig(SPEC, split='val', shard_size=4, batch_size=3, limit=7), out)
    with pytest.raises(CodeFormatError, match='tokenizer.digest'):
        export_codes(other, ExportConfig(SPEC, split='val', augment=('flip', 'tencrop'), shard_size=4,
                                         batch_size=3, limit=7), out)
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'notes.txt').write_text('x')
    with pytest.raises(CodeFormatError, match='not empty and holds no manifest.json'):
        export_codes(model, ExportConfig(SPEC, limit=2), str(tmp_path / 'busy'))
    with pytest.raises(CodeFormatError, match='holds no exported codes'):
        CodeDataset(str(tmp_path))
    huge = types.SimpleNamespace(config=model.config.replace(codebook_size=70000))
    with pytest.raises(CodeFormatError, match='uint16.*codebook_size=70000'):
        export_codes(huge, ExportConfig(SPEC, limit=2), str(tmp_path / 'huge'))
    with pytest.raises(ValueError, match="unknown augmentation.*'mirror'"):
        ExportConfig(SPEC, augment='flip,mirror')


def test_shard_with_wrong_shape_is_reported(tokenizer, tmp_path):
    model, _ = tokenizer
    out = tmp_path / 'codes'
    export_codes(model, ExportConfig(SPEC, split='val', shard_size=4, batch_size=4, limit=8), str(out))
    np.save(out / 'codes-00000-00001.npy', np.zeros((4, 1, 8, 2, 2), np.uint16))
    with pytest.raises(CodeFormatError, match=r"codes-00000-00001.npy' holds uint16 \(4, 1, 8, 2, 2\), the manifest"):
        CodeDataset(str(out))


def _write_tars(root, source, sizes, corrupt=()):
    root.mkdir()
    i = 0
    for s, n in enumerate(sizes):
        with tarfile.open(root / f'shard-{s:03d}.tar', 'w') as tar:
            for k in range(n):
                image, caption, _ = source.read(i)
                i += 1
                buf = io.BytesIO()
                image.save(buf, 'PNG')
                data = b'corrupt' if (s, k) in corrupt else buf.getvalue()
                for name, payload in ((f'{s}{k:04d}.png', data), (f'{s}{k:04d}.txt', caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_export_in_chunks_and_resume(tokenizer, tmp_path, monkeypatch):
    model, _ = tokenizer
    source = open_source(SPEC, 'val')
    _write_tars(tmp_path / 'tars', source, sizes=(7, 3), corrupt={(0, 2)})
    spec = str(tmp_path / 'tars' / 'shard-{000..001}.tar')
    cfg = ExportConfig(spec, shard_size=3, batch_size=2)
    full = export_codes(model, cfg, str(tmp_path / 'full')).manifest
    assert [s['name'] for s in full['shards']] == ['00000-00000', '00000-00001', '00000-00002', '00001-00000']
    assert [s['count'] for s in full['shards']] == [2, 3, 1, 3] and full['num_items'] == 9
    assert [s['key'].split(':')[-1] for s in full['skipped']] == ['00002'] and full['skipped'][0]['index'] == 2
    ds = CodeDataset(str(tmp_path / 'full'))
    readable = [i for i in range(10) if i != 2]
    for j, i in enumerate(readable):
        image, caption, _ = source.read(i)
        assert torch.equal(ds[j]['codes'][0], model.encode(eval_transform(64)(image)[None])[0])
        assert ds[j]['caption'] == caption and ds[j]['label'] == -1
    # decoded in 2 loader workers (each decodes every other batch of the plan): the same files
    export_codes(model, ExportConfig(spec, shard_size=3, batch_size=2, workers=2), str(tmp_path / 'workers'))
    assert _files(tmp_path / 'workers') == _files(tmp_path / 'full')
    calls, real_encode = [0], model.encode

    def failing(x):
        calls[0] += 1
        if calls[0] == 3:                     # tar 0, chunk 1, second batch
            raise RuntimeError('interrupted')
        return real_encode(x)
    monkeypatch.setattr(model, 'encode', failing)
    with pytest.raises(RuntimeError):
        export_codes(model, cfg, str(tmp_path / 'cut'))
    export_codes(model, cfg, str(tmp_path / 'cut'))
    assert _files(tmp_path / 'cut') == _files(tmp_path / 'full')
    with pytest.raises(ValueError, match='limit applies to map-style sources'):
        export_codes(model, ExportConfig(spec, limit=3), str(tmp_path / 'limited'))


def test_cli_export_codes(tokenizer, tmp_path, capsys):
    _, path = tokenizer
    out = str(tmp_path / 'codes')
    common = ['export-codes', '--model', path, '--data', SPEC, '--split', 'val', '--out', out, '--limit', '6',
              '--batch-size', '4', '--shard-size', '4', '--device', 'cpu']
    argv = common + ['--augment', 'flip']
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert 'exported 6 image(s)' in printed and '(6, 2, 8, 4, 4) uint16 in 2 shard(s)' in printed
    assert 'images/s' in printed and '6 image(s) in' in printed and '% of the time, waiting for data ' in printed
    assert cli_main(argv) == 0                                       # a finished export: nothing left to do
    assert 'images/s' not in capsys.readouterr().out
    workers = common[:common.index('--out') + 1] + [str(tmp_path / 'workers')] + common[common.index('--out') + 2:]
    assert cli_main(workers + ['--augment', 'flip', '--workers', '2']) == 0      # images decoded in 2 processes
    assert _files(tmp_path / 'workers') == _files(out)
    assert cli_main(common + ['--augment', 'tencrop']) == 2
    assert 'different export (augment: ["flip"] there, ["tencrop"] now' in capsys.readouterr().err
    assert cli_main(['export-codes', '--model', path, '--data', SPEC, '--out', str(tmp_path / 'x'),
                     '--augment', 'rotate']) == 2
    assert "unknown augmentation(s) ['rotate']" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_write_the_files_of_one(tokenizer, tmp_path):
    """Under torchrun each rank encodes every other shard; together they write byte for byte the files
    of one process (both runs single-threaded: the thread count changes float summation order, and
    with it rare near-ties of the nearest-code search)."""
    _, path = tokenizer
    args = ['export-codes', '--model', path, '--data', SPEC, '--split', 'val', '--limit', '11', '--augment', 'flip',
            '--batch-size', '2', '--shard-size', '3', '--device', 'cpu']
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    launch = {1: [sys.executable, '-m', 'unitok.cli'],
              2: [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'unitok.cli']}
    for n, name in ((1, 'one'), (2, 'two')):
        proc = subprocess.run(launch[n] + args + ['--out', str(tmp_path / name)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert 'exported 11 image(s)' in proc.stdout
        assert {1: '(1 process(es): 11;', 2: '(2 process(es): 6 + 5;'}[n] in proc.stdout   # shards 0, 2 | 1, 3
    one, two = _files(tmp_path / 'one'), _files(tmp_path / 'two')
    assert len(one) == 4 * 5 + 1 and one == two
