"""Feature extractor weights files: a pickle that would run code gets the one-line refusal of --model
(nothing runs), and a file with other tensors one line naming the mismatch."""

import pytest
import torch

from unitok.checkpoint import CheckpointError
from unitok.eval.features import build_extractor
from pickle_payloads import RunsShell


@pytest.mark.parametrize('name', ['inception', 'dinov2'])
def test_a_pickled_weights_file_is_refused_and_nothing_runs(tmp_path, name):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'weights.pth'
    torch.save({'w': torch.zeros(1), 'payload': RunsShell(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused to load '.*weights.pth': the file is unsafe: unpickling it "
                                              r'would import and call os.system.*Nothing from the file was executed'):
        build_extractor(name, str(path))
    assert not marker.exists()


@pytest.mark.parametrize('name,match', [('inception', 'are not the layout torch-fidelity reads from .*'),
                                        ('dinov2', 'are not the released ViT-S/14 layout .*')])
def test_a_weights_file_with_other_tensors_is_one_line_naming_the_mismatch(tmp_path, name, match):
    path = tmp_path / 'other.pth'
    torch.save({'fc.weight': torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match=match) as e:
        build_extractor(name, str(path))
    assert '\n' not in str(e.value)
