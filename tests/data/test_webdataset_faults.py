"""Webdataset sources with small or empty shards still stream and stop."""
import io
import tarfile

import pytest
from PIL import Image



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
