"""Webdataset streams resume at the saved position: the samples after a restart are the ones the
uninterrupted stream would have produced next (shards, shuffle buffer and all)."""
import io
import tarfile

from PIL import Image

from unitok.data import open_source


def _shards(root, shards=2, per_shard=12):
    root.mkdir()
    for s in range(shards):
        with tarfile.open(root / f'part-{s:03d}.tar', 'w') as tar:
            for k in range(per_shard):
                buf = io.BytesIO()
                Image.new('RGB', (8, 8), (s * 50, k * 10, 0)).save(buf, 'PNG')
                for name, data in ((f'{s:03d}{k:04d}.png', buf.getvalue()), (f'{s:03d}{k:04d}.txt', f'{s}-{k}'.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / 'part-{000..001}.tar')


def _keys(source, start, n, stream=0, streams=1, seed=3):
    out = []
    for position, raw in source.iter_raw(stream, streams, seed, start):
        out.append((position, source.key(raw)))
        if len(out) == n:
            return out


def test_resume_at_a_position_continues_the_same_stream(tmp_path):
    spec = _shards(tmp_path / 'shards')
    source = open_source(spec, 'train', resampled=True, shuffle_buffer=8)
    full = _keys(source, 0, 30)
    assert len({k for _, k in full}) > 12                      # shuffled over both shards, several epochs
    for start in (1, 7, 19):
        resumed = _keys(source, start, 30 - start)
        assert resumed == full[start:], start
