import numpy as np
import pytest
import torch

from unitok import codes_to_sequence, sequence_to_codes


def test_round_trip_grid_and_flat():
    codes = torch.randint(0, 100, (2, 8, 3, 5))
    seq = codes_to_sequence(codes)
    assert seq.shape == (2, 15, 8)
    assert torch.equal(seq[:, 1 * 5 + 2], codes[:, :, 1, 2])         # raster order
    assert torch.equal(sequence_to_codes(seq, grid=(3, 5)), codes)
    flat = torch.randint(0, 100, (2, 8, 4 + 9))
    assert torch.equal(sequence_to_codes(codes_to_sequence(flat), num_query=4), flat)
    square = torch.randint(0, 100, (1, 2, 4, 4))
    assert torch.equal(sequence_to_codes(codes_to_sequence(square)), square)


def test_errors():
    with pytest.raises(ValueError, match='not a square'):
        sequence_to_codes(torch.zeros(1, 6, 2, dtype=torch.long))
    with pytest.raises(ValueError, match='does not hold'):
        sequence_to_codes(torch.zeros(1, 6, 2, dtype=torch.long), grid=(2, 2))
    with pytest.raises(ValueError):
        codes_to_sequence(torch.zeros(3, dtype=torch.long))


def test_sequence_helpers_check_their_arguments():
    from unitok import codes_to_sequence, sequence_to_codes
    seq = torch.zeros(1, 16, 8, dtype=torch.long)
    with pytest.raises(ValueError, match='grid must be'):
        sequence_to_codes(seq, grid=(-4, -4))
    with pytest.raises(ValueError, match='num_query must be'):
        sequence_to_codes(seq, num_query=16)
    with pytest.raises(TypeError, match='torch.Tensor'):
        codes_to_sequence(np.zeros((1, 8, 4, 4)))
