"""Evaluation subsets (``max_samples``) are fixed, class-balanced samples, the same for any batch size
and process count; ``evaluate`` with a stand-in model whose accuracy is known exactly; the
training-time metric set (psnr, l1, zero_shot, clip_loss) against hand computations."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from unitok.eval import TRAINING_METRICS, EvalConfig, evaluate, subset_indices
from unitok.eval.subsets import source_samples as _samples, stream_samples as _stream_samples

CLASSES, PER_CLASS = 10, 20
# Class 0 is always recognised, every other class in 2 of its 20 images: full-set top-1 = 38 / 200.
CORRECT_PER_CLASS = [20] + [2] * (CLASSES - 1)
FULL_TOP1 = sum(CORRECT_PER_CLASS) / (CLASSES * PER_CLASS)


def _is_correct(i: int) -> bool:
    return i % PER_CLASS < CORRECT_PER_CLASS[i // PER_CLASS]


class SortedSource:
    """A labelled source sorted by class (like an ImageNet val folder): sample i is a flat 16 px
    image whose red and green channels hold i, label ``i // PER_CLASS``."""

    templates = ('a photo of a {}.',)

    def __init__(self, classes=CLASSES, per_class=PER_CLASS, broken=()):
        self.classnames = [f'class {c}' for c in range(classes)]
        self.labels = [i // per_class for i in range(classes * per_class)]
        self.broken = set(broken)

    def __len__(self):
        return len(self.labels)

    def key(self, i):
        return f'img{i:04d}.png'

    def read(self, i):
        if i in self.broken:
            raise OSError(f'cannot identify image file {self.key(i)!r}')
        return Image.new('RGB', (16, 16), (i % 256, i // 256, 0)), f'caption {i}', self.labels[i]


class KnownAccuracyModel(nn.Module):
    """Stand-in for UniTok: reconstructs each image exactly except for a known shift, embeds image i
    as the one-hot of its class when ``_is_correct(i)`` and of the next class otherwise; texts are
    embedded as one-hot vectors of a hash, the zero-shot classifier is the identity."""

    def __init__(self, shift=0.0):
        super().__init__()
        self.config = SimpleNamespace(image_size=16, num_codebooks=2, codebook_size=8)
        self.quantizer = SimpleNamespace(num_codebooks=2, vocab_sizes=(8, 8))   # what the evaluator reads of it
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.shift = shift

    @property
    def device(self):
        return self.logit_scale.device

    @staticmethod
    def index(x):
        u8 = ((x[:, :, 0, 0] + 1) * 127.5).round().long()          # (B, 3)
        return u8[:, 0] + 256 * u8[:, 1]

    def analyze(self, x):
        idx = self.index(x)
        label = idx // PER_CLASS
        predicted = torch.where(torch.tensor([_is_correct(int(i)) for i in idx]), label, (label + 1) % CLASSES)
        codes = torch.stack([idx % 8, (idx // 8) % 8], 1)[:, :, None].expand(-1, -1, 4)   # (B, K, 4)
        rec = (x + self.shift).clamp(-1, 1)
        return codes, rec, F.one_hot(predicted, CLASSES).float()

    def zero_shot_classifier(self, classnames, templates):
        return torch.eye(len(classnames))

    def encode_text(self, texts):
        return F.one_hot(torch.tensor([int(t.split()[-1]) % CLASSES for t in texts]), CLASSES).float()


def _top1_of(indices):
    return sum(_is_correct(i) for i in indices) / len(indices)


def test_subset_of_a_class_sorted_source_covers_the_classes():
    labels = SortedSource().labels
    for n in (5, 12, 37):
        chosen = subset_indices(len(labels), n, labels)
        assert len(chosen) == n == len(set(chosen)) and chosen == sorted(chosen)
        assert len({labels[i] for i in chosen}) >= min(n, CLASSES)
        assert subset_indices(len(labels), n, labels) == chosen            # fixed
    # classes as equal as they can be: 37 = 3 * 10 + 7
    counts = torch.bincount(torch.tensor([labels[i] for i in subset_indices(len(labels), 37, labels)]))
    assert sorted(counts.tolist()) == [3] * 3 + [4] * 7
    assert subset_indices(len(labels), None, labels) == list(range(len(labels)))
    assert subset_indices(len(labels), 10_000, labels) == list(range(len(labels)))
    unlabelled = subset_indices(200, 12, None)
    assert len(set(unlabelled)) == 12 and unlabelled != list(range(12))    # seeded sample, not the first 12


def test_subset_accuracy_agrees_with_the_full_set_in_expectation():
    labels = SortedSource().labels
    assert _top1_of(range(12)) == 1.0                                       # the first 12: the 1.0
    estimates = [_top1_of(subset_indices(len(labels), 12, labels, seed)) for seed in range(300)]
    mean = sum(estimates) / len(estimates)
    # std of one 12-sample estimate ~0.11; of the mean over 300 ~0.007
    assert abs(mean - FULL_TOP1) < 0.03, (mean, FULL_TOP1)


def test_subset_does_not_depend_on_the_process_count():
    source, cfg = SortedSource(), EvalConfig(max_samples=12)
    one = [s[0] for s in _samples(source, 0, 1, cfg)]
    for world in (2, 3, 5):
        shares = [[s[0] for s in _samples(source, r, world, cfg)] for r in range(world)]
        assert sorted(k for share in shares for k in share) == sorted(one) and len(one) == 12


def test_streamed_subset_does_not_depend_on_the_process_count():
    class Stream:
        urls = [f'shard{s}.tar' for s in range(3)]

        def iter_once(self, rank, world):
            for url in self.urls[rank::world]:
                for j in range(6):
                    yield {'__url__': url, '__key__': f'{j}'}

        @staticmethod
        def key(raw):
            return f"{raw['__url__']}:{raw['__key__']}"

        def decode(self, raw):
            return Image.new('RGB', (16, 16)), 'x', -1

    keys = {w: sorted(s[0] for r in range(w) for s in _stream_samples(Stream(), r, w, 8)) for w in (1, 2, 3)}
    assert keys[1] == keys[2] == keys[3] and len(keys[1]) == 8
    # the first samples of every shard in turn: 3 + 3 + 2
    assert sum(k.startswith('shard2') for k in keys[1]) == 2 and 'shard0.tar:2' in keys[1]


def test_evaluate_on_a_subset_reports_its_coverage_and_the_known_accuracy():
    model, source = KnownAccuracyModel(), SortedSource()
    full = evaluate(model, source, EvalConfig(metrics=('zero_shot',), batch_size=64)).metrics
    assert full['zero_shot_top1'] == pytest.approx(FULL_TOP1, abs=1e-12)
    assert full['samples'] == 200 and full['classes_covered'] == CLASSES
    results = [evaluate(model, source, EvalConfig(metrics=('zero_shot',), max_samples=12, batch_size=b))
               for b in (1, 5, 12)]
    want = _top1_of(subset_indices(len(source), 12, source.labels))
    for r in results:
        assert r.metrics['zero_shot_top1'] == pytest.approx(want, abs=1e-12)
        assert r.metrics['samples'] == 12 and r.metrics['classes_covered'] == CLASSES
        assert r.metrics['zero_shot_samples'] == 12 and r.metrics['zero_shot_classes'] == CLASSES
        assert r.subset == 'class-balanced sample of 12 of 200 (seed 0)'


def test_training_metrics_equal_hand_computations_and_unreadable_images_are_counted():
    model, source = KnownAccuracyModel(shift=0.1), SortedSource(broken={3, 50, 51})
    model.train()
    result = evaluate(model, source, EvalConfig(metrics=TRAINING_METRICS, batch_size=7))
    m = result.metrics
    assert model.training                                          # the caller's mode is restored
    assert all(type(v) in (int, float) for v in m.values()), m      # plain numbers, loggable as they are
    assert m['samples'] == 197 and m['skipped'] == 3
    assert [s.split(':')[0] for s in result.skipped] == ['img0003.png', 'img0050.png', 'img0051.png']
    # reference: the same images read and reconstructed by hand
    keep = [i for i in range(200) if i not in source.broken]
    x = torch.stack([torch.full((3, 16, 16), 0.0) + torch.tensor([(i % 256) / 127.5 - 1, i // 256 / 127.5 - 1, -1.0])
                     .view(3, 1, 1) for i in keep])
    rec = (x + 0.1).clamp(-1, 1)
    mse01 = ((rec - x) / 2).square().flatten(1).mean(1)
    assert m['psnr'] == pytest.approx(float((-10 * torch.log10(mse01)).mean()), rel=1e-5)
    assert m['l1'] == pytest.approx(float((rec - x).abs().flatten(1).mean(1).mean()), rel=1e-5)
    assert m['zero_shot_top1'] == pytest.approx(_top1_of(keep), abs=1e-12)
    # in-batch CLIP loss: batches of 7 readable samples in order, weighted by their size
    total = 0.0
    for s in range(0, len(keep), 7):
        ids = keep[s:s + 7]
        _, _, img = model.analyze(x[s:s + 7])
        txt = model.encode_text([f'caption {i}' for i in ids])
        logits = model.logit_scale.detach().exp() * img @ txt.T
        target = torch.arange(len(ids))
        total += float(F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2 * len(ids)
    assert m['clip_loss'] == pytest.approx(total / len(keep), rel=1e-5)


def test_eval_config_rejects_bad_values():
    for bad, match in ((dict(metrics='psnr'), 'sequences'), (dict(metrics=('psnr', 'fid')), 'unknown metric'),
                       (dict(max_samples=0), 'max_samples'), (dict(batch_size=-1), 'batch_size'),
                       (dict(templates=('a photo',)), 'no {}')):
        with pytest.raises((TypeError, ValueError), match=match):
            EvalConfig(**bad).validate()
