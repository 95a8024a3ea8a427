"""unitok.utils.io: staged directories are all or nothing."""
import os

import pytest

from fault_fixtures import leftovers


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


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    import torch
    from unitok import UniTok
    from unitok.config import UniTokConfig
    from unitok.utils.io import atomic_write
    old = os.umask(umask)
    try:
        with open(tmp_path / 'plain.txt', 'w') as f:
            f.write('x')
        atomic_write(str(tmp_path / 'atomic.txt'), lambda f: f.write('x'), mode='w')
        atomic_write(str(tmp_path / 'atomic.pt'), lambda p: torch.save({'a': torch.zeros(1)}, p), mode='path')
        torch.manual_seed(0)
        UniTok(UniTokConfig.from_preset('unitok-tiny')).save_pretrained(str(tmp_path / 'model'))
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert os.stat(tmp_path / 'plain.txt').st_mode & 0o777 == expected
    written = [tmp_path / 'atomic.txt', tmp_path / 'atomic.pt'] + sorted((tmp_path / 'model').iterdir())
    assert {p.name: os.stat(p).st_mode & 0o777 for p in written} == {p.name: expected for p in written}
