"""Evaluation of the multimodal LLM (:class:`~unitok.mllm.UniTokMLLM`, ``unitok eval-mllm``) on
held-out items (exported codes and the images they came from).

Understanding: ``llm_zero_shot_top1`` (each class name's answer scored by its summed log-likelihood,
:func:`~unitok.eval.mllm_scoring.answer_log_likelihoods`) beside ``chance`` and ``majority_rate``;
greedy names (``name_exact_match`` / ``name_token_f1``, ``train_name_*`` on training items); the
tokenizer's own zero-shot; controls: every image swapped for another class's item
(``control_swapped_top1``, at or below chance) and uniform random codes (``control_noise_top1``).
Text-to-image at every guidance scale: ``t2i_consistency`` (tokenizer zero-shot category of the
samples, with its shuffled-label control) and the distribution metrics against the held-out images,
beside the floors ``real_vs_real`` and ``reconstruction_vs_real``.

Every model pass runs on fixed chunks of ``chunk_size`` items (chunk ``i`` of the samples seeded
with ``mix_seed(seed, i)``), so no number depends on ``batch_size``. Single process.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..data import eval_transform, has_split, open_source
from ..images import to_uint8_tensor
from ..utils import dataclass_io
from ..utils.seeds import mix_seed
from .features import EXTRACTORS, build_extractor
from .loading import (TRAINING_INFO, MLLMEvalError, code_dataset, labelled_items, open_images, read_training_info,
                      same_dataset)
from .metrics import consistency, distribution_metrics, exact_match, normalize_answer, token_f1, topk_correct
from .mllm_scoring import answer_log_likelihoods, crossing_derangement
from .report import write_mllm_report
from .sampling import chunks, progress_bar
from .subsets import subset_indices

log = logging.getLogger(__name__)

_TEXT_FIELDS = ('question', 'category_question', 'draw')
__all__ = ['MLLMEvalConfig', 'MLLMEvalError', 'evaluate_mllm', 'run_mllm_evaluation', 'answer_log_likelihoods',
           'crossing_derangement', 'exact_match', 'normalize_answer', 'token_f1', 'read_training_info',
           'write_mllm_report', 'TRAINING_INFO']


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
    extractor_weights: str | None = None   # weights of 'inception' / 'dinov2': file, folder or hub id
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


@dataclass
class _Run:
    """What every stage of one MLLM evaluation shares."""
    model: nn.Module
    cfg: MLLMEvalConfig
    items: list[dict]                     # held-out items: codes (K, h, w), label, name, index, key
    classnames: list[str]
    images: object                        # map-style source of the held-out images
    extractor: nn.Module
    zero_shot_weights: torch.Tensor       # (E, C) tokenizer zero-shot classifier
    show: bool

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([it['label'] for it in self.items])

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return chunks(len(self.items), self.cfg.chunk_size)

    def zero_shot(self, u8: torch.Tensor) -> torch.Tensor:
        """Tokenizer zero-shot logits ``(B, C)`` of uint8 images."""
        tok = self.model.image_tokenizer
        emb = tok.encode_image(u8.to(tok.device).float().div(127.5).sub(1))
        return (emb @ self.zero_shot_weights.to(emb.dtype)).cpu()

    def features(self, u8: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.extractor(u8[s:e].to(self.model.device))[0].double().cpu()
                          for s, e in chunks(u8.shape[0], self.cfg.batch_size)])

    def distribution(self, real: torch.Tensor, u8: torch.Tensor) -> dict:
        cfg = self.cfg
        return distribution_metrics(real, self.features(u8), cfg.extractor, pr_k=cfg.pr_k,
                                    kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size, seed=cfg.seed)


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


def _prepare(model, val_codes, cfg: MLLMEvalConfig, images, progress: bool) -> tuple[_Run, object]:
    """The held-out items (a fixed class-balanced subset), their images and the classifiers."""
    extractor = build_extractor(cfg.extractor, cfg.extractor_weights)     # an unknown / missing one fails first
    val = code_dataset(val_codes, cfg.label_set, 'held-out')
    items = labelled_items(val, model, 'held-out')
    picked = subset_indices(len(items), cfg.max_items, [it['label'] for it in items], cfg.seed)
    items = [items[i] for i in picked]
    if len(items) <= cfg.pr_k:
        raise MLLMEvalError(f'{len(items)} held-out items: precision/recall with k={cfg.pr_k} needs more')
    images = images if images is not None else open_images(val, 'held-out')
    if not hasattr(images, 'read'):
        raise MLLMEvalError('the held-out images must be a map-style source (builtin:NAME or a folder)')
    if max(it['index'] for it in items) >= len(images):
        raise MLLMEvalError(f'the held-out codes index images up to {max(it["index"] for it in items)}, the image '
                            f'source has {len(images)}: not the images these codes were exported from')
    classnames = list(val.classnames)
    templates = list(cfg.templates or getattr(images, 'templates', None) or ('a photo of a {}.',))
    weights = model.image_tokenizer.zero_shot_classifier(classnames, templates)
    return _Run(model, cfg, items, classnames, images, extractor.to(model.device), weights, progress), val


def _real_images(run: _Run) -> tuple[torch.Tensor, torch.Tensor, float]:
    """uint8 held-out images and reconstructions of their codes, and the tokenizer's zero-shot top-1."""
    transform = eval_transform(run.model.image_tokenizer.config.image_size)
    real_u8, rec_u8, zs_logits = [], [], []
    for s, e in progress_bar(run.chunks, 'held-out images', len(run.chunks), run.show):
        u8 = to_uint8_tensor(torch.stack([transform(run.images.read(it['index'])[0]) for it in run.items[s:e]]))
        real_u8.append(u8)
        zs_logits.append(run.zero_shot(u8))
        codes = torch.stack([it['codes'] for it in run.items[s:e]])
        rec_u8.append(to_uint8_tensor(run.model.decode_codes(codes.to(run.model.device))).cpu())
    top1 = topk_correct(torch.cat(zs_logits), run.labels, ks=(1,))[1] / len(run.items)
    return torch.cat(real_u8), torch.cat(rec_u8), top1


def _llm_predictions(run: _Run) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The LLM's category of every item's codes, of uniform noise codes and of the swapped partner's codes."""
    cfg, c = run.cfg, run.model.config
    partner = crossing_derangement(run.labels.tolist(), cfg.seed)
    noise = torch.stack([torch.randint(c.codebook_size, (c.num_codebooks, *c.grid), generator=torch.Generator()
                                       .manual_seed(mix_seed(cfg.seed, 1, it['index']))) for it in run.items])
    variants = {'image': torch.stack([it['codes'] for it in run.items]), 'noise': noise}
    predicted = {k: [] for k in variants}
    for s, e in progress_bar(run.chunks, 'LLM classification', len(run.chunks), run.show):
        for k, v in variants.items():
            ll = answer_log_likelihoods(run.model, v[s:e].to(run.model.device), cfg.category_question, run.classnames)
            predicted[k].append(ll.argmax(1))
    predicted = {k: torch.cat(v) for k, v in predicted.items()}
    # The swapped control asks the same question of the partner's codes: the classifier's output on
    # those codes is already known (item j's row), so it is reused rather than computed a second time.
    predicted['swapped'] = predicted['image'][partner]
    return predicted, partner


def _names(run: _Run, subset: list[dict], desc: str) -> tuple[list[str], dict]:
    """Greedy answers to the name question and their exact-match / token-F1 scores."""
    answers = [run.model.chat(it['codes'], run.cfg.question, max_new_tokens=run.cfg.max_new_tokens)
               for it in progress_bar(subset, desc, len(subset), run.show)]
    scores = {'exact_match': sum(exact_match(a, it['name']) for a, it in zip(answers, subset)) / len(subset),
              'token_f1': sum(token_f1(a, it['name']) for a, it in zip(answers, subset)) / len(subset)}
    return answers, scores


def _accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float((predicted == truth).double().mean())


def _understanding(run: _Run, predicted: dict, partner: list[int], tokenizer_top1: float, held_scores: dict) -> dict:
    labels, N, C = run.labels, len(run.items), len(run.classnames)
    return {
        'items': N, 'classes': C, 'classnames': run.classnames, 'chance': 1.0 / C,
        'majority_rate': float(torch.bincount(labels, minlength=C).max()) / N,
        'llm_zero_shot_top1': _accuracy(predicted['image'], labels),
        'tokenizer_zero_shot_top1': tokenizer_top1,
        'name_exact_match': held_scores['exact_match'], 'name_token_f1': held_scores['token_f1'],
        'control_swapped_top1': _accuracy(predicted['swapped'], labels),
        'control_swapped_partner_top1': _accuracy(predicted['swapped'], labels[partner]),
        'control_noise_top1': _accuracy(predicted['noise'], labels),
    }


def _train_names(run: _Run, train_codes) -> dict:
    train_items = labelled_items(code_dataset(train_codes, run.cfg.label_set, 'train'), run.model, 'train')
    chosen = subset_indices(len(train_items), run.cfg.train_items, [it['label'] for it in train_items], run.cfg.seed)
    _, scores = _names(run, [train_items[i] for i in chosen], 'names (train)')
    return {'train_name_exact_match': scores['exact_match'], 'train_name_token_f1': scores['token_f1'],
            'train_name_items': len(chosen)}


def _text_to_image(run: _Run, real_feats: torch.Tensor) -> tuple[list[dict], dict]:
    """The metrics of every guidance scale and the first sample of the first items at each."""
    cfg, n = run.cfg, run.cfg.samples_per_item
    requested = run.labels.repeat_interleave(n)
    sweep, sample_images = [], {}
    for scale in cfg.cfg_scales:
        u8_all, zs_pred = [], []
        for i, (s, e) in enumerate(progress_bar(run.chunks, f'text-to-image cfg {scale:g}', len(run.chunks),
                                                run.show)):
            prompts = [cfg.draw.format(it['name']) for it in run.items[s:e]]
            sample = run.model.generate_image(prompts, n=n, cfg_scale=float(scale), temperature=cfg.temperature,
                                              top_k=cfg.top_k, top_p=cfg.top_p, generator=mix_seed(cfg.seed, i))
            u8 = to_uint8_tensor(run.model.decode_codes(sample)).cpu()                 # (B*n, 3, H, W)
            u8_all.append(u8)
            zs_pred.append(run.zero_shot(u8).argmax(1))
        u8_all = torch.cat(u8_all)
        m = {'cfg_scale': float(scale), 'samples': int(u8_all.shape[0])}
        m['t2i_consistency'], m['t2i_control'] = consistency(torch.cat(zs_pred), requested, cfg.seed)
        m.update(run.distribution(real_feats, u8_all))
        sweep.append(m)
        sample_images[float(scale)] = u8_all[::n][:cfg.examples]
        log.info('cfg %g: %s', scale, ', '.join(f'{k} {v:.4g}' for k, v in m.items() if k != 'cfg_scale'))
    return sweep, sample_images


def _floors(run: _Run, val, real_feats: torch.Tensor, rec_u8: torch.Tensor, train_images) -> dict:
    N = len(run.items)
    floors = {'reconstruction_vs_real': {'samples': N, **run.distribution(real_feats, rec_u8)}}
    if train_images is None:
        spec = val.manifest['data']
        if spec.get('kind') == 'map' and has_split(spec['spec'], 'train') and spec.get('split') != 'train':
            train_images = open_source(spec['spec'], 'train', resampled=False)
    if train_images is not None:
        transform = eval_transform(run.model.image_tokenizer.config.image_size)
        floor_idx = subset_indices(len(train_images), N * run.cfg.samples_per_item,
                                   getattr(train_images, 'labels', None), run.cfg.seed)
        u8 = torch.cat([to_uint8_tensor(torch.stack([transform(train_images.read(i)[0]) for i in floor_idx[s:e]]))
                        for s, e in chunks(len(floor_idx), run.cfg.batch_size)])
        floors['real_vs_real'] = {'samples': len(floor_idx), **run.distribution(real_feats, u8)}
    return floors


def _examples(run: _Run, answers: list[str], predicted: dict) -> list[dict]:
    cfg = run.cfg
    return [{'key': it['key'], 'question': cfg.question, 'answer': answers[j], 'truth': it['name'],
             'category_question': cfg.category_question,
             'category_answer': run.model.chat(it['codes'], cfg.category_question, max_new_tokens=cfg.max_new_tokens),
             'category_truth': run.classnames[it['label']],
             'category_predicted': run.classnames[int(predicted['image'][j])],
             'prompt': cfg.draw.format(it['name'])} for j, it in enumerate(run.items[:cfg.examples])]


def _evaluate(model, val_codes, cfg, images, train_codes, train_images, progress) -> tuple[dict, dict]:
    start = time.time()
    cfg = (cfg or MLLMEvalConfig()).resolved()            # validated; unset questions: the training defaults
    run, val = _prepare(model, val_codes, cfg, images, progress)
    real_u8, rec_u8, tokenizer_top1 = _real_images(run)
    predicted, partner = _llm_predictions(run)
    answers, held_scores = _names(run, run.items, 'names (held-out)')
    report = _understanding(run, predicted, partner, tokenizer_top1, held_scores)
    if train_codes is not None:
        report.update(_train_names(run, train_codes))
    real_feats = run.features(real_u8)
    sweep, sample_images = _text_to_image(run, real_feats)
    floors = _floors(run, val, real_feats, rec_u8, train_images)
    report.update(t2i=sweep, floors=floors, examples=_examples(run, answers, predicted),
                  protocol={**asdict(cfg), 'val_codes': val.directory, 'processes': 1, 'device': str(model.device)},
                  seconds=time.time() - start)
    return report, {'real': real_u8[:cfg.examples], 'samples': sample_images}


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
        from ..codes import ExportConfig, export_codes
        codes_val = os.path.join(out, 'codes-val')
        export_codes(tok, ExportConfig(data=data, split='val'), codes_val, progress=progress)
    val = code_dataset(codes_val, cfg.label_set, 'held-out')
    got = val.manifest['data']
    if not same_dataset(got['spec'], data) or got['split'] != 'val':
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
