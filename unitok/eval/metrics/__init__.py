"""Metric maths on tensors: no loading, no files, no models. One module per metric family."""
from .answers import exact_match, normalize_answer, token_f1
from .codebook import CodebookStats
from .consistency import LinearProbe, consistency
from .copying import copy_statistics, nearest_distances
from .distribution import distribution_metrics
from .frechet import FrechetDistance, frechet_distance
from .inception_score import inception_score
from .kid import kernel_inception_distance, kid_interval
from .nll import codebook_nll, weighted_means, weighted_sums
from .precision_recall import precision_recall
from .reconstruction import MAX_PSNR, l1, psnr, ssim
from .zero_shot import retrieval_recall, topk_correct

__all__ = ['exact_match', 'normalize_answer', 'token_f1', 'CodebookStats', 'LinearProbe', 'consistency',
           'copy_statistics', 'nearest_distances', 'distribution_metrics', 'FrechetDistance', 'frechet_distance',
           'inception_score', 'kernel_inception_distance', 'kid_interval', 'codebook_nll', 'weighted_means',
           'weighted_sums', 'precision_recall', 'MAX_PSNR', 'l1', 'psnr', 'ssim', 'retrieval_recall', 'topk_correct']
