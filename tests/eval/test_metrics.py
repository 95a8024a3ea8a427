"""The metrics leaf (unitok.eval.metrics) on constructed inputs whose answers are known in closed form."""
import math

import pytest
import torch

from unitok.eval import metrics as M


def test_psnr_ssim_l1_of_known_images():
    target = torch.zeros(2, 3, 8, 8)                       # [-1, 1] scale: 0.5 grey on [0, 1]
    shifted = target + 0.2                                 # 0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    assert M.psnr(shifted, target).tolist() == pytest.approx([20.0, 20.0], abs=1e-5)     # 0.2 is inexact in float32
    assert M.psnr(target, target).tolist() == [M.MAX_PSNR, M.MAX_PSNR]      # identical: capped, not infinite
    half = target.clone()
    half[1, :, :4] += 0.2                                  # image 1: half its pixels off by 0.1 -> MSE 0.005
    assert M.psnr(half, target)[1].item() == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-5)
    assert M.l1(shifted, target).tolist() == pytest.approx([0.2, 0.2], abs=1e-7)
    assert M.ssim(target, target).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert M.ssim(noise, torch.zeros(1, 3, 16, 16)).item() < 0.5


def _cross(dim: int, scale: float, centre: torch.Tensor) -> torch.Tensor:
    """2*dim points +-scale*e_i around centre: mean = centre, unbiased covariance = 2 scale^2 / (2 dim - 1) * I."""
    eye = torch.eye(dim, dtype=torch.float64) * scale
    return torch.cat([eye, -eye]) + centre


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    d = 4
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    real, fake = _cross(d, 1.0, mu1), _cross(d, 3.0, mu2)
    s1, s2 = math.sqrt(2 * 1.0 / (2 * d - 1)), math.sqrt(2 * 9.0 / (2 * d - 1))
    # diagonal covariances commute: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum_i (s1 - s2)^2
    expected = float((mu1 - mu2).pow(2).sum()) + d * (s1 - s2) ** 2
    assert M.frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)
    assert M.frechet_distance(real, real.clone()) == pytest.approx(0.0, abs=1e-6)


def test_kid_of_two_point_sets_is_the_hand_computed_mmd():
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]])
    # k(a, b) = (a b + 1)^3: xx off-diagonal 1, yy off-diagonal 343, xy mean (1 + 1 + 27 + 64) / 4
    mean, std = M.kernel_inception_distance(x, y, subsets=3, subset_size=2)
    assert (mean, std) == (pytest.approx(1 + 343 - 2 * 93 / 4), 0.0)
    interval = M.kid_interval(x.repeat(2, 1), y.repeat(2, 1), subsets=5, subset_size=2)
    assert interval['subset_size'] == 2 and interval['low'] <= interval['mean'] <= interval['high']


def test_precision_recall_of_constructed_sets():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    # k=1 balls of the real points have radius 1: 2.5 and 0.5 are inside, 10 and 11 are not -> precision 1/2
    fake = torch.tensor([[2.5], [0.5], [10.0], [11.0]])
    precision, recall = M.precision_recall(real, fake, k=1)
    assert precision == 0.5
    # fake balls: 0.5 and 2.5 reach each other (radius 2) and cover every real point -> recall 1
    assert recall == 1.0


def test_distribution_metrics_combine_the_three_families():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g) + 1
    out = M.distribution_metrics(a, b, 'x', pr_k=3, kid_subsets=5, kid_subset_size=10, seed=1)
    assert out['fd_x'] == M.frechet_distance(a, b)
    assert (out['precision_x'], out['recall_x']) == M.precision_recall(a, b, 3)
    kid = M.kid_interval(a, b, 5, 10, 1)
    assert (out['kid_x'], out['kid_x_std'], out['kid_x_low'], out['kid_x_high']) == \
        (kid['mean'], kid['std'], kid['low'], kid['high'])


def test_weighted_nll_sums_and_means():
    sums = M.weighted_sums([torch.tensor(2.0), 4.0], 3) + M.weighted_sums([torch.tensor(1.0), 1.0], 1)
    assert sums.tolist() == [7.0, 13.0, 4.0] and sums.dtype == torch.float64
    assert M.weighted_means(sums, ['a', 'b']) == {'a': 7 / 4, 'b': 13 / 4}
    assert M.codebook_nll(sums, 2) == {'nll_0': 7 / 4, 'nll_1': 13 / 4, 'nll': (7 / 4 + 13 / 4) / 2}
    assert M.weighted_means(torch.zeros(2, dtype=torch.float64), ['a']) == {'a': 0.0}   # no samples


def test_answer_scores_and_consistency():
    assert M.normalize_answer('  Red_Apple!! ') == 'red apple'
    assert M.exact_match('Red apple.', 'red APPLE') == 1.0 and M.exact_match('apple', 'red apple') == 0.0
    assert M.token_f1('red apple pie', 'red apple') == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    requested = torch.arange(4).repeat_interleave(25)
    share, control = M.consistency(requested.clone(), requested)
    assert share == 1.0 and control < 0.6
    assert M.consistency((requested + 1) % 4, requested)[0] == 0.0
