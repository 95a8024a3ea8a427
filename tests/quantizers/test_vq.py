"""The single-codebook quantizer (unitok.quantizers.vq) inside UniTok."""
import pytest
import torch

from family_checks import FamilyChecks
from unitok.config import ConfigError, UniTokConfig
from unitok.quantizers import MultiCodebookQuantizer, VectorQuantizer, create_quantizer

SHAPE = dict(num_codebooks=1, codebook_size=4096, code_dim=32)


class TestVQ(FamilyChecks):
    name, overrides, vocab_sizes = 'vq', SHAPE, (4096,)


def test_vq_is_multi_codebook_quantization_with_one_codebook():
    torch.manual_seed(0)
    q = create_quantizer(UniTokConfig.from_preset('unitok-tiny', quantizer='vq', **SHAPE))
    ref = MultiCodebookQuantizer(1, 4096, 32)
    ref.load_state_dict(q.state_dict())
    z = torch.randn(2, 16, 32)
    assert isinstance(q, VectorQuantizer) and q.num_codebooks == 1
    assert torch.equal(q(z).codes, ref(z).codes) and torch.equal(q.lookup(q(z).codes), ref.lookup(ref(z).codes))


def test_vq_needs_one_codebook():
    with pytest.raises(ConfigError, match="'vq' is one codebook: set num_codebooks=1"):
        create_quantizer(UniTokConfig.from_preset('unitok-tiny', quantizer='vq'))
