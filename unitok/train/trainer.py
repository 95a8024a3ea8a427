"""The UniTok training loop: one generator step (reconstruction + perceptual + quantizer + CLIP
[+ adversarial] losses) and one discriminator step per iteration, with exact resume.

Reads top to bottom: ``Trainer.__init__`` builds everything from a :class:`TrainConfig`,
``generator_step`` / ``discriminator_step`` return float dicts, ``fit`` is the loop.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, _build, atomic_write, load_pretrained
from ..data import TrainStream, eval_transform, open_source, train_loader, train_transform
from ..images import make_grid
from ..losses import (ContrastiveLoss, DiffAug, adaptive_generator_weight, build_discriminator, build_perceptual,
                      discriminator_hinge_loss, generator_hinge_loss, reconstruction_losses)
from ..model import UniTok
from ..modules.text import tokenize
from . import distributed as D
from .config import TrainConfig
from .ema import EMA
from .logger import MetricsLogger
from .schedule import cosine_factor, gan_schedule
from .state import Checkpointer, capture_rng, restore_rng

LARGE_ENCODERS = ('vitamin_large', 'vitamin_xlarge')


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay for biases, norms, gains and the CLIP temperature (as the official recipe)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith('bias') or 'logit_scale' in name or '.norm' in name
        (no_decay if skip else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, info: D.DistInfo | None = None):
        cfg.validate()
        self.cfg, self.info = cfg, info or D.DistInfo()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)          # identical initial weights on every rank
        self.device = self.info.device
        self.out = cfg.out
        self.checkpointer = Checkpointer(os.path.join(cfg.out, 'checkpoints'), cfg.keep_last)

        # --- model -----------------------------------------------------------------------
        model_cfg = cfg.model_config().replace(grad_checkpointing=cfg.grad_checkpointing,
                                               entropy_loss=cfg.loss.entropy > 0)
        if cfg.init:
            model = load_pretrained(cfg.init)
            if model.config.replace(grad_checkpointing=False, entropy_loss=False) != \
                    model_cfg.replace(grad_checkpointing=False, entropy_loss=False):
                raise CheckpointError(f'--init {cfg.init}: its architecture differs from preset {cfg.preset} + overrides')
            model.config = model_cfg
            model.set_grad_checkpointing(cfg.grad_checkpointing)
            model.quantizer.use_entropy_loss = model_cfg.entropy_loss
        else:
            model = UniTok(model_cfg)
            model.init_weights()
        self.model = model.to(self.device).train()
        self.parallel = cfg.parallel if cfg.parallel != 'auto' else \
            ('fsdp' if self.info.enabled and model_cfg.encoder in LARGE_ENCODERS else 'ddp')
        self.replicated: list[nn.Parameter] = []
        if self.info.enabled and self.parallel == 'fsdp':
            self.replicated = D.shard_fsdp(self.model)
            self.wrapped = self.model
        else:
            self.wrapped = D.wrap_ddp(self.model, self.info)
        if cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        # After sharding, so that under FSDP2 the averages are sharded like the parameters.
        self.ema = EMA(self.model, cfg.optim.ema) if cfg.optim.ema > 0 else None

        # --- losses ----------------------------------------------------------------------
        lc = cfg.loss
        self.perceptual = build_perceptual(lc.perceptual, lc.lpips_path) if lc.perceptual_weight > 0 else None
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        self.disc = build_discriminator(lc.discriminator, model_cfg.image_size, lc.dino_path) \
            if lc.adversarial_weight > 0 else None
        if self.disc is not None:
            self.disc.to(self.device).train()
            self.disc_wrapped = D.wrap_ddp(self.disc, self.info)
        self.contrastive = ContrastiveLoss(lc.local_loss, lc.gather_with_grad)
        torch.manual_seed(cfg.seed + 10_000 * self.info.rank)   # per-rank stream from here (DiffAug, dropout)
        self.diffaug = DiffAug(lc.diffaug_prob, cutout=0.2)
        self.bcr_aug = DiffAug(1.0, cutout=lc.bcr_cutout)

        # --- optimisation ----------------------------------------------------------------
        oc = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, oc.weight_decay), lr=oc.lr, betas=oc.betas,
                                           eps=oc.eps)
        self.disc_optimizer = torch.optim.AdamW(param_groups(self.disc, cfg.optim.disc_weight_decay),
                                                lr=oc.disc_lr, betas=oc.disc_betas, eps=oc.eps) if self.disc else None
        self.scaler = torch.amp.GradScaler('cuda') if cfg.precision == 'fp16' and self.device.type == 'cuda' else None
        self.warmup_steps = round(oc.warmup * cfg.steps)
        self.disc_start = round(lc.disc_start * cfg.steps)
        self.disc_warmup = max(1, round(lc.disc_warmup * cfg.steps))

        # --- data ------------------------------------------------------------------------
        dc = cfg.data
        self.image_size = model_cfg.image_size
        self.train_source = open_source(dc.train, 'train', resampled=dc.resampled, shuffle_buffer=dc.shuffle_buffer)
        self.val_source = self._open_val()
        self.tokenize = lambda caption: tokenize(caption, model_cfg.text_context_length)[0]
        self.recon_batch = dc.recon_batch_size or dc.batch_size

        # --- bookkeeping -----------------------------------------------------------------
        self.step = 0
        self.positions: dict[int, int] = {}     # next raw position per loader worker stream
        self.consumed = 0                        # batches consumed by this rank
        self.skipped_samples = 0
        self.skipped_keys: list[str] = []
        self.nonfinite_steps = 0
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ helpers
    def _open_val(self):
        spec = self.cfg.data.val or self.cfg.data.train
        try:
            source = open_source(spec, 'val', resampled=False)
        except (FileNotFoundError, ValueError):
            return None
        if self.cfg.data.val is None and not hasattr(source, 'read'):
            return None
        return source

    def _autocast(self):
        if self.cfg.precision == 'fp32':
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == 'bf16' else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _loader(self):
        stream = TrainStream(self.train_source, train_transform(self.image_size, self.cfg.data.crop_scale,
                                                                self.cfg.data.hflip),
                             self.tokenize, seed=self.cfg.seed, rank=self.info.rank,
                             world_size=self.info.world_size, num_workers=self.cfg.data.num_workers,
                             start_positions=self.positions,
                             worker_offset=self.consumed % max(1, self.cfg.data.num_workers))
        return train_loader(stream, self.cfg.data.batch_size, self.cfg.data.num_workers)

    def _set_lr(self) -> float:
        oc = self.cfg.optim
        factor = cosine_factor(self.step, self.cfg.steps, self.warmup_steps, oc.start_ratio, oc.end_ratio)
        for g in self.optimizer.param_groups:
            g['lr'] = oc.lr * factor
        if self.disc_optimizer is not None:
            since = max(0, self.step - self.disc_start)
            d_factor = cosine_factor(since, self.cfg.steps - self.disc_start, self.disc_warmup, oc.start_ratio,
                                     oc.disc_end_ratio)
            for g in self.disc_optimizer.param_groups:
                g['lr'] = oc.disc_lr * d_factor
        return oc.lr * factor

    def _sync_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank."""
        if not self.info.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        D.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    # ------------------------------------------------------------------ one iteration
    def generator_step(self, images: torch.Tensor, texts: torch.Tensor, last_micro: bool,
                       gan_ramp: float, blur: float) -> tuple[dict[str, float], torch.Tensor | None]:
        """Forward + backward of the tokenizer losses for one micro-batch; returns floats and the
        (detached) reconstructions for the discriminator."""
        lc, accum = self.cfg.loss, self.cfg.optim.grad_accum
        sync = nullcontext()
        if not last_micro and isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            sync = self.wrapped.no_sync()
        elif self.replicated:     # FSDP2 parts
            for part in (self.model.encoder, self.model.decoder, self.model.text_encoder):
                part.set_requires_gradient_sync(last_micro)
        with sync:
            with self._autocast():
                out = self.wrapped(images, texts, recon_batch_size=self.recon_batch)
                target = images[:self.recon_batch]
                rec = reconstruction_losses(out.reconstruction, target)
                nll = lc.l1 * rec['l1'] + lc.l2 * rec['l2']
                perceptual = torch.zeros((), device=self.device)
                if self.perceptual is not None and target.shape[-2] >= lc.perceptual_min_size:
                    perceptual = self.perceptual(target, out.reconstruction)
                    nll = nll + lc.perceptual_weight * perceptual
                clip = self.contrastive(out.image_features, out.text_features, out.logit_scale)
                total = nll + lc.quantizer * out.quantizer_loss + lc.entropy * out.entropy_loss + lc.clip * clip
                g_loss = g_weight = torch.zeros((), device=self.device)
                if self.disc is not None and gan_ramp > 0:
                    self.disc.requires_grad_(False)
                    g_loss = generator_hinge_loss(self.disc(self.diffaug(out.reconstruction, blur)))
                    self.disc.requires_grad_(True)
                    g_weight = torch.tensor(gan_ramp * lc.adversarial_weight, device=self.device)
                    if lc.adaptive_weight:
                        g_weight = g_weight * adaptive_generator_weight(nll, g_loss, self.model.decoder.last_layer(),
                                                                        lc.adaptive_clamp)
                    total = total + g_weight * g_loss
            if self._sync_flag(not torch.isfinite(total).item()):
                raise NonFiniteLoss(f'non-finite generator loss at step {self.step}')
            loss = total / accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        metrics = dict(loss=total.item(), l1=rec['l1'].item(), l2=rec['l2'].item(), perceptual=perceptual.item(),
                       quantizer=out.quantizer_loss.item(), entropy=float(out.entropy_loss), clip=clip.item(),
                       g_loss=g_loss.item(), g_weight=float(g_weight), logit_scale=out.logit_scale.item(),
                       usage=out.codebook_usage.mean().item())
        return metrics, out.reconstruction.detach()

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, blur: float, last_micro: bool) -> dict[str, float]:
        lc, accum = self.cfg.loss, self.cfg.optim.grad_accum
        b = real.shape[0]
        views = [self.diffaug(real, blur), self.diffaug(fake, blur)]
        if lc.bcr > 0:
            views += [self.bcr_aug(real), self.bcr_aug(fake)]
        sync = self.disc_wrapped.no_sync() if (not last_micro and hasattr(self.disc_wrapped, 'no_sync')) else nullcontext()
        with sync:
            with self._autocast():
                logits = self.disc_wrapped(torch.cat(views)).float()   # one call: DDP sees one forward
            real_logits, fake_logits = logits[:b], logits[b:2 * b]
            d_loss = discriminator_hinge_loss(real_logits, fake_logits)
            bcr = torch.zeros((), device=self.device)
            if lc.bcr > 0:
                bcr = lc.bcr * (torch.nn.functional.mse_loss(logits[2 * b:3 * b], real_logits) +
                                torch.nn.functional.mse_loss(logits[3 * b:], fake_logits))
            total = d_loss + bcr
            if self._sync_flag(not torch.isfinite(total).item()):
                raise NonFiniteLoss(f'non-finite discriminator loss at step {self.step}')
            (self.scaler.scale(total / accum) if self.scaler else total / accum).backward()
        return dict(d_loss=d_loss.item(), bcr=bcr.item(), acc_real=(real_logits > 0).float().mean().item(),
                    acc_fake=(fake_logits < 0).float().mean().item())

    def _optimizer_step(self, optimizer, module) -> float:
        if module is self.model and self.replicated:
            D.all_reduce_grads(self.replicated, self.info.world_size)
        if self.scaler:
            self.scaler.unscale_(optimizer)
        params = [p for p in module.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        if module is self.model and self.replicated:      # FSDP2: sharded and replicated parameters
            norm = D.clip_grad_norm(params, clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float('inf'))
        if self._sync_flag(not torch.isfinite(norm).item()):
            raise NonFiniteLoss(f'non-finite gradient norm at step {self.step}')
        if self.scaler:
            self.scaler.step(optimizer)
        else:
            optimizer.step()
        return float(norm)

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        lr = self._set_lr()
        gan_ramp, blur = gan_schedule(self.step, self.disc_start, self.disc_warmup) if self.disc else (0.0, 0.0)
        sums: dict[str, float] = {}
        d_grad_norm = None
        try:
            reals, fakes = [], []
            for i, batch in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                images = batch['image'].to(self.device)
                m, fake = self.generator_step(images, batch['text'].to(self.device), last, gan_ramp, blur)
                reals.append(images[:self.recon_batch])
                fakes.append(fake)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
            grad_norm = self._optimizer_step(self.optimizer, self.model)
            if self.disc is not None and gan_ramp > 0:
                for i, (real, fake) in enumerate(zip(reals, fakes)):
                    m = self.discriminator_step(real, fake, blur, i == len(micro_batches) - 1)
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v
                d_grad_norm = self._optimizer_step(self.disc_optimizer, self.disc)
        except NonFiniteLoss as e:
            self.nonfinite_steps += 1
            self._zero_grad()
            if self.scaler:
                self.scaler.update()
            print(f'[unitok] {e}: step skipped (total skipped {self.nonfinite_steps})', flush=True)
            return {'nonfinite': 1.0, 'lr': lr}
        if self.scaler:
            self.scaler.update()
        self._zero_grad()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        if self.ema is not None:
            self.ema.update(self.model)
        metrics = {k: v / len(micro_batches) for k, v in sums.items()}
        metrics.update(lr=lr, grad_norm=grad_norm, gan_ramp=gan_ramp)
        if d_grad_norm is not None:
            metrics['d_grad_norm'] = d_grad_norm
        return metrics

    def _zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)
        if self.disc_optimizer is not None:
            self.disc_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out PSNR, reconstruction loss, CLIP loss and (with labels) zero-shot top-1, summed over ranks."""
        source = self.val_source
        if source is None or not hasattr(source, 'read'):
            return {}
        n = min(len(source), self.cfg.eval_batches * self.cfg.data.batch_size)
        transform = eval_transform(self.image_size)
        mine = list(range(self.info.rank, n, self.info.world_size))
        model = self.model
        was_training = model.training
        model.eval()
        classifier = None
        if getattr(source, 'classnames', None):
            classifier = model.zero_shot_classifier(source.classnames, source.templates)
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)   # psnr, l1, correct, count, clip
        bs = self.cfg.data.batch_size
        for s in range(0, len(mine), bs):
            items = [source.read(i) for i in mine[s:s + bs]]
            x = torch.stack([transform(im) for im, _, _ in items]).to(self.device)
            _, rec, image_features = model.analyze(x)     # one encoder pass for both
            mse = ((rec - x) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
            sums[0] += (-10 * torch.log10(mse)).sum().double()
            sums[1] += (rec - x).abs().flatten(1).mean(1).sum().double()
            sums[3] += len(items)
            text_features = model.encode_text([c if isinstance(c, str) else c[0] for _, c, _ in items])
            logits = model.logit_scale.exp() * image_features @ text_features.T
            target = torch.arange(len(items), device=self.device)
            clip = (torch.nn.functional.cross_entropy(logits, target) +
                    torch.nn.functional.cross_entropy(logits.T, target)) / 2
            sums[4] += clip.double() * len(items)
            if classifier is not None:
                labels = torch.tensor([lab for _, _, lab in items], device=self.device)
                sums[2] += ((image_features @ classifier).argmax(-1) == labels).sum().double()
        D.all_reduce(sums)
        model.train(was_training)
        count = max(1.0, sums[3].item())
        result = {'psnr': sums[0].item() / count, 'l1': sums[1].item() / count,
                  'clip_in_batch': sums[4].item() / count, 'samples': count}
        if classifier is not None:
            result['zero_shot_top1'] = sums[2].item() / count
        return result

    @torch.no_grad()
    def save_reconstructions(self, step: int) -> str | None:
        source = self.val_source if self.val_source is not None and hasattr(self.val_source, 'read') else \
            (self.train_source if hasattr(self.train_source, 'read') else None)
        if source is None:
            return None
        transform = eval_transform(self.image_size)
        x = torch.stack([transform(source.read(i)[0]) for i in range(min(8, len(source)))]).to(self.device)
        self.model.eval()
        rows = [x, self.model.reconstruct(x)]
        if self.ema is not None:
            with self.ema.applied(self.model):
                rows.append(self.model.reconstruct(x))
        self.model.train()
        if not self.info.is_main:
            return None
        path = os.path.join(self.out, 'images', f'step_{step:08d}.png')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        make_grid(rows).save(path)
        return path

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        model_state = self._full_state(self.model)
        per_rank = D.all_gather_object({'rng': capture_rng(), 'positions': dict(self.positions),
                                        'consumed': self.consumed})
        return {
            'step': self.step, 'config': self.cfg.to_dict(), 'model': model_state,
            'usage_updates': int(self.model.quantizer.usage_updates),
            'ema': self._gather_ema(), 'optimizer': self._optim_state(self.optimizer, self.model),
            'disc': self.disc.state_dict() if self.disc else None,
            'disc_optimizer': self.disc_optimizer.state_dict() if self.disc_optimizer else None,
            'scaler': self.scaler.state_dict() if self.scaler else None,
            'ranks': per_rank, 'world_size': self.info.world_size, 'num_workers': self.cfg.data.num_workers,
            'skipped_samples': self.skipped_samples, 'nonfinite_steps': self.nonfinite_steps,
        }

    def _fsdp(self) -> bool:
        return self.info.enabled and self.parallel == 'fsdp'

    def _full_state(self, module: nn.Module) -> dict:
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def _optim_state(self, optimizer, module) -> dict:
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            return get_optimizer_state_dict(module, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def _gather_ema(self):
        if self.ema is None:
            return None
        if not self._fsdp():
            return self.ema.state_dict()
        with self.ema.applied(self.model):
            full = self._full_state(self.model)      # complete on rank 0 only (cpu_offload)
        return {'decay': self.ema.decay, 'updates': self.ema.updates,
                'shadow': {n: full[n] for n in self.ema.names} if self.info.is_main else None}

    def save_checkpoint(self) -> str | None:
        if not self._all_finite():
            print(f'[unitok] step {self.step}: parameters are not finite, checkpoint NOT written', flush=True)
            return None
        state = self.state_dict()
        path = self.checkpointer.save(self.step, state) if self.info.is_main else None
        D.barrier()
        return path

    def _all_finite(self) -> bool:
        ok = all(torch.isfinite(p).all() for p in self.model.parameters())
        return not self._sync_flag(not ok)

    def load_checkpoint(self, which: str) -> None:
        path = D.broadcast_object(self.checkpointer.resolve(which) if self.info.is_main else None)
        state = self.checkpointer.load(path)
        if state['world_size'] != self.info.world_size or state['num_workers'] != self.cfg.data.num_workers:
            raise CheckpointError(f'{path}: saved with {state["world_size"]} process(es) x {state["num_workers"]} '
                                  f'loader worker(s); resume with the same to continue the data stream exactly')
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            set_model_state_dict(self.model, state['model'], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state['optimizer'], options=opts)
        else:
            self.model.load_state_dict(state['model'])
            self.optimizer.load_state_dict(state['optimizer'])
        self.model.quantizer.usage_updates.fill_(state['usage_updates'])
        if self.ema is not None and state['ema'] is not None:
            if self._fsdp():
                with self.ema.applied(self.model):   # shard the full EMA weights through the model
                    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
                    set_model_state_dict(self.model, {**state['model'], **state['ema']['shadow']},
                                         options=StateDictOptions(full_state_dict=True))
                    self.ema = EMA(self.model, self.cfg.optim.ema)
                self.ema.updates = int(state['ema']['updates'])
            else:
                self.ema.load_state_dict(state['ema'])
        if self.disc is not None and state['disc'] is not None:
            self.disc.load_state_dict(state['disc'])
            self.disc_optimizer.load_state_dict(state['disc_optimizer'])
        if self.scaler is not None and state['scaler'] is not None:
            self.scaler.load_state_dict(state['scaler'])
        mine = state['ranks'][self.info.rank]
        restore_rng(mine['rng'])
        self.positions = {int(k): int(v) for k, v in mine['positions'].items()}
        self.consumed = int(mine['consumed'])
        self.step = int(state['step'])
        self.skipped_samples, self.nonfinite_steps = state['skipped_samples'], state['nonfinite_steps']
        if self.info.is_main:
            print(f'[unitok] resumed from {path} at step {self.step}', flush=True)

    def export(self, directory: str) -> None:
        """Save the EMA model (or the raw one without EMA) with ``save_pretrained``."""
        context = self.ema.applied(self.model) if self.ema is not None else nullcontext()
        with context:
            state = self._full_state(self.model)
        if self.info.is_main:
            _build(self.model.config.replace(grad_checkpointing=False), state).save_pretrained(directory)
        D.barrier()

    # ------------------------------------------------------------------ the loop
    def _install_signal_handlers(self):
        def handler(signum, frame):
            self.stop_signal = signum
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, handler)

    def fit(self, resume: str | None = None) -> dict:
        cfg = self.cfg
        if resume:
            self.load_checkpoint(resume)
        if self.info.is_main:
            os.makedirs(self.out, exist_ok=True)
            cfg.save(os.path.join(self.out, 'config.yaml'))
        self._install_signal_handlers()
        logger = MetricsLogger(self.out, self.info.is_main, cfg.steps, self.step,
                               wandb_config=cfg.to_dict() if cfg.wandb else None)
        if self.info.is_main:
            counts = self.model.parameter_counts()
            print(f'[unitok] {cfg.preset}: {counts["total"] / 1e6:.1f} M parameters; data {cfg.data.train}; '
                  f'perceptual {type(self.perceptual).__name__ if self.perceptual else "none"}; discriminator '
                  f'{type(self.disc).__name__ if self.disc else "none"}; {self.info.world_size} process(es), '
                  f'{self.parallel if self.info.enabled else "single"}; {cfg.precision}', flush=True)
        loader = iter(self._loader())
        t_start, window = time.time(), []
        first_eval = self.evaluate() if self.step == 0 and cfg.eval_every else None
        if first_eval:
            logger.log(0, first_eval, kind='val')
        last_val = first_eval or {}
        exit_reason = 'finished'
        while self.step < cfg.steps:
            micro = []
            for _ in range(cfg.optim.grad_accum):
                batch = next(loader)
                self.consumed += 1
                self.positions[batch['worker']] = batch['position'] + 1
                self.skipped_samples += batch['skipped']
                if batch['skipped_keys'] and len(self.skipped_keys) < 100:
                    self.skipped_keys += batch['skipped_keys']
                    for k in batch['skipped_keys']:
                        print(f'[unitok] skipped unreadable sample {k}', flush=True)
                micro.append(batch)
            t0 = time.time()
            metrics = self.train_step(micro)
            self.step += 1
            window.append(time.time() - t0)
            metrics['skipped_samples'] = self.skipped_samples
            if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                metrics['sec_per_step'] = sum(window) / len(window)
                metrics['images_per_sec'] = cfg.data.batch_size * cfg.optim.grad_accum * self.info.world_size / \
                    metrics['sec_per_step']
                window = []
                logger.log(self.step, metrics)
            logger.progress(self.step, {k: metrics[k] for k in ('loss', 'l1', 'clip', 'usage', 'lr') if k in metrics})
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                last_val = self.evaluate()
                logger.log(self.step, last_val, kind='val')
            if cfg.image_every and self.step % cfg.image_every == 0:
                path = self.save_reconstructions(self.step)
                if path:
                    logger.image(self.step, 'reconstructions', path)
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
            if self._sync_flag(self.stop_signal is not None):
                exit_reason = f'signal {signal.Signals(self.stop_signal or signal.SIGTERM).name}'
                break
        path = self.save_checkpoint()
        if exit_reason == 'finished':
            self.export(os.path.join(self.out, 'model'))
            if cfg.eval_every and self.step % cfg.eval_every:
                last_val = self.evaluate()
                logger.log(self.step, last_val, kind='val')
            if cfg.image_every and self.step % cfg.image_every:
                self.save_reconstructions(self.step)
        summary = {'exit': exit_reason, 'step': self.step, 'checkpoint': path, 'minutes': (time.time() - t_start) / 60,
                   'skipped_samples': self.skipped_samples, 'skipped_examples': self.skipped_keys[:10],
                   'nonfinite_steps': self.nonfinite_steps, 'val': last_val,
                   'model': os.path.join(self.out, 'model') if exit_reason == 'finished' else None}
        logger.close()
        if self.info.is_main:
            atomic_write(os.path.join(self.out, 'summary.json'), lambda f: json.dump(summary, f, indent=2), mode='w')
            print('[unitok] ' + ', '.join(f'{k} {v}' for k, v in summary.items() if k != 'val'), flush=True)
            if last_val:
                print('[unitok] held-out: ' + ', '.join(f'{k} {v:.4g}' for k, v in last_val.items()), flush=True)
        return summary
