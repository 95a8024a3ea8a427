"""The two ways the MLLM's loss weighs text and images (unitok.mllm.loss_terms), against numbers worked out by
hand and against the official training's formula written out in the test."""
import math

import pytest
import torch

from unitok.mllm.loss_terms import Z_LOSS, combined_loss, target_count


class _Head(torch.nn.Module):
    """Hands back fixed sub-code logits: the hidden state's first K*V values, as (N, K, V)."""

    def __init__(self, K, V):
        super().__init__()
        self.K, self.V = K, V
        self.pos_embed = torch.nn.Parameter(torch.zeros(1))

    def forward(self, h, codes):
        return h[:, :self.K * self.V].reshape(len(h), self.K, self.V)


class _Model:
    """Text logits are the hidden state's first Vt values."""
    loss_weights = (1.0, 1.0)

    def __init__(self, K, V, Vt):
        self.head, self.Vt = _Head(K, V), Vt

    def text_logits(self, h):
        return h[..., :self.Vt]


def _batch(h_rows, labels, codes, targets):
    return (torch.tensor(h_rows, dtype=torch.float32)[None],
            {'labels': torch.tensor([labels]), 'codes': torch.tensor([codes]),
             'image_targets': torch.tensor([targets])})


def test_a_tiny_batch_worked_out_by_hand():
    """One text target (logits [0, 0]: CE ln 2) and one image position of K=2 sub-codes, V=2:
    sub-code 0 logits [2, 0] target 0 (CE ln(1 + e^-2), max 2), sub-code 1 logits [0, 1] target 0
    (CE ln(1 + e)), max 1)."""
    model = _Model(K=2, V=2, Vt=2)
    h, batch = _batch([[0., 0., 0., 0.],           # position 0: the text target (label 1)
                       [2., 0., 0., 1.],           # position 1: predicts the image position 2
                       [0., 0., 0., 0.]],
                      labels=[1, -100, -100], codes=[[0, 0], [0, 0], [0, 0]], targets=[False, True, False])
    text, a, b = math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.e)
    official, metrics = combined_loss(model, h, batch, loss='official')
    assert official.item() == pytest.approx((text + a + b + Z_LOSS * (2 ** 2 + 1 ** 2)) / 3, abs=1e-7)
    assert metrics['z_loss'].item() == pytest.approx(Z_LOSS * 2.5, abs=1e-9)
    ours, m = combined_loss(model, h, batch)
    assert ours.item() == pytest.approx((text + (a + b) / 2) / 2, abs=1e-7)
    assert 'z_loss' not in m
    for got in (metrics, m):       # the logged means are the same under both weighings
        assert got['text_loss'].item() == pytest.approx(text, abs=1e-7)
        assert got['image_loss'].item() == pytest.approx((a + b) / 2, abs=1e-7)
    assert target_count(batch, 2, 'official').item() == 3 and target_count(batch, 2).item() == 2


def _official_formula(text_logits, text_labels, image_logits, image_labels):
    """mini_gemini_llama.py's forward: the text CE mean and the image CE mean plus 5e-5 times the mean squared
    largest logit, weighted by their token counts (every sub-code a token)."""
    ce = torch.nn.CrossEntropyLoss()
    text_loss = ce(text_logits, text_labels)
    image_logits = image_logits.reshape(-1, image_logits.shape[-1])
    image_loss = ce(image_logits, image_labels.reshape(-1)) + 0.00005 * (image_logits.max(-1).values ** 2).mean()
    nt, ni = len(text_labels), image_labels.numel()
    return image_loss * (ni / (ni + nt)) + text_loss * (nt / (ni + nt))


def test_the_official_weighing_is_the_official_formula_on_a_random_batch():
    g = torch.Generator().manual_seed(0)
    K, V, Vt, B, T = 3, 5, 7, 2, 6
    model = _Model(K, V, Vt)
    h = torch.randn(B, T, K * V, generator=g) * 3
    labels = torch.full((B, T), -100)
    labels[0, 1], labels[0, 4], labels[1, 0] = 2, 6, 3
    codes = torch.randint(V, (B, T, K), generator=g)
    targets = torch.zeros(B, T, dtype=torch.bool)
    targets[1, 1:4] = True                          # positions 1..3 predict the codes of 2..4
    batch = {'labels': labels, 'codes': codes, 'image_targets': targets}
    got, _ = combined_loss(model, h, batch, loss='official')
    text = labels != -100
    want = _official_formula(h[text][:, :Vt], labels[text], h[1, 1:4].reshape(3, K, V), codes[1, 2:5])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    ours, _ = combined_loss(model, h, batch)
    assert ours.item() != pytest.approx(want.item(), rel=1e-3)
    # a data-parallel denominator replaces the batch's own count
    half, _ = combined_loss(model, h, batch, denominator=2 * target_count(batch, K, 'official'), loss='official')
    assert half.item() == pytest.approx(want.item() / 2, rel=1e-6)


def test_no_image_targets_and_an_unknown_loss():
    model = _Model(K=2, V=2, Vt=2)
    h, batch = _batch([[1., 0., 0., 0.], [0., 0., 0., 0.]], labels=[0, -100], codes=[[0, 0], [0, 0]],
                      targets=[False, False])
    loss, m = combined_loss(model, h, batch, loss='official')
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-7) and m['image_loss'].item() == 0
    with pytest.raises(ValueError, match='loss must be one of'):
        combined_loss(model, h, batch, loss='mean')
