"""Training the multimodal LLM (:class:`~unitok.mllm.UniTokMLLM`) as a task of the one loop.

Data: codes exported by ``unitok export-codes`` with their captions (:class:`CodeDataset`). Every
item gives up to three sequences of the same batch: understanding (``question`` -> the item's name, and
``category_question`` -> the item's class name in the export's label set ``category_set``, text
cross-entropy; the held-out emoji have names never seen in training, their categories are the ones
the evaluation classifies) and text-to-image (``draw`` with the name -> the item's codes, the depth head's
cross-entropy; the prompt replaced by the null prompt with probability ``prompt_dropout``, for
classifier-free guidance). The view of each item and the dropout are drawn from the per-sample
seeded RNG, so a resumed run sees exactly what the uninterrupted one saw.

Stage 1 trains the connector, the image-token embeddings and the depth head with the LLM frozen;
stage 2 adds LoRA adapters to the LLM (``lora_rank``), usually from a stage-1 model (``init``).

``init`` may also be the released MLLM (``FoundationVision/unitok_mllm``, or a folder in its layout, e.g. an
earlier fine-tune): it is detected by its ``config.json`` and fine-tuned as an
:class:`~unitok.mllm.official.OfficialMLLM` through the same loop, with the official prompt layouts. Its LM
(``llm`` is then unused) is loaded in the run's precision (float32 for ``fp32``, else bfloat16 / float16: a
7B LM), the trained parts (the embedder's projections, the head, LoRA adapters) in float32; stage 1 trains the
embedder's projections and the head, stage 2 adds LoRA adapters; the codes must be of the released code space
(K, codebook size, grid), and a tokenizer whose codebooks differ from the MLLM's copy is warned about. The
model is exported in the official layout with the adapters merged into the LM's weights.

``loss``: ``'ours'`` (default; an image position weighs like one text token) or ``'official'`` (every
sub-code a token, plus the z-loss of weight 5e-5 on the head's logits, as the released MLLM was trained);
see :mod:`unitok.mllm.loss_terms`.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...checkpoint import CheckpointError
from ...config import ConfigError
from ...data import TrainStream
from ...codes import CodeDataset
from ...mllm.loss_terms import LOSSES, target_count
from ..adapters import CodesSource, Objective
from ..config import BaseOptimConfig, CodesDataConfig, CodesRunConfig
from ..task import Phase, Task

log = logging.getLogger('unitok.train')
TASKS = ('understand', 'generate')


@dataclass
class MLLMDataConfig(CodesDataConfig):
    batch_size: int = 8                  # items per rank and micro-step (each gives one sequence per task)
    max_text: int = 96                   # text tokens per sequence besides the image (longer items are skipped)


def _mllm_optim() -> BaseOptimConfig:
    return BaseOptimConfig(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, warmup=0.05, end_ratio=0.1,
                           grad_clip=1.0, ema=0.0)


@dataclass
class MLLMTrainConfig(CodesRunConfig):
    """Training a :class:`~unitok.mllm.UniTokMLLM` (the :class:`MLLMTask`)."""
    codes_needed: ClassVar[str] = 'exported codes with captions'
    tokenizer: str = ''                  # the UniTok model dir that exported the codes (required)
    llm: str = 'smollm2'                 # LLM spec (see unitok.mllm.llm)
    init: str | None = None              # start from this MLLM directory (e.g. stage 2 from stage 1), or the
                                         # released MLLM (FoundationVision/unitok_mllm, or a folder of its layout)
    loss: str = 'ours'                   # 'ours' | 'official' (every sub-code a token, plus z-loss 5e-5)
    stage: int = 1                       # 1: LLM frozen; 2: plus LoRA adapters (lora_rank)
    lora_rank: int = 8
    model: dict = field(default_factory=dict)   # MLLMConfig overrides (head_width, projector_hidden, ...)
    tasks: tuple[str, ...] = TASKS
    question: str = 'What is this emoji?'
    category_question: str = 'Which category is this emoji in?'   # answered with the class name; '' disables
    category_set: str = ''               # the export's label set of that class name ('' = its first one)
    draw: str = 'Draw an emoji of {}.'
    prompt_dropout: float = 0.1
    sample_prompts: int = 4              # prompts in the sample grid written every image_every steps
    sample_cfg: float = 2.0
    out: str = 'runs/mllm'
    precision: str = 'bf16'
    eval_batches: int = 4
    data: MLLMDataConfig = field(default_factory=MLLMDataConfig)
    optim: BaseOptimConfig = field(default_factory=_mllm_optim)

    def validate(self) -> None:
        super().validate()
        if not self.tokenizer:
            raise ConfigError('tokenizer (--tokenizer): the UniTok model that exported the codes is required')
        if self.stage not in (1, 2):
            raise ConfigError(f'stage must be 1 (LLM frozen) or 2 (LoRA adapters), got {self.stage}')
        if self.stage == 2 and self.lora_rank < 1:
            raise ConfigError(f'stage 2 needs lora_rank >= 1, got {self.lora_rank}')
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ConfigError(f'tasks must be a non-empty subset of {TASKS}, got {list(self.tasks)}')
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f'prompt_dropout must be in [0, 1), got {self.prompt_dropout}')
        if self.loss not in LOSSES:
            raise ConfigError(f'loss must be one of {LOSSES}, got {self.loss!r}')
        if self.draw.count('{}') != 1:
            raise ConfigError(f'draw must contain exactly one {{}} (where the name goes), got {self.draw!r}')

    def make_task(self) -> 'MLLMTask':
        return MLLMTask(self)


_NAME = re.compile(r'^an emoji of (.+?)(?: \(.*\))?\.?$')


def item_name(captions: list[str]) -> str:
    """The name of an item from its captions: ``'an emoji of NAME (sub, category)'`` -> ``NAME``;
    otherwise the first caption."""
    if not captions:
        return ''
    m = _NAME.match(captions[0])
    return m.group(1) if m else captions[0]


def check_captions(dataset, sample: int = 256) -> None:
    """Refuse codes without captions to learn from: every one of ``sample`` evenly spread items without a
    caption, or captioned with its own file name (a folder exported without ``captions.jsonl``)."""
    n = len(dataset)
    picks = sorted({round(i * (n - 1) / max(1, sample - 1)) for i in range(min(n, sample))})

    def made_up(i: int) -> bool:
        stem = os.path.splitext(os.path.basename(dataset.key(i)))[0].replace('_', ' ').replace('-', ' ')
        return all(c == stem for c in dataset.captions(i))          # no caption at all: True too
    if picks and all(made_up(i) for i in picks):
        raise ConfigError(f'the codes in {dataset.directory!r} have no captions (each item\'s caption is empty or '
                          'its file name, as for a folder without captions.jsonl): train-mllm learns from captions; '
                          'export images with a captions.jsonl (file, caption) beside them')


def _item_with_captions(dataset, i: int) -> tuple:
    """``(codes (A, K, h, w), captions, label)`` of item ``i`` (view 'all', the label of the chosen set)."""
    item = dataset[i]
    return item['codes'], dataset.captions(i), item['label']


def released_folder(init: str | None) -> str | None:
    """The local folder of ``init`` when it names the released MLLM's layout (a folder, or a hub id fetched by
    huggingface_hub, offline from its cache), else None."""
    if not init:
        return None
    from ...mllm.official_layout import resolve_official
    return resolve_official(os.fspath(init))


def load_released(folder: str, cfg: MLLMTrainConfig, tokenizer):
    """The released MLLM of ``folder`` ready to train (see the module docstring): checked against the
    tokenizer's code space, the LM in the run's precision on the CPU (the trainer places it), the trained
    parts in float32, LoRA adapters added for stage 2."""
    from ...mllm.official import OfficialMLLM, code_space_of
    extra = sorted(set(cfg.model) - {'lora_alpha', 'lora_targets'})
    if extra:
        raise ConfigError(f'model.{extra[0]}: the released MLLM\'s architecture is its checkpoint\'s; only '
                          'model.lora_alpha and model.lora_targets apply to it')
    tc = tokenizer.config
    ours, theirs = code_space_of(folder), (tc.num_codebooks, tc.codebook_size, (tc.grid_size, tc.grid_size))
    if ours != theirs:
        raise ConfigError(f'the released MLLM reads codes of {ours[0]} x {ours[1]} codes on a {ours[2][0]}x'
                          f'{ours[2][1]} grid; the tokenizer {cfg.tokenizer!r} makes {theirs[0]} x {theirs[1]} on '
                          f'{theirs[2][0]}x{theirs[2][1]}: export the codes with the released tokenizer\'s code space')
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[cfg.precision]
    model = OfficialMLLM.load(folder, dtype=dtype, device_map=None)
    model.set_image_tokenizer(tokenizer)             # warns when its codebooks differ from the MLLM's copy
    model.embedder.float()
    model.head.float()
    for k, v in cfg.model.items():
        setattr(model.config, k, tuple(v) if k == 'lora_targets' else v)
    if cfg.stage == 2:
        model.config.lora_rank = cfg.lora_rank
        model.add_lora()
    model.freeze_llm()
    return model


class MLLMTask(Task):
    name = 'mllm'
    progress_keys = ('loss', 'text_loss', 'image_loss', 'lr')

    def __init__(self, cfg: MLLMTrainConfig, llm=None):
        """``llm``: an optional ``(model, tokenizer)`` pair used instead of loading ``cfg.llm``."""
        from ...mllm.model import UniTokMLLM
        from ...model import UniTok
        self.cfg = cfg
        label_set = cfg.category_set or None
        self.train_codes = CodeDataset(cfg.data.train, view='all', label=label_set)
        self.val_codes = CodeDataset(cfg.data.val, view=0, label=label_set) if cfg.data.val else None
        check_captions(self.train_codes)
        self.classnames = list(self.train_codes.classnames or [])
        if cfg.category_question and not self.classnames:
            raise ConfigError(f'category_question needs class labels, and the codes in {cfg.data.train!r} have no '
                              "label set: export labelled data, or pass category_question=''")
        tokenizer = UniTok.from_pretrained(cfg.tokenizer).eval().requires_grad_(False)
        self.train_codes.check_tokenizer(tokenizer)
        if self.val_codes is not None:
            self.val_codes.check_tokenizer(tokenizer)
        overrides = dict(cfg.model)
        if cfg.stage == 2:
            overrides['lora_rank'] = cfg.lora_rank
        released = released_folder(cfg.init)
        if released:
            self.model = load_released(released, cfg, tokenizer)
        elif cfg.init:
            self.model = UniTokMLLM.from_pretrained(cfg.init, llm=llm or cfg.llm, tokenizer=tokenizer)
            if cfg.stage == 2 and not self.model.config.lora_rank:
                self.model.config.lora_rank = cfg.lora_rank
                self.model.add_lora()
        else:
            self.model = UniTokMLLM.build(tokenizer, llm or cfg.llm, **overrides)
            self.model.config.tokenizer_ref['path'] = os.path.abspath(cfg.tokenizer)
        self.model.freeze_llm()
        if 'generate' not in cfg.tasks:
            self.model.head.requires_grad_(False)
        self.seq_len = self.model.config.num_positions + cfg.data.max_text

    def setup(self, strategy) -> None:
        oc = self.cfg.optim
        self.strategy = strategy
        self.model.image_tokenizer.to(strategy.device)
        self.wrapped = strategy.wrap(Objective(self.model), owner=self.model)
        self.warmup_steps = round(oc.warmup * self.cfg.steps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': oc.weight_decay},
                                       {'params': rest, 'weight_decay': 0.0}], lr=oc.lr, betas=oc.betas, eps=oc.eps)
        self._phases = [Phase('model', self.model, optimizer, self.lr)]

    # ------------------------------------------------------------------ data
    def examples(self, codes: torch.Tensor, captions: list[str], drop_prompt: bool = False,
                 label: int = -1) -> list[dict]:
        """The sequences of one item (codes ``(K, h, w)``, ``label`` in the category label set, -1:
        none): the name question, the category question (without a target when unlabelled), the
        text-to-image sequence, as the run's tasks and ``category_question`` ask."""
        name = item_name(captions)
        out = []
        if 'understand' in self.cfg.tasks:
            out.append(self.model.understanding_example(codes, self.cfg.question, name))
            if self.cfg.category_question:
                answer = self.classnames[label] if 0 <= label < len(self.classnames) else None
                out.append(self.model.understanding_example(codes, self.cfg.category_question, answer))
        if 'generate' in self.cfg.tasks:
            out.append(self.model.generation_example(codes, None if drop_prompt else self.cfg.draw.format(name)))
        return out

    def _padded(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        from ...mllm.data import collate
        if any(len(e['input_ids']) > self.seq_len for e in examples):
            raise ValueError(f'a sequence of {max(len(e["input_ids"]) for e in examples)} tokens exceeds '
                             f'{self.seq_len} (the image plus data.max_text={self.cfg.data.max_text})')
        return collate(examples, length=self.seq_len)               # (S, seq_len) each

    def train_stream(self, rank, world_size, num_workers, start_positions, worker_offset):
        def prepare(item):
            codes, captions, label = item
            view = int(torch.randint(codes.shape[0], ())) if codes.shape[0] > 1 else 0   # seeded per sample
            drop = bool(torch.rand(()) < self.cfg.prompt_dropout)
            return self._padded(self.examples(codes[view], captions, drop, label))
        return TrainStream(CodesSource(self.train_codes, _item_with_captions), prepare=prepare, seed=self.cfg.seed,
                           rank=rank, world_size=world_size, num_workers=num_workers, start_positions=start_positions,
                           worker_offset=worker_offset)

    @staticmethod
    def _flatten(batch: dict) -> dict:
        """``(B, S, T)`` sequences of the stream -> ``(B*S, T')``, cut to the longest real sequence."""
        keys = ('input_ids', 'attention_mask', 'image_mask', 'codes', 'labels', 'image_targets')
        flat = {k: batch[k].flatten(0, 1) for k in keys}
        T = int(flat['attention_mask'].sum(1).max())
        return {k: v[:, :T] for k, v in flat.items()}

    def loss(self, phase, batch, step):
        batch = self._flatten(batch)
        denominator = None
        if self.strategy.world_size > 1:
            # Every target weighs the same on every rank: the global count, divided by the world size
            # because DDP averages the gradients (one small all-reduce per micro-batch).
            n = target_count(batch, self.model.config.num_codebooks, self.cfg.loss).float()
            denominator = (self.strategy.all_reduce(n.reshape(1)) / self.strategy.world_size).clamp_min(1)[0]
        return self.wrapped(batch, denominator, self.cfg.loss)

    # ------------------------------------------------------------------ validation, images, export
    @torch.no_grad()
    def validate(self, strategy) -> dict[str, float]:
        """Held-out text loss (answers) and image loss (codes given the prompt) on the first
        ``eval_batches * batch_size`` items (view 0, no prompt dropout)."""
        if self.val_codes is None:
            return {}
        from ...eval.metrics.nll import weighted_means, weighted_sums
        from ...mllm.data import collate
        bs = self.cfg.data.batch_size
        n = min(len(self.val_codes), self.cfg.eval_batches * bs)
        mine = list(range(strategy.rank, n, strategy.world_size))
        sums = torch.zeros(5, dtype=torch.float64, device=strategy.device)   # text sum, count, image sum, count, items
        for s in range(0, len(mine), bs):
            examples = []
            for i in mine[s:s + bs]:
                item = self.val_codes[i]
                examples += self.examples(item['codes'], self.val_codes.captions(i), label=item['label'])
            batch = self.to_device(collate(examples), strategy.device)
            _, m = self.model(batch, None, self.cfg.loss)
            nt = float((batch['labels'] != -100).sum())
            ni = float(batch['image_targets'][:, :-1].sum())
            sums += torch.cat([weighted_sums([float(m['text_loss'])], nt), weighted_sums([float(m['image_loss'])], ni),
                               torch.tensor([len(mine[s:s + bs])], dtype=torch.float64)]).to(strategy.device)
        strategy.all_reduce(sums)
        out = {'samples': float(sums[4])}
        for name, at in (('text_loss', 0), ('image_loss', 2)):
            if sums[at + 1] > 0:
                out.update(weighted_means(sums[at:at + 2], [name]))
        return out

    @torch.no_grad()
    def save_images(self, strategy, path, averaged=None) -> bool:
        """Samples for the names of the first ``sample_prompts`` held-out (else training) items."""
        if 'generate' not in self.cfg.tasks or not strategy.is_main or self.cfg.sample_prompts < 1:
            return False
        from contextlib import nullcontext
        from ...images import make_grid
        from ...utils.io import atomic_write
        ds = self.val_codes or self.train_codes
        names = [item_name(ds.captions(i)) for i in range(min(len(ds), self.cfg.sample_prompts))]
        with averaged() if averaged is not None else nullcontext():
            codes = self.model.generate_image([self.cfg.draw.format(n) for n in names], n=4,
                                              cfg_scale=self.cfg.sample_cfg, generator=self.cfg.seed)
        images = self.model.decode_codes(codes)
        grid = make_grid(list(images.view(len(names), 4, *images.shape[1:])))
        atomic_write(path, lambda f: grid.save(f, format='PNG'), what='sample grid')
        return True

    def export(self, state: dict, directory: str) -> None:
        backup = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(state)
        try:
            self.model.save_pretrained(directory)
            names = [s['name'] for s in self.train_codes.manifest['label_sets']]
            info = {'question': self.cfg.question, 'category_question': self.cfg.category_question,
                    'category_set': self.cfg.category_set or (names[0] if names else ''),
                    'classnames': self.classnames, 'draw': self.cfg.draw, 'tasks': list(self.cfg.tasks),
                    'codes': os.path.abspath(self.cfg.data.train)}
            from ...utils.io import atomic_write
            atomic_write(os.path.join(directory, 'training.json'), lambda f: json.dump(info, f, indent=2), mode='w',
                         what='training info')
        finally:
            self.model.load_state_dict(backup)

    def check_resume(self, saved_config: dict) -> None:
        saved = MLLMTrainConfig.from_dict(saved_config)
        fixed = ('llm', 'tokenizer', 'init', 'stage', 'lora_rank', 'model', 'tasks')
        diff = [k for k in fixed if getattr(saved, k) != getattr(self.cfg, k)]
        if diff or saved.data.train != self.cfg.data.train:
            raise CheckpointError(f'cannot resume: {", ".join(diff or ["data.train"])} differ from the checkpoint\'s; '
                                  'start a new run')

    def describe(self) -> str:
        c = self.model.config
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return (f'mllm stage {self.cfg.stage} on {c.llm}: {trainable / 1e6:.2f} M trainable of {total / 1e6:.1f} M '
                f'parameters; tasks {list(self.cfg.tasks)}; {len(self.train_codes)} items from {self.cfg.data.train} '
                f'({c.num_codebooks} x {c.codebook_size} codes, grid {c.grid[0]}x{c.grid[1]})')
