"""``unitok demo-mllm``: the multimodal LLM end to end on two CPU cores, on the built-in emoji.

1. a small UniTok tokenizer (``unitok-tiny`` at 64 px, 8 x 512 codes: a 4 x 4 grid), trained in
   ``OUT/tokenizer`` unless ``--tokenizer`` names one;
2. the train and held-out emoji exported as codes with their captions (``OUT/codes/{train,val}``);
3. stage 1 of the MLLM on SmolLM2-135M-Instruct (the LLM frozen; the connector, the image-token
   embeddings and the depth head trained) on three questions per emoji: its name, its category, and
   drawing it from its name (``OUT/mllm``; the model in ``OUT/model``);
4. the held-out evaluation (:func:`unitok.eval.mllm.evaluate_mllm`: category accuracy against chance
   and the swapped / noise image controls, name exact match, text-to-image consistency and Frechet
   distance with floors), ``OUT/demo_summary.json`` and the page ``OUT/index.html``.

Every stage resumes: a rerun of the same command reuses the finished stages and continues an
interrupted training from its last checkpoint (the command exits with 143 when interrupted).
"""
from __future__ import annotations

import html
import json
import os
import resource
import shutil
import time

import torch

from ..config import ConfigError
from ..data import open_source
from ..eval.mllm import MLLMEvalConfig, evaluate_mllm
from ..eval.report import format_value, png_data_uri, render_template
from ..generation import CodeDataset, ExportConfig, export_codes
from ..images import to_pil
from ..mllm import UniTokMLLM
from ..model import UniTok
from ..precision import bf16_runs_in_hardware
from ..pretrained import is_hub_id
from ..train import TrainConfig, fit_to_end
from ..train.tasks.mllm import MLLMTrainConfig, item_name
from ..utils.io import atomic_write, check_writable_dir, staged_directory
from .args import add_command

DATA = 'builtin:emoji'
TOKENIZER_SIZE = 64
# The recipe of benchmarks/ablation_multicodebook.py at K = 8 (reconstruction + CLIP, no GAN/LPIPS).
TOKENIZER_OVERRIDES = [f'model.image_size={TOKENIZER_SIZE}', 'model.num_codebooks=8', 'model.codebook_size=512',
                       'model.code_dim=4', 'loss.perceptual=none', 'loss.discriminator=none', 'optim.lr=1e-3',
                       'optim.warmup=0.02', 'data.batch_size=32', 'data.num_workers=1', 'image_every=0']
TOKENIZER_STEPS = 500
MLLM_STEPS = 300
MLLM_BATCH = 8                # emoji per step, three sequences each (name, category, drawing)
MLLM_LR = 2e-3
EVAL_ITEMS = 144              # held-out emoji evaluated (class-balanced: 16 per category)
PAGE_IMAGES = 8
PAGE_PROMPTS = 6
PAGE_CFG = 2.0
STAGES_FILE = 'stages.json'
TEMPLATE = 'demo_mllm.html'


class DemoError(ValueError):
    """A bad argument of ``unitok demo-mllm`` (the message says what to pass instead)."""


def _peak_rss_mib() -> float:
    """Peak resident memory of this process and of its finished children (loader workers), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024                                   # Linux: KiB


class _Stages:
    """``OUT/stages.json``: per stage the seconds it took (summed over interrupted runs), whether it is
    finished, and the peak memory so far; a rerun reads it to reuse the finished stages."""

    def __init__(self, out: str):
        self.path = os.path.join(out, STAGES_FILE)
        self.records = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.records = json.load(f)
        self.reused: list[str] = []

    def done(self, name: str) -> bool:
        return bool(self.records.get(name, {}).get('finished'))

    def record(self, name: str, seconds: float, finished: bool, **extra) -> None:
        old = self.records.get(name, {})
        self.records[name] = {**old, **extra, 'seconds': old.get('seconds', 0.0) + seconds, 'finished': finished,
                              'runs': old.get('runs', 0) + 1,
                              'peak_rss_mib': max(old.get('peak_rss_mib', 0.0), _peak_rss_mib())}
        atomic_write(self.path, lambda f: json.dump(self.records, f, indent=2), mode='w', what='demo stages')


def _fit(cfg, label: str) -> dict:
    """Train ``cfg``'s run to its end, continuing from its last checkpoint; the trainer's summary."""
    return fit_to_end(cfg, lambda resuming: print(
        f'[demo-mllm] {label}: {cfg.steps} steps ({cfg.precision}, {torch.get_num_threads()} threads)'
        f'{", resuming" if resuming else ""} -> {cfg.out}', flush=True))


def _trained(stages: _Stages, name: str, cfg, label: str) -> bool:
    """Run stage ``name`` (a training run of ``cfg``) unless it finished before with as many steps."""
    if stages.done(name) and stages.records[name].get('steps') == cfg.steps and \
            os.path.isfile(os.path.join(cfg.out, 'model', 'config.json' if name == 'tokenizer' else 'mllm.json')):
        print(f'[demo-mllm] {label}: reusing the finished run in {cfg.out}', flush=True)
        stages.reused.append(name)
        return True
    t = time.time()
    summary = _fit(cfg, label)
    finished = summary['exit'] == 'finished'
    stages.record(name, time.time() - t, finished, steps=cfg.steps if finished else summary['step'],
                  sec_per_step=(time.time() - t) / max(1, summary['step']))
    return finished


def _tokenizer_config(out: str, args, precision: str):
    steps = args.tokenizer_steps
    cfg = TrainConfig(preset='unitok-tiny', out=os.path.join(out, 'tokenizer'), steps=steps, precision=precision,
                      eval_every=steps, ckpt_every=max(1, steps // 4), log_every=max(1, steps // 10),
                      seed=args.seed)
    return cfg.override(TOKENIZER_OVERRIDES + [f'data.train={DATA}'])


def _mllm_config(out: str, tokenizer: str, args, precision: str):
    steps = args.steps
    cfg = MLLMTrainConfig(tokenizer=tokenizer, llm=args.llm, out=os.path.join(out, 'mllm'), steps=steps,
                          precision=precision, eval_every=steps, image_every=0, ckpt_every=max(1, steps // 6),
                          log_every=max(1, steps // 12), seed=args.seed)
    return cfg.override([f'data.train={os.path.join(out, "codes", "train")}',
                         f'data.val={os.path.join(out, "codes", "val")}', f'data.batch_size={args.batch_size}',
                         f'optim.lr={args.lr}'])


def _export(stages: _Stages, out: str, tokenizer_dir: str, precision: str, limit: int | None) -> None:
    tok = UniTok.from_pretrained(tokenizer_dir).eval()
    for split in ('train', 'val'):
        t = time.time()
        result = export_codes(tok, ExportConfig(data=DATA, split=split, precision=precision, batch_size=64,
                                                   limit=limit),
                              os.path.join(out, 'codes', split))
        if result.images:
            stages.record(f'codes_{split}', time.time() - t, True, images=result.images)
        else:
            stages.reused.append(f'codes_{split}')
        print(f'[demo-mllm] 2/4 codes ({split}): {result.manifest["num_items"]} emoji '
              f'({result.images} encoded now) -> {os.path.join(out, "codes", split)}', flush=True)


def _copy_model(src: str, dst: str) -> None:
    """``dst`` := a copy of the model directory ``src``, replaced all at once."""
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    with staged_directory(dst, 'MLLM model directory') as staging:
        for name in os.listdir(src):
            shutil.copy2(os.path.join(src, name), os.path.join(staging, name))


# ---------------------------------------------------------------------- the page
def _examples(model, out: str) -> tuple[list[dict], list[dict]]:
    """~8 held-out emoji with the model's answers, and ~6 held-out names drawn by the model."""
    with open(os.path.join(out, 'model', 'training.json')) as f:
        training = json.load(f)
    val = CodeDataset(os.path.join(out, 'codes', 'val'), view=0, label=training.get('category_set') or None)
    classnames = training.get('classnames') or val.classnames or []
    source = open_source(DATA, 'val')
    by_key = {source.key(i): i for i in range(len(source))}
    step = max(1, len(val) // PAGE_IMAGES)
    answers = []
    for i in list(range(0, len(val), step))[:PAGE_IMAGES]:
        item = val[i]
        row = {'image': source.read(by_key[val.key(i)])[0], 'name_truth': item_name(val.captions(i)),
               'question': training['question'],
               'answer': model.chat(item['codes'], training['question'], max_new_tokens=16)}
        if training.get('category_question'):
            row.update(category_question=training['category_question'],
                       category_answer=model.chat(item['codes'], training['category_question'], max_new_tokens=16),
                       category_truth=classnames[item['label']] if 0 <= item['label'] < len(classnames) else '')
        answers.append(row)
    drawings = []
    picks = list(range(step // 2, len(val), max(1, len(val) // PAGE_PROMPTS)))[:PAGE_PROMPTS]
    prompts = [training['draw'].format(item_name(val.captions(i))) for i in picks]
    with torch.no_grad():
        codes = model.generate_image(prompts, n=2, cfg_scale=PAGE_CFG, generator=0)
        images = to_pil(model.decode_codes(codes))
    for j, (i, prompt) in enumerate(zip(picks, prompts)):
        drawings.append({'prompt': prompt, 'images': images[2 * j:2 * j + 2],
                         'truth': source.read(by_key[val.key(i)])[0]})
    return answers, drawings


METRIC_ROWS = (   # (report key, what it is)
    ('llm_zero_shot_top1', 'LLM category accuracy (the answer to the category question, held-out emoji)'),
    ('chance', 'chance (1 / number of categories)'),
    ('majority_rate', 'always answering the most frequent category'),
    ('control_swapped_top1', 'control: the same question about another emoji\'s image (true category of this one)'),
    ('control_swapped_partner_top1', 'control, swapped: agreement with the swapped-in image\'s category'),
    ('control_noise_top1', 'control: random codes instead of the image'),
    ('tokenizer_zero_shot_top1', 'the tokenizer\'s own CLIP zero-shot over the same categories'),
    ('name_exact_match', 'name question: exact match (held-out names never appear in training)'),
    ('name_token_f1', 'name question: token F1'),
    ('train_name_exact_match', 'name question on training emoji: exact match'),
    ('train_name_token_f1', 'name question on training emoji: token F1'),
)


def _metric_rows(report: dict) -> list[tuple[str, str, object]]:
    rows = [(k, what, report[k]) for k, what in METRIC_ROWS if k in report]
    for t in report.get('t2i', []):
        s = t.get('cfg_scale')
        for k, v in t.items():
            if k not in ('cfg_scale',) and isinstance(v, (int, float)):
                rows.append((f't2i[cfg {s:g}].{k}', 'text-to-image' + (
                    ': category of the drawing = the prompt\'s' if k == 't2i_consistency' else
                    ': the same with shuffled prompts (chance level)' if k == 't2i_control' else ''), v))
    for floor, values in report.get('floors', {}).items():
        for k, v in values.items():
            if isinstance(v, (int, float)):
                rows.append((f'floors.{floor}.{k}', 'floor of the distribution metrics', v))
    return rows


def _render(out: str, summary: dict, report: dict, answers: list[dict], drawings: list[dict]) -> None:
    def img(im, cls='emoji'):
        return f'<img class="{cls}" src="{png_data_uri(im)}" alt="">'
    e = html.escape
    answer_rows = ''.join(
        f'<tr><td>{img(a["image"])}</td><td class="key"><b>{e(a["question"])}</b><br>{e(a["answer"])}'
        f'<br><span class="hint">true: {e(a["name_truth"])}</span></td>'
        + (f'<td class="key"><b>{e(a["category_question"])}</b><br>{e(a["category_answer"])}<br>'
           f'<span class="hint">true: {e(a["category_truth"])}</span></td>' if 'category_question' in a else '')
        + '</tr>' for a in answers)
    drawing_rows = ''.join(
        f'<tr><td class="key">{e(d["prompt"])}</td><td>{"".join(img(im) for im in d["images"])}</td>'
        f'<td>{img(d["truth"])}</td></tr>' for d in drawings)
    metric_rows = ''.join(f'<tr><td class="key"><code>{e(k)}</code></td><td class="key">{e(what)}</td>'
                          f'<td>{format_value(v)}</td></tr>' for k, what, v in _metric_rows(report))
    stage_rows = ''.join(f'<tr><td class="key">{e(k)}</td><td>{v["seconds"] / 60:.1f}</td><td>{v["peak_rss_mib"]:.0f}'
                         f'</td></tr>' for k, v in summary['stages'].items())
    page = render_template(
        os.path.join(os.path.dirname(__file__), TEMPLATE), title='UniTok MLLM demo', llm=e(summary['llm']),
        steps=summary['mllm_steps'], minutes=f'{summary["total_minutes"]:.1f}', rss=f'{summary["peak_rss_mib"]:.0f}',
        answers=answer_rows, drawings=drawing_rows, metrics=metric_rows, stages=stage_rows, cfg=f'{PAGE_CFG:g}',
        protocol=e(json.dumps(report.get('protocol', {}), default=str)))
    atomic_write(os.path.join(out, 'index.html'), lambda f: f.write(page), mode='w', what='demo page')


# ---------------------------------------------------------------------- the command
def _check_arguments(args, out: str, precision: str) -> None:
    """Every setting of the later stages checked before the first one runs (the LLM found without
    loading it; the MLLM run's configuration validated), so that a typo is not found after an export."""
    from ..mllm.llm import TINY_LLM, resolve_llm
    if args.llm != TINY_LLM:
        resolve_llm(args.llm)
    try:
        _mllm_config(out, args.tokenizer or os.path.join(out, 'tokenizer', 'model'), args, precision).validate()
    except ConfigError as e:
        raise DemoError(f'{e} (from --lr, --steps or --batch-size)') from None


def run(args) -> int:
    for name in ('steps', 'batch_size', 'tokenizer_steps', 'eval_items', 'limit'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise DemoError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    local = args.tokenizer and os.path.exists(args.tokenizer)
    if args.tokenizer and not (os.path.isfile(os.path.join(args.tokenizer, 'config.json')) or
                               (os.path.isfile(args.tokenizer) if local else is_hub_id(args.tokenizer))):
        raise DemoError(f'--tokenizer {args.tokenizer!r} is not a UniTok model directory (no config.json), an official '
                        '.pth or a hub id; pass e.g. demo_output/train/model of `unitok demo`, or leave it out to '
                        'train one')
    out = os.path.abspath(args.out)
    precision = 'bf16' if (bf16_runs_in_hardware('cpu') or torch.cuda.is_available()) and not args.fp32 else 'fp32'
    _check_arguments(args, out, precision)
    check_writable_dir(out, 'demo directory')
    os.makedirs(out, exist_ok=True)
    stages = _Stages(out)
    t0 = time.time()

    if args.tokenizer:
        tokenizer_dir = os.path.abspath(args.tokenizer) if local else args.tokenizer      # else a hub id
        print(f'[demo-mllm] 1/4 tokenizer: {tokenizer_dir}', flush=True)
    else:
        cfg = _tokenizer_config(out, args, precision)
        if not _trained(stages, 'tokenizer', cfg, f'1/4 training the tokenizer unitok-tiny at {TOKENIZER_SIZE} px'):
            print('[demo-mllm] interrupted; run the same command again to continue')
            return 143
        tokenizer_dir = os.path.join(cfg.out, 'model')

    _export(stages, out, tokenizer_dir, precision, args.limit)

    cfg = _mllm_config(out, tokenizer_dir, args, precision)
    if not _trained(stages, 'mllm', cfg, f'3/4 training the MLLM (stage 1, {args.llm} frozen)'):
        print('[demo-mllm] interrupted; run the same command again to continue')
        return 143
    model_dir = os.path.join(out, 'model')
    if 'mllm' not in stages.reused or not os.path.isfile(os.path.join(model_dir, 'mllm.json')):
        _copy_model(os.path.join(cfg.out, 'model'), model_dir)

    print(f'[demo-mllm] 4/4 evaluating on {args.eval_items} held-out emoji and writing the page', flush=True)
    t = time.time()
    model = UniTokMLLM.from_pretrained(model_dir).eval()
    report = evaluate_mllm(model, os.path.join(out, 'codes', 'val'), MLLMEvalConfig(max_items=args.eval_items),
                           train_codes=os.path.join(out, 'codes', 'train'))
    atomic_write(os.path.join(out, 'eval_report.json'), lambda f: json.dump(report, f, indent=2, default=str),
                 mode='w', what='evaluation report')
    answers, drawings = _examples(model, out)
    stages.record('evaluate', time.time() - t, True, items=report.get('items'))

    records = stages.records
    scalars = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary = {'llm': args.llm, 'precision': precision, 'threads': torch.get_num_threads(),
               'tokenizer': tokenizer_dir, 'tokenizer_steps': records.get('tokenizer', {}).get('steps'),
               'mllm_steps': args.steps, 'batch_size': args.batch_size, 'lr': args.lr,
               'stages': records, 'reused': stages.reused,
               'total_minutes': sum(r['seconds'] for r in records.values()) / 60,
               'this_run_minutes': (time.time() - t0) / 60,
               'peak_rss_mib': max(r['peak_rss_mib'] for r in records.values()),
               **scalars, 't2i': report.get('t2i', []), 'floors': report.get('floors', {})}
    _render(out, summary, report, answers, drawings)
    atomic_write(os.path.join(out, 'demo_summary.json'), lambda f: json.dump(summary, f, indent=2), mode='w',
                 what='demo summary')
    shown = [k for k, _ in METRIC_ROWS if k in summary]
    print(f'[demo-mllm] done: {summary["total_minutes"]:.1f} min in all (this run {summary["this_run_minutes"]:.1f}),'
          f' peak memory {summary["peak_rss_mib"]:.0f} MiB')
    print('[demo-mllm] held-out: ' + ', '.join(f'{k} {summary[k]:.3g}' for k in shown))
    for t2i in summary['t2i']:
        print('[demo-mllm] text-to-image: ' + ', '.join(f'{k} {v:.3g}' for k, v in t2i.items()
                                                        if isinstance(v, (int, float))))
    print(f'[demo-mllm] page:  {os.path.join(out, "index.html")}')
    print(f'[demo-mllm] model: {model_dir}  (unitok chat --mllm {model_dir} --image x.png "What is this emoji?")')
    return 0


def register(sub) -> None:
    p = add_command(sub, 'demo-mllm', 'train and show the multimodal LLM on the built-in emoji (CPU, ~20 min)', __doc__)
    p.add_argument('--out', default='demo_mllm')
    p.add_argument('--tokenizer', help='a UniTok model directory, official .pth or hub id (default: train one in '
                                       'OUT/tokenizer)')
    p.add_argument('--llm', default='smollm2', help="the LLM: 'smollm2' (default), a model directory or hub id")
    p.add_argument('--steps', type=int, default=MLLM_STEPS, help='MLLM training steps')
    p.add_argument('--batch-size', type=int, default=MLLM_BATCH, help='emoji per MLLM training step')
    p.add_argument('--lr', type=float, default=MLLM_LR)
    p.add_argument('--tokenizer-steps', type=int, default=TOKENIZER_STEPS)
    p.add_argument('--eval-items', type=int, default=EVAL_ITEMS, help='held-out emoji evaluated (class-balanced)')
    p.add_argument('--limit', type=int, help='only the first N emoji of each split (a quick try of the pipeline)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--fp32', action='store_true', help='train in float32 even where bf16 is native')
    p.set_defaults(fn=run)
