"""Residual vector quantization (unitok.quantizers.residual) inside UniTok."""
import torch
import torch.nn.functional as F

from family_checks import FamilyChecks
from unitok.config import UniTokConfig
from unitok.quantizers import ResidualQuantizer, create_quantizer


class TestResidual(FamilyChecks):
    name, vocab_sizes = 'residual', (512,) * 8


def test_each_level_takes_the_code_nearest_to_what_the_levels_before_left():
    torch.manual_seed(0)
    q = create_quantizer(UniTokConfig.from_preset('unitok-tiny', quantizer='residual'))
    assert isinstance(q, ResidualQuantizer) and q.codebooks.shape == (8, 512, 32)
    z = torch.randn(2, 5, 32)
    codes = q.nearest_codes(z)                                    # (2, 8, 5)
    residual = F.normalize(z, dim=-1).view(10, 32)
    for k in range(8):
        dist = torch.cdist(residual, q.codebooks[k].detach())
        assert torch.equal(codes[:, k].reshape(10), dist.argmin(-1))
        residual = residual - q.codebooks[k].detach()[dist.argmin(-1)]
    expected = sum(q.codebooks[k].detach()[codes[:, k]] for k in range(8))  # (2, 5, 32)
    torch.testing.assert_close(q.lookup(codes), expected)


def test_the_codebook_loss_trains_every_level():
    torch.manual_seed(0)
    q = create_quantizer(UniTokConfig.from_preset('unitok-tiny', quantizer='residual'))
    q(torch.randn(2, 5, 32)).losses['commitment'].backward()
    assert (q.codebooks.grad.abs().sum((1, 2)) > 0).all()
