"""Lookup-free quantization (unitok.quantizers.lfq) inside UniTok."""
import math

import torch

from family_checks import FamilyChecks
from unitok.config import UniTokConfig
from unitok.quantizers import LookupFreeQuantizer, create_quantizer


class TestLFQ(FamilyChecks):
    name, vocab_sizes = 'lfq', (512,) * 8


def _quantizer(**kw):
    torch.manual_seed(0)
    return create_quantizer(UniTokConfig.from_preset('unitok-tiny', quantizer='lfq', **kw))


def test_a_sub_code_is_the_bits_of_its_group_signs():
    q = _quantizer()
    assert isinstance(q, LookupFreeQuantizer) and (q.num_codebooks, q.bits) == (8, 9)
    z = torch.randn(2, 5, 32)
    bits = (q.projection.split(z).detach() > 0).long()              # (2, 5, 8, 9)
    expected = (bits * 2 ** torch.arange(8, -1, -1)).sum(-1)
    assert torch.equal(q.nearest_codes(z), expected.permute(0, 2, 1))
    points = q._points(torch.tensor([0, 511, 256]))
    assert torch.equal(points[0], -torch.ones(9)) and torch.equal(points[1], torch.ones(9)) and points[2, 0] == 1


def test_the_entropy_term_is_per_token_minus_batch_entropy():
    q = _quantizer(entropy_loss=True, entropy_temperature=1.0)
    z = torch.randn(3, 4, 32)
    x = q.projection.split(z).reshape(12, 8, 9)
    table = q._points(torch.arange(512))
    prob = torch.softmax(2 * torch.einsum('nkb,vb->nkv', x, table), -1)
    per_token = -(prob * prob.log()).sum(-1).mean().detach()
    mean = prob.mean(0)
    expected = per_token - (-(mean * mean.log()).sum(-1)).mean()
    torch.testing.assert_close(q(z).losses['entropy'], expected)
    assert 0 < float(per_token) < math.log(512)
    assert float(_quantizer()(z).losses['entropy']) == 0.0             # off unless asked (loss.entropy > 0)
