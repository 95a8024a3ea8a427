"""Evaluation of the multimodal LLM (:class:`~unitok.mllm.UniTokMLLM`, ``unitok eval-mllm``).

On held-out items (exported codes, the images they came from; for ``builtin:emoji`` emoji whose
names never occur in training):

Understanding

* ``llm_zero_shot_top1``: classification through the LLM. For the image and the category question,
  each class name's answer (its tokens and the end-of-turn token, as in training) gets its summed
  log-likelihood; the prediction is the class of the highest one. The image and question prefix is
  run once per image and its KV cache repeated for the C answers. Beside it ``chance`` (1 / C) and
  ``majority_rate`` (the share of the most common class among the items).
* ``name_exact_match`` / ``name_token_f1``: greedy answers to the name question against the item's
  name (normalised: lower case, punctuation to spaces; F1 over word multisets, SQuAD-style); on a
  fixed class-balanced subset of training items too (``train_name_*``), when train codes are given.
* ``tokenizer_zero_shot_top1``: the UniTok tokenizer's own CLIP zero-shot on the same held-out images
  (class names through the data source's templates).
* controls, scored with the same classifier against the item's true class:
  ``control_swapped_top1`` -- every image's codes replaced by those of another held-out item of
  another class (a fixed seeded derangement, :func:`crossing_derangement`; the classifier's output on
  those codes is the partner's own, reused): a model that reads the image answers the other item's
  class, so this sits at or below chance (its agreement with the swapped-in item's class is
  ``control_swapped_partner_top1``); ``control_noise_top1`` -- uniform
  random codes (seeded per item): near chance, or at the rate of the class the model falls back to.

Text-to-image, at every guidance scale of ``cfg_scales``: the draw prompt with each item's name,
``samples_per_item`` samples decoded by the tokenizer and seen as uint8 images (what PNG files hold):

* ``t2i_consistency``: the share of samples whose tokenizer zero-shot category is the item's
  (:func:`~unitok.eval.generation.consistency`; ``t2i_control`` the shuffled-label control);
* ``fd_{extractor}``, ``kid_*``, ``precision_*``, ``recall_*`` against the held-out real images
  (:func:`~unitok.eval.generation.distribution_metrics`, float64), beside the floors
  ``real_vs_real`` (a class-balanced train subset as large as one scale's samples) and
  ``reconstruction_vs_real`` (the held-out codes decoded, against the images).

Reproducibility: every model pass runs on fixed chunks of ``chunk_size`` items (chunk ``i`` of the
text-to-image samples seeded with ``mix_seed(seed, i)``, the same seeds at every scale; noise codes
seeded per item), so no number depends on ``batch_size``, which only batches the feature extractor.
Single process: no collectives (run it on one device; it is cheap next to training).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..data import eval_transform, has_split, mix_seed, open_source
from ..images import to_uint8_tensor
from ..utils import dataclass_io
from .evaluator import subset_indices
from .features import EXTRACTORS, build_extractor
from .generation import GenEvalConfig, consistency, distribution_metrics, progress_bar
from .zero_shot import topk_correct

log = logging.getLogger(__name__)

TRAINING_INFO = 'training.json'           # written beside a trained MLLM by the training task
_TEXT_FIELDS = ('question', 'category_question', 'draw')


class MLLMEvalError(ValueError):
    """The MLLM, its codes and the data cannot be evaluated together (named in the message)."""


@dataclass
class MLLMEvalConfig:
    """Protocol of :func:`evaluate_mllm` (recorded in the report)."""
    question: str | None = None          # the name question (None: the training task's default)
    category_question: str | None = None   # the question of the LLM classification (None: likewise)
    draw: str | None = None              # text-to-image template with one {} (None: likewise)
    label_set: str | None = None         # label set of the codes whose class names are the categories (None: first)
    max_items: int | None = None         # held-out items: a fixed class-balanced subset of this size
    train_items: int = 32                # training items of train_name_* (class-balanced, fixed)
    max_new_tokens: int = 24             # greedy answer length limit
    cfg_scales: tuple[float, ...] = (1.0, 2.0)   # text-to-image guidance scales
    samples_per_item: int = 1            # text-to-image samples per held-out item and scale
    temperature: float = 1.0             # text-to-image sampling (0: greedy)
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0                        # sample chunks, noise codes, the swap, subsets
    chunk_size: int = 8                  # items per model / tokenizer call (decides the samples)
    batch_size: int = 32                 # feature-extractor batches (changes no number)
    extractor: str = 'effnet-lite0'      # features of the Fréchet distance and precision / recall
    extractor_weights: str | None = None   # local weights file of 'inception' / 'dinov2'
    templates: tuple[str, ...] | None = None   # tokenizer zero-shot templates with {}; default: the source's
    pr_k: int = 3                        # neighbourhood size of precision / recall
    kid_subsets: int = 20
    kid_subset_size: int = 1000
    examples: int = 8                    # items shown in the report (question / answer, prompt / sample)

    def __post_init__(self):
        dataclass_io.coerce_fields(self)

    def validate(self) -> None:
        for name in ('train_items', 'max_new_tokens', 'samples_per_item', 'chunk_size', 'batch_size', 'pr_k',
                     'kid_subsets', 'kid_subset_size'):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MLLMEvalError(f'MLLMEvalConfig.{name} must be a positive integer, got {v!r}')
        if self.max_items is not None and (isinstance(self.max_items, bool) or self.max_items < 2):
            raise MLLMEvalError(f'MLLMEvalConfig.max_items must be None or an integer >= 2, got {self.max_items!r}')
        if self.examples < 0:
            raise MLLMEvalError(f'MLLMEvalConfig.examples must be >= 0, got {self.examples!r}')
        if self.extractor not in EXTRACTORS:
            raise MLLMEvalError(f'unknown feature extractor {self.extractor!r}; choose from {EXTRACTORS}')
        scales = tuple(self.cfg_scales)
        if not scales or any(not math.isfinite(s) or s < 0 for s in scales) or len(set(scales)) != len(scales):
            raise MLLMEvalError(f'MLLMEvalConfig.cfg_scales must be distinct finite numbers >= 0, got {scales!r}')
        if not self.temperature >= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise MLLMEvalError(f'sampling needs temperature >= 0, 0 < top_p <= 1, top_k >= 0; got '
                                f'{self.temperature!r}, {self.top_p!r}, {self.top_k!r}')
        if self.draw is not None and self.draw.count('{}') != 1:
            raise MLLMEvalError(f'MLLMEvalConfig.draw must contain exactly one {{}} (the name), got {self.draw!r}')
        if self.category_question is not None and not self.category_question.strip():
            raise MLLMEvalError('MLLMEvalConfig.category_question is empty: the LLM classification needs a question')
        for t in self.templates or ():
            if '{}' not in t:
                raise MLLMEvalError(f'zero-shot template {t!r} has no {{}} for the class name')

    def resolved(self, info: dict | None = None) -> 'MLLMEvalConfig':
        """A copy with the unset questions / template filled from ``info`` (a model's ``training.json``),
        else from the training task's defaults."""
        from ..train.tasks.mllm import MLLMTrainConfig
        defaults = MLLMTrainConfig()
        info = info or {}
        values = asdict(self)
        for k in _TEXT_FIELDS:
            if values[k] is None:
                values[k] = info.get(k) or getattr(defaults, k)
        if values['label_set'] is None and info.get('category_set'):
            values['label_set'] = info['category_set']
        out = MLLMEvalConfig(**values)
        out.validate()
        return out


# ---------------------------------------------------------------------- small pieces
def normalize_answer(text: str) -> str:
    """Lower case, every run of characters other than letters and digits -> one space, stripped."""
    return ' '.join(re.sub(r'[\W_]+', ' ', text.lower()).split())


def token_f1(prediction: str, truth: str) -> float:
    """F1 of the word multisets of the normalised strings (1 when both are empty)."""
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not p or not t:
        return float(p == t)
    common = sum((Counter(p) & Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def crossing_derangement(labels: Sequence[int], seed: int = 0) -> list[int]:
    """A seeded permutation ``partner`` of ``range(len(labels))`` with ``labels[partner[i]] != labels[i]``
    for every ``i``: items grouped by class (classes and items in seeded random order), then shifted by
    the size of the largest class. Needs no class holding more than half of the items."""
    n = len(labels)
    counts = Counter(int(v) for v in labels)
    largest = max(counts.values()) if counts else 0
    if n < 2 or 2 * largest > n:
        raise MLLMEvalError(f'the swapped-image control needs items of several classes, none holding more than half '
                            f'of them; got {n} items with class counts {dict(sorted(counts.items()))}: evaluate more '
                            'items (--max-items)')
    g = torch.Generator().manual_seed(seed)
    class_key = dict(zip(sorted(counts), torch.randperm(len(counts), generator=g).tolist()))
    item_key = torch.randperm(n, generator=g).tolist()
    order = sorted(range(n), key=lambda i: (class_key[int(labels[i])], item_key[i]))
    partner = [0] * n
    for p, i in enumerate(order):
        partner[i] = order[(p + largest) % n]
    return partner


@torch.no_grad()
def answer_log_likelihoods(model, codes: torch.Tensor, question: str, answers: Sequence[str]) -> torch.Tensor:
    """Summed log-likelihoods ``(B, C)`` float64 of each answer (its tokens and the end-of-turn token,
    the training target of :meth:`~unitok.mllm.UniTokMLLM.understanding_example`) given each image's
    codes ``(B, K, h, w)`` and ``question``. One pass over the B prefixes (image + question), whose KV
    cache is repeated for the C answers, run as one right-padded batch of B * C rows."""
    from transformers import DynamicCache

    from ..mllm.data import IGNORE
    if not answers:
        raise MLLMEvalError('answer_log_likelihoods needs at least one answer')
    B, C = codes.shape[0], len(answers)
    device = model.device
    examples = [model.understanding_example(c, question) for c in codes]
    P = len(examples[0]['input_ids'])
    targets = []
    for a in answers:
        full = model.understanding_example(codes[0], question, a)
        labels = full['labels']
        targets.append(labels[labels != IGNORE])                 # answer tokens + end of turn
        if not torch.equal(full['input_ids'][:P], examples[0]['input_ids']):
            raise MLLMEvalError(f'the answer {a!r} changes the tokens of the question before it')
    ids = torch.stack([e['input_ids'] for e in examples]).to(device)               # (B, P)
    image = torch.stack([e['image_mask'] for e in examples]).to(device)
    grid = torch.stack([e['codes'] for e in examples]).to(device)                  # (B, P, K)
    mask = torch.ones_like(ids)
    positions = torch.arange(P, device=device).expand(B, P)
    was = model.training
    model.eval()
    try:
        cache = DynamicCache(config=model.llm.config)
        h = model.hidden_states(model.embed(ids, image, grid), mask, positions, cache)[:, -1]   # (B, D)
        first = model.text_logits(h).float().log_softmax(-1)                        # (B, V)
        T = max(len(t) for t in targets)
        out = torch.zeros(B, C, dtype=torch.float64, device=device)
        for c, t in enumerate(targets):
            out[:, c] = first[:, int(t[0])].double()
        if T > 1:
            # the inputs after the prefix: every answer but its last token, right-padded (B*C, T-1)
            inputs = torch.zeros(C, T - 1, dtype=torch.long)
            valid = torch.zeros(C, T - 1, dtype=torch.bool)
            for c, t in enumerate(targets):
                inputs[c, :len(t) - 1] = t[:-1]
                valid[c, :len(t) - 1] = True
            inputs, valid = inputs.repeat(B, 1).to(device), valid.repeat(B, 1).to(device)
            cache.batch_repeat_interleave(C)                                        # row b -> rows b*C..b*C+C-1
            full_mask = torch.cat([mask.repeat_interleave(C, 0), valid.long()], dim=1)
            pos = (P + torch.arange(T - 1, device=device)).expand(B * C, T - 1)
            hh = model.hidden_states(model.embed(inputs), full_mask, pos, cache)   # (B*C, T-1, D)
            logp = model.text_logits(hh).float().log_softmax(-1)                    # (B*C, T-1, V)
            nxt = torch.zeros(C, T - 1, dtype=torch.long)
            for c, t in enumerate(targets):
                nxt[c, :len(t) - 1] = t[1:]
            nxt = nxt.repeat(B, 1).to(device)
            rest = logp.gather(-1, nxt[..., None])[..., 0].double() * valid       # (B*C, T-1)
            out += rest.sum(1).view(B, C)
    finally:
        model.train(was)
    return out.cpu()


# ---------------------------------------------------------------------- inputs
def _code_dataset(codes, label_set, what):
    from ..generation.codes import CodeDataset
    if isinstance(codes, CodeDataset):
        if label_set is not None and codes.classnames != codes.label_sets.get(label_set):
            return CodeDataset(codes.directory, view=0, label=label_set)
        return codes if codes.view == 0 else CodeDataset(codes.directory, view=0, label=label_set)
    if not isinstance(codes, (str, os.PathLike)):
        raise MLLMEvalError(f'{what} codes must be an export directory or a CodeDataset, got {type(codes).__name__}')
    try:
        return CodeDataset(os.fspath(codes), view=0, label=label_set)
    except ValueError as e:
        raise MLLMEvalError(f'{what} codes: {e}') from None


def _items(ds, model, what: str) -> list[dict]:
    """Labelled items of a code dataset: codes (K, h, w), label, name, source index."""
    from ..train.tasks.mllm import item_name
    c = model.config
    ds.check_tokenizer(model.image_tokenizer)
    ds.expect(c.num_codebooks, c.codebook_size, c.grid, what='this MLLM')
    if not ds.classnames:
        raise MLLMEvalError(f'the {what} codes in {ds.directory!r} have no class labels: export labelled data '
                            '(builtin:NAME or a folder with class sub-folders)')
    items = []
    for i in range(len(ds)):
        it = ds[i]
        if it['label'] >= 0:
            items.append(dict(codes=it['codes'], label=it['label'], name=item_name(ds.captions(i)),
                              index=it['index'], key=ds.key(i)))
    if not items:
        raise MLLMEvalError(f'the {what} codes in {ds.directory!r} hold no labelled item (empty split?)')
    return items


def _open_images(ds, what: str):
    data = ds.manifest['data']
    if data.get('kind') != 'map':
        raise MLLMEvalError(f'the {what} codes in {ds.directory!r} come from streamed shards: pass the images '
                            '(a map-style source) explicitly')
    return open_source(data['spec'], data['split'], resampled=False)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


# ---------------------------------------------------------------------- the evaluation
def evaluate_mllm(model, val_codes, cfg: MLLMEvalConfig | None = None, *, images=None, train_codes=None,
                  train_images=None, progress: bool = False) -> dict:
    """Evaluate a :class:`~unitok.mllm.UniTokMLLM` on held-out codes (see the module docstring).

    Args:
        model: the MLLM, its UniTok tokenizer reachable (``model.image_tokenizer``), on one device.
        val_codes: held-out codes (an export directory or :class:`~unitok.generation.CodeDataset`;
            view 0) exported by the model's tokenizer, with class labels.
        cfg: the protocol (unset questions: the training task's defaults, see :meth:`MLLMEvalConfig.resolved`).
        images: map-style source of the held-out images (default: the export's data spec and split).
        train_codes: training codes for ``train_name_*`` (optional).
        train_images: training images of the real-vs-real floor (default: the 'train' split of the
            held-out export's data spec, when it has one; otherwise the floor is left out).

    Returns the report (JSON-serialisable; keys in the module docstring). Single process.
    """
    return _evaluate(model, val_codes, cfg, images, train_codes, train_images, progress)[0]


def _evaluate(model, val_codes, cfg, images, train_codes, train_images, progress):
    start = time.time()
    cfg = (cfg or MLLMEvalConfig()).resolved()            # validated; unset questions: the training defaults
    extractor = build_extractor(cfg.extractor, cfg.extractor_weights)     # an unknown / missing one fails first
    val = _code_dataset(val_codes, cfg.label_set, 'held-out')
    items = _items(val, model, 'held-out')
    classnames = list(val.classnames)
    C = len(classnames)
    picked = subset_indices(len(items), cfg.max_items, [it['label'] for it in items], cfg.seed)
    items = [items[i] for i in picked]
    N = len(items)
    if N <= cfg.pr_k:
        raise MLLMEvalError(f'{N} held-out items: precision/recall with k={cfg.pr_k} needs more')
    images = images if images is not None else _open_images(val, 'held-out')
    if not hasattr(images, 'read'):
        raise MLLMEvalError('the held-out images must be a map-style source (builtin:NAME or a folder)')
    if max(it['index'] for it in items) >= len(images):
        raise MLLMEvalError(f'the held-out codes index images up to {max(it["index"] for it in items)}, the image '
                            f'source has {len(images)}: not the images these codes were exported from')
    tok = model.image_tokenizer
    device = model.device
    extractor = extractor.to(device)
    size = tok.config.image_size
    transform = eval_transform(size)
    templates = list(cfg.templates or getattr(images, 'templates', None) or ('a photo of a {}.',))
    zs_weights = tok.zero_shot_classifier(classnames, templates)                    # (E, C)
    show = progress
    labels = torch.tensor([it['label'] for it in items])
    K, V, grid = model.config.num_codebooks, model.config.codebook_size, model.config.grid
    codes = torch.stack([it['codes'] for it in items])                               # (N, K, h, w)
    chunks = _chunks(N, cfg.chunk_size)

    def zero_shot(u8: torch.Tensor) -> torch.Tensor:
        emb = tok.encode_image(u8.to(tok.device).float().div(127.5).sub(1))
        return (emb @ zs_weights.to(emb.dtype)).cpu()                               # (B, C)

    def features(u8: torch.Tensor) -> torch.Tensor:
        return torch.cat([extractor(u8[s:e].to(device))[0].double().cpu()
                          for s, e in _chunks(u8.shape[0], cfg.batch_size)])

    # ------------------------------------------------------------ held-out real images, reconstructions
    real_u8, rec_u8, zs_logits = [], [], []
    for s, e in progress_bar(chunks, 'held-out images', len(chunks), show):
        x = torch.stack([transform(images.read(it['index'])[0]) for it in items[s:e]])
        u8 = to_uint8_tensor(x)
        real_u8.append(u8)
        zs_logits.append(zero_shot(u8))
        rec_u8.append(to_uint8_tensor(model.decode_codes(codes[s:e].to(device))).cpu())
    real_u8, rec_u8 = torch.cat(real_u8), torch.cat(rec_u8)
    tokenizer_top1 = topk_correct(torch.cat(zs_logits), labels, ks=(1,))[1] / N

    # ------------------------------------------------------------ LLM classification and its controls
    partner = crossing_derangement(labels.tolist(), cfg.seed)
    noise = torch.stack([torch.randint(V, (K, *grid), generator=torch.Generator().manual_seed(
        mix_seed(cfg.seed, 1, it['index']))) for it in items])
    variants = {'image': codes, 'noise': noise}
    predicted = {k: [] for k in variants}
    for s, e in progress_bar(chunks, 'LLM classification', len(chunks), show):
        for k, v in variants.items():
            ll = answer_log_likelihoods(model, v[s:e].to(device), cfg.category_question, classnames)
            predicted[k].append(ll.argmax(1))
    predicted = {k: torch.cat(v) for k, v in predicted.items()}
    # The swapped control asks the same question of the partner's codes: the classifier's output on
    # those codes is already known (item j's row), so it is reused rather than computed a second time.
    predicted['swapped'] = predicted['image'][partner]

    def accuracy(pred, truth) -> float:
        return float((pred == truth).double().mean())

    # ------------------------------------------------------------ greedy names
    def names(subset: list[dict], desc: str) -> tuple[list[str], dict]:
        answers = [model.chat(it['codes'], cfg.question, max_new_tokens=cfg.max_new_tokens)
                   for it in progress_bar(subset, desc, len(subset), show)]
        scores = {'exact_match': sum(exact_match(a, it['name']) for a, it in zip(answers, subset)) / len(subset),
                  'token_f1': sum(token_f1(a, it['name']) for a, it in zip(answers, subset)) / len(subset)}
        return answers, scores

    answers, held_scores = names(items, 'names (held-out)')
    counts = torch.bincount(labels, minlength=C)
    report = {
        'items': N, 'classes': C, 'classnames': classnames, 'chance': 1.0 / C,
        'majority_rate': float(counts.max()) / N,
        'llm_zero_shot_top1': accuracy(predicted['image'], labels),
        'tokenizer_zero_shot_top1': tokenizer_top1,
        'name_exact_match': held_scores['exact_match'], 'name_token_f1': held_scores['token_f1'],
        'control_swapped_top1': accuracy(predicted['swapped'], labels),
        'control_swapped_partner_top1': accuracy(predicted['swapped'], labels[partner]),
        'control_noise_top1': accuracy(predicted['noise'], labels),
    }
    if train_codes is not None:
        train_ds = _code_dataset(train_codes, cfg.label_set, 'train')
        train_items = _items(train_ds, model, 'train')
        chosen = subset_indices(len(train_items), cfg.train_items, [it['label'] for it in train_items], cfg.seed)
        _, train_scores = names([train_items[i] for i in chosen], 'names (train)')
        report.update(train_name_exact_match=train_scores['exact_match'], train_name_token_f1=train_scores['token_f1'],
                      train_name_items=len(chosen))

    # ------------------------------------------------------------ text-to-image
    n = cfg.samples_per_item
    requested = labels.repeat_interleave(n)
    real_feats = features(real_u8)
    gen_cfg = GenEvalConfig(pr_k=cfg.pr_k, kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size,
                            seed=cfg.seed, extractors=(cfg.extractor,))
    sweep, sample_images = [], {}
    for scale in cfg.cfg_scales:
        u8_all, zs_pred = [], []
        for i, (s, e) in enumerate(progress_bar(chunks, f'text-to-image cfg {scale:g}', len(chunks), show)):
            prompts = [cfg.draw.format(it['name']) for it in items[s:e]]
            sample = model.generate_image(prompts, n=n, cfg_scale=float(scale), temperature=cfg.temperature,
                                          top_k=cfg.top_k, top_p=cfg.top_p, generator=mix_seed(cfg.seed, i))
            u8 = to_uint8_tensor(model.decode_codes(sample)).cpu()                 # (B*n, 3, H, W)
            u8_all.append(u8)
            zs_pred.append(zero_shot(u8).argmax(1))
        u8_all = torch.cat(u8_all)
        m = {'cfg_scale': float(scale), 'samples': int(u8_all.shape[0])}
        m['t2i_consistency'], m['t2i_control'] = consistency(torch.cat(zs_pred), requested, cfg.seed)
        m.update(distribution_metrics(real_feats, features(u8_all), cfg.extractor, gen_cfg))
        sweep.append(m)
        sample_images[float(scale)] = u8_all[::n][:cfg.examples]
        log.info('cfg %g: %s', scale, ', '.join(f'{k} {v:.4g}' for k, v in m.items() if k != 'cfg_scale'))

    floors = {'reconstruction_vs_real': {'samples': N, **distribution_metrics(real_feats, features(rec_u8),
                                                                               cfg.extractor, gen_cfg)}}
    if train_images is None:
        spec = val.manifest['data']
        if spec.get('kind') == 'map' and has_split(spec['spec'], 'train') and spec.get('split') != 'train':
            train_images = open_source(spec['spec'], 'train', resampled=False)
    if train_images is not None:
        count = N * n
        floor_idx = subset_indices(len(train_images), count, getattr(train_images, 'labels', None), cfg.seed)
        u8 = torch.cat([to_uint8_tensor(torch.stack([transform(train_images.read(i)[0]) for i in floor_idx[s:e]]))
                        for s, e in _chunks(len(floor_idx), cfg.batch_size)])
        floors['real_vs_real'] = {'samples': len(floor_idx),
                                  **distribution_metrics(real_feats, features(u8), cfg.extractor, gen_cfg)}

    # ------------------------------------------------------------ examples of the report
    shown = items[:cfg.examples]
    examples = [{'key': it['key'], 'question': cfg.question, 'answer': answers[j], 'truth': it['name'],
                 'category_question': cfg.category_question,
                 'category_answer': model.chat(it['codes'], cfg.category_question, max_new_tokens=cfg.max_new_tokens),
                 'category_truth': classnames[it['label']],
                 'category_predicted': classnames[int(predicted['image'][j])],
                 'prompt': cfg.draw.format(it['name'])} for j, it in enumerate(shown)]
    report.update(t2i=sweep, floors=floors, examples=examples,
                  protocol={**asdict(cfg), 'val_codes': val.directory, 'processes': 1, 'device': str(device)},
                  seconds=time.time() - start)
    figures = {'real': real_u8[:cfg.examples], 'samples': sample_images}
    return report, figures


# ---------------------------------------------------------------------- loading, the report
def read_training_info(mllm_dir: str) -> dict:
    """The ``training.json`` beside a trained MLLM ({} when absent)."""
    path = os.path.join(mllm_dir, TRAINING_INFO)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise MLLMEvalError(f'cannot read {path}: {e}') from None


def _same_dataset(spec_a: str, spec_b: str) -> bool:
    a, b = spec_a.split(':'), spec_b.split(':')
    if a[0] == 'builtin' and b[0] == 'builtin':
        return a[1:2] == b[1:2]
    return os.path.abspath(spec_a.removeprefix('folder:')) == os.path.abspath(spec_b.removeprefix('folder:'))


def run_mllm_evaluation(mllm_dir: str, data: str, out: str, cfg: MLLMEvalConfig | None = None,
                        codes_val: str | None = None, codes_train: str | None = None, llm=None,
                        device: str | torch.device = 'cpu', progress: bool = False) -> dict:
    """Load the MLLM of ``mllm_dir`` (``llm``: another spec or ``(model, tokenizer)`` pair), evaluate it
    on ``data``'s held-out ('val') split, write ``out/report.json`` and ``out/report.html``; returns
    the report. ``codes_val``: the held-out export (default: ``data``'s val split exported with the
    model's tokenizer into ``out/codes-val``, resumed / reused on reruns). ``codes_train``: the
    training export of ``train_name_*`` (default: the one ``training.json`` names, when it exists).
    Unset questions come from ``training.json``."""
    from ..mllm.model import UniTokMLLM
    from ..utils.io import check_writable_dir
    check_writable_dir(out)
    if not has_split(data, 'val'):
        raise MLLMEvalError(f'data {data!r} has no held-out split: use builtin:NAME or a folder with train/ and val/')
    info = read_training_info(mllm_dir)
    cfg = (cfg or MLLMEvalConfig()).resolved(info)
    model = UniTokMLLM.from_pretrained(mllm_dir, llm=llm, map_location=str(device))
    tok = model.image_tokenizer
    if codes_val is None:
        from ..generation.codes import ExportConfig, export_codes
        codes_val = os.path.join(out, 'codes-val')
        export_codes(tok, ExportConfig(data=data, split='val'), codes_val, progress=progress)
    val = _code_dataset(codes_val, cfg.label_set, 'held-out')
    got = val.manifest['data']
    if not _same_dataset(got['spec'], data) or got['split'] != 'val':
        raise MLLMEvalError(f'the held-out codes {codes_val!r} were exported from {got["spec"]!r} split '
                            f'{got["split"]!r}, not from the val split of {data!r}')
    if info.get('classnames') and list(info['classnames']) != list(val.classnames):
        raise MLLMEvalError(f'the model was trained on the classes {info["classnames"][:4]}..., the held-out codes\' '
                            f'label set has {val.classnames[:4]}...: pass the label set it was trained with')
    images = open_source(data, 'val', resampled=False)
    train_images = open_source(data, 'train', resampled=False) if has_split(data, 'train') else None
    codes_train = codes_train or (info.get('codes') if info.get('codes') and os.path.isdir(info['codes']) else None)
    report, figures = _evaluate(model, val, cfg, images, codes_train, train_images, progress)
    report['meta'] = {'mllm': os.path.abspath(mllm_dir), 'data': data, 'codes_val': os.path.abspath(codes_val),
                      'codes_train': codes_train, 'llm': model.config.llm, 'training': info,
                      'versions': {'torch': torch.__version__}}
    write_mllm_report(out, report, figures)
    return report


_ROWS = {
    'llm_zero_shot_top1': 'LLM zero-shot category top-1 (answer log-likelihood)',
    'tokenizer_zero_shot_top1': "tokenizer's CLIP zero-shot category top-1, same images",
    'control_swapped_top1': "control: another item's image of another category (at or below chance)",
    'control_swapped_partner_top1': "control: agreement with the swapped-in image's category",
    'control_noise_top1': 'control: uniform random codes (~chance)',
    'chance': 'chance (1 / classes)', 'majority_rate': 'majority-class rate',
    'name_exact_match': 'held-out name exact match (greedy)', 'name_token_f1': 'held-out name token F1',
    'train_name_exact_match': 'train name exact match (greedy)', 'train_name_token_f1': 'train name token F1',
    'items': 'held-out items', 'classes': 'categories',
}


def write_mllm_report(out_dir: str, report: dict, figures: dict | None = None) -> None:
    """Write ``report.json`` and a self-contained ``report.html`` (understanding table, text-to-image
    table with the floors, example images with question / answer and prompt / sample)."""
    import html

    from ..utils.io import atomic_write
    from .report import format_value, png_data_uri, render_template
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, 'report.json'), lambda f: f.write(json.dumps(report, indent=2) + '\n'),
                 mode='w', what='report')
    esc = html.escape
    rows = ''.join(f'<tr><td class="key"><code>{k}</code><br>{esc(label)}</td><td>{format_value(report[k])}</td></tr>'
                   for k, label in _ROWS.items() if k in report)
    understanding = f'<table><tr><th>metric</th><th>value</th></tr>{rows}</table>'
    columns = {f'cfg {m["cfg_scale"]:g}': m for m in report['t2i']}
    columns.update({f'{k.replace("_", " ")} (floor)': v for k, v in report['floors'].items()})
    keys = [k for k in report['t2i'][0] if k != 'cfg_scale' and not k.endswith(('_std', '_low', '_high'))]
    head = ''.join(f'<th>{esc(c)}</th>' for c in columns)
    body = ''.join('<tr><td class="key"><code>' + esc(k) + '</code></td>' + ''.join(
        f'<td>{format_value(m[k]) if k in m else "&ndash;"}</td>' for m in columns.values()) + '</tr>' for k in keys)
    t2i = f'<table><tr><th>metric</th>{head}</tr>{body}</table>'
    cards = []
    figures = figures or {}
    from ..images import to_pil

    def img(u8) -> str:
        pil = to_pil(u8[None].float().div(127.5).sub(1))[0]
        return f'<img class="thumb" alt="" src="{png_data_uri(pil)}">'
    empty = '<i>(empty answer)</i>'
    for j, ex in enumerate(report.get('examples', [])):
        parts = []
        if 'real' in figures and j < len(figures['real']):
            parts.append(img(figures['real'][j]))
        parts.append(f'<p><b>Q:</b> {esc(ex["question"])}<br><b>A:</b> {esc(ex["answer"]) or empty} '
                     f'<span class="hint">(truth: {esc(ex["truth"])})</span><br>'
                     f'<b>Q:</b> {esc(ex["category_question"])}<br><b>A:</b> {esc(ex["category_answer"]) or empty} '
                     f'<span class="hint">(log-likelihood pick: {esc(ex["category_predicted"])}; truth: '
                     f'{esc(ex["category_truth"])})</span></p>')
        samples = [f'<figure>{img(v[j])}<figcaption>cfg {s:g}</figcaption></figure>'
                   for s, v in figures.get('samples', {}).items() if j < len(v)]
        parts.append(f'<p><b>Prompt:</b> {esc(ex["prompt"])}</p><div class="row">{"".join(samples)}</div>')
        cards.append(f'<div class="card">{"".join(parts)}</div>')
    meta = report.get('meta', {})
    page = render_template(
        os.path.join(os.path.dirname(__file__), 'mllm_report.html'), title=esc(f'unitok MLLM evaluation: {meta.get("mllm", "model")}'), data=esc(str(meta.get('data', ''))),
        protocol=esc(json.dumps(report.get('protocol', {}))), understanding=understanding, t2i=t2i,
        examples='\n'.join(cards), meta=esc(json.dumps(meta, indent=1)))
    atomic_write(os.path.join(out_dir, 'report.html'), lambda f: f.write(page), mode='w', what='report')
