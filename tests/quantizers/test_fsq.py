"""Finite scalar quantization (unitok.quantizers.fsq) inside UniTok."""
import pytest
import torch

from family_checks import FamilyChecks
from unitok.config import ConfigError, UniTokConfig
from unitok.quantizers import FiniteScalarQuantizer, create_quantizer
from unitok.quantizers.fsq import default_levels


class TestFSQ(FamilyChecks):
    name, overrides, vocab_sizes = 'fsq', dict(quantizer_levels=(8, 8, 8)), (512,) * 8


def test_a_sub_code_is_the_mixed_radix_number_of_its_group_levels():
    q = create_quantizer(UniTokConfig.from_preset('unitok-tiny', quantizer='fsq', quantizer_levels=(8, 8, 8)))
    assert isinstance(q, FiniteScalarQuantizer) and q.levels == (8, 8, 8)
    z = torch.randn(2, 5, 32)
    grouped = q.projection.split(z).detach()                       # (2, 5, 8, 3)
    level = torch.round((q.fsq.bound(grouped) * 4 + 4)).long()      # 0..7 per dim
    assert level.min() >= 0 and level.max() <= 7
    expected = level[..., 0] + 8 * level[..., 1] + 64 * level[..., 2]
    assert torch.equal(q.nearest_codes(z), expected.permute(0, 2, 1))


def test_levels_in_the_config():
    cfg = UniTokConfig.from_preset('unitok-tiny', quantizer='fsq', quantizer_levels=[8, 8, 8])
    assert cfg.to_dict()['quantizer_levels'] == [8, 8, 8]
    assert 'quantizer_levels' not in UniTokConfig.from_preset('unitok-tiny').to_dict()   # old hashes unchanged
    assert default_levels(512) == (8, 8, 8) and default_levels(4096) == (8, 8, 8, 8) and default_levels(1024) == (8, 8, 16)
    with pytest.raises(ConfigError, match=r'product must equal codebook_size \(512\)'):
        create_quantizer(cfg.replace(quantizer_levels=[8, 8, 4]))
    with pytest.raises(ConfigError, match='quantizer_levels must be integers >= 2'):
        cfg.replace(quantizer_levels=[8, 1])
