"""Weight EMA: the warmed-up decay, swapping the average in and out, and its state."""
import pytest
import torch
import torch.nn as nn

from unitok.train.ema import EMA


def test_updates_follow_the_warmed_up_decay():
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)                      # frozen tensors are not averaged
    ema = EMA(model, decay=0.9)
    assert ema.names == ['weight']
    expected = model.weight.detach().clone()
    for t in range(20):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))                  # 0.1, 0.18, ... then 0.9
        expected = d * expected + (1 - d) * model.weight.detach()
    assert torch.allclose(ema.shadow[0], expected, atol=1e-5)
    assert ema.updates == 20


def test_applied_swaps_in_the_average_and_restores():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.shadow[0].fill_(7.0)
    with ema.applied(model) as m:
        assert torch.all(m.weight == 7.0)
    assert torch.all(model.weight == 1.0)
    with pytest.raises(RuntimeError):                     # restored even when the body fails
        with ema.applied(model):
            raise RuntimeError('boom')
    assert torch.all(model.weight == 1.0)


def test_state_round_trip_and_mismatch():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    ema.update(model)
    other = EMA(nn.Linear(3, 2), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(KeyError, match='EMA state lacks'):
        EMA(nn.Sequential(nn.Linear(3, 2)), 0.99).load_state_dict(ema.state_dict())
