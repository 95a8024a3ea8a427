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
