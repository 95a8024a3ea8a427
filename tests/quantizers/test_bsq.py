"""Binary spherical quantization (unitok.quantizers.bsq) inside UniTok."""
import torch

from family_checks import FamilyChecks
from unitok.config import UniTokConfig
from unitok.quantizers import BinarySphericalQuantizer, create_quantizer


class TestBSQ(FamilyChecks):
    name, vocab_sizes = 'bsq', (512,) * 8
    other = 'lfq'                               # the same codes and vocabularies, another quantizer


def test_codes_are_signs_of_unit_groups_on_the_sphere():
    torch.manual_seed(0)
    q = create_quantizer(UniTokConfig.from_preset('unitok-tiny', quantizer='bsq'))
    assert isinstance(q, BinarySphericalQuantizer)
    points = q._points(torch.arange(512))
    torch.testing.assert_close(points.norm(dim=-1), torch.ones(512))
    assert torch.equal(points.abs(), torch.full((512, 9), 9 ** -0.5))
    z = torch.randn(2, 5, 32)
    x = q._grouped(z)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(2, 5, 8))
    commitment = q(z.requires_grad_()).losses['commitment']
    q_points = q._points(q.nearest_codes(z).permute(0, 2, 1))
    torch.testing.assert_close(commitment, 0.25 * ((x - q_points) ** 2).mean())
