"""Training the UniTok tokenizer: the official objective as a task of the one loop.

Generator phase (the tokenizer): L1/L2 reconstruction on the first ``recon_batch_size`` images,
perceptual loss, the quantizer's commitment (and optional entropy) loss, the CLIP contrastive loss
and, once the GAN has started, the hinge generator loss at an adaptive weight. Discriminator phase:
hinge loss on DiffAug views of real and reconstructed images plus balanced consistency
regularisation (bCR). Learning rates follow the official warm-up + cosine schedules.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...checkpoint import CheckpointError, load_pretrained
from ...data import TrainStream, eval_transform, has_split, open_source, train_transform
from ...images import ImageReadError, make_grid
from ...losses import (ContrastiveLoss, DiffAug, adaptive_generator_weight, build_discriminator, build_perceptual,
                       discriminator_hinge_loss, generator_hinge_loss, reconstruction_losses)
from ...model import UniTok
from ...modules.text import tokenize
from ..config import LossConfig, TrainConfig
from ..schedule import cosine_factor, gan_schedule
from ..task import Phase, Task

log = logging.getLogger('unitok.train')
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


def reconstruction_objective(terms: dict[str, torch.Tensor], lc: LossConfig) -> torch.Tensor:
    """The loss the adaptive GAN weight balances against: ``l1*L1 + l2*L2 + w_p*perceptual``."""
    return lc.l1 * terms['l1'] + lc.l2 * terms['l2'] + lc.perceptual_weight * terms['perceptual']


def generator_objective(terms: dict[str, torch.Tensor], lc: LossConfig, gan_weight: torch.Tensor | float = 0.0
                        ) -> torch.Tensor:
    """The tokenizer's total loss from its terms and the config's weights."""
    return (reconstruction_objective(terms, lc) + lc.quantizer * terms['quantizer'] + lc.entropy * terms['entropy']
            + lc.clip * terms['clip'] + gan_weight * terms['g_loss'])


class TokenizerTask(Task):
    name = 'tokenizer'
    progress_keys = ('loss', 'l1', 'clip', 'usage', 'lr')

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        model_cfg = cfg.model_config().replace(grad_checkpointing=cfg.grad_checkpointing,
                                               entropy_loss=cfg.loss.entropy > 0)
        if cfg.init:
            model = load_pretrained(cfg.init)
            if _architecture(model.config) != _architecture(model_cfg):
                raise CheckpointError(f'--init {cfg.init}: its architecture differs from preset {cfg.preset} + overrides')
            model.config = model_cfg
            model.set_grad_checkpointing(cfg.grad_checkpointing)
            model.quantizer.configure_training(model_cfg)
        else:
            model = UniTok(model_cfg)
            model.init_weights()
        self.model = model
        self.model_cfg = model_cfg
        dc = cfg.data
        self.train_source = open_source(dc.train, 'train', resampled=dc.resampled, shuffle_buffer=dc.shuffle_buffer)
        self.val_source, self.val_note = _held_out(dc)
        self.recon_batch = dc.recon_batch_size

    def default_parallel(self, info) -> str:
        return 'fsdp' if info.enabled and self.model_cfg.encoder in LARGE_ENCODERS else 'ddp'

    def setup(self, strategy) -> None:
        cfg, lc, oc, m = self.cfg, self.cfg.loss, self.cfg.optim, self.model
        device = strategy.device
        self.strategy = strategy
        units = [*m.encoder.blocks, *m.decoder.blocks, *m.text_encoder.transformer.resblocks,
                 m.encoder, m.decoder, m.text_encoder]
        self.wrapped = strategy.wrap(m, shard_units=units)
        if cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        m.quantizer.sync_usage = strategy.info.enabled          # explicit: usage counts of the global batch
        self.perceptual = build_perceptual(lc.perceptual, lc.lpips_path) if lc.perceptual_weight > 0 else None
        if self.perceptual is not None:
            self.perceptual.to(device)
        self.disc = build_discriminator(lc.discriminator, self.model_cfg.image_size, lc.dino_path) \
            if lc.adversarial_weight > 0 else None
        if self.disc is not None:
            self.disc.to(device).train()
            self.disc_wrapped = strategy.wrap(self.disc)
        self.contrastive = ContrastiveLoss(lc.local_loss, lc.gather_with_grad, rank=strategy.rank,
                                           world_size=strategy.world_size)
        self.diffaug = DiffAug(lc.diffaug_prob, cutout=0.2)
        self.bcr_aug = DiffAug(1.0, cutout=lc.bcr_cutout)
        self.warmup_steps = round(oc.warmup * cfg.steps)
        self.disc_start = round(lc.disc_start * cfg.steps)
        self.disc_warmup = max(1, round(lc.disc_warmup * cfg.steps))
        self._phases = [Phase('model', m, torch.optim.AdamW(param_groups(m, oc.weight_decay), lr=oc.lr,
                                                            betas=oc.betas, eps=oc.eps), self.lr)]
        if self.disc is not None:
            opt = torch.optim.AdamW(param_groups(self.disc, oc.disc_weight_decay), lr=oc.disc_lr, betas=oc.disc_betas,
                                    eps=oc.eps)
            self._phases.append(Phase('disc', self.disc, opt, self.disc_lr))

    # ------------------------------------------------------------------ schedules
    def disc_lr(self, step: int) -> float:
        oc = self.cfg.optim
        since = max(0, step - self.disc_start)
        return oc.disc_lr * cosine_factor(since, self.cfg.steps - self.disc_start, self.disc_warmup, oc.start_ratio,
                                          oc.disc_end_ratio)

    def gan(self, step: int) -> tuple[float, float]:
        """(ramp, blur) of the adversarial loss at ``step``; (0, 0) without a discriminator."""
        return gan_schedule(step, self.disc_start, self.disc_warmup) if self.disc is not None else (0.0, 0.0)

    def active(self, phase: Phase, step: int) -> bool:
        return phase.name == 'model' or self.gan(step)[0] > 0

    def step_metrics(self, step: int) -> dict[str, float]:
        return {'gan_ramp': self.gan(step)[0]}

    # ------------------------------------------------------------------ losses
    def loss(self, phase: Phase, batch: dict, step: int):
        return self._generator(batch, step) if phase.name == 'model' else self._discriminator(batch, step)

    def _generator(self, batch: dict, step: int):
        lc = self.cfg.loss
        ramp, blur = self.gan(step)
        images = batch['image']
        out = self.wrapped(images, batch['text'], recon_batch_size=self.recon_batch)
        target = images[:out.reconstruction.shape[0]]
        terms = dict(reconstruction_losses(out.reconstruction, target))
        zero = torch.zeros((), device=images.device)
        terms['perceptual'] = self.perceptual(target, out.reconstruction) \
            if self.perceptual is not None and target.shape[-2] >= lc.perceptual_min_size else zero
        terms.update(quantizer=out.quantizer_loss, entropy=out.entropy_loss + zero,
                     clip=self.contrastive(out.image_features, out.text_features, out.logit_scale), g_loss=zero)
        weight = zero
        if self.disc is not None and ramp > 0:
            self.disc.requires_grad_(False)
            terms['g_loss'] = generator_hinge_loss(self.disc(self.diffaug(out.reconstruction, blur)))
            self.disc.requires_grad_(True)
            weight = torch.tensor(ramp * lc.adversarial_weight, device=images.device)
            if lc.adaptive_weight:
                weight = weight * adaptive_generator_weight(
                    reconstruction_objective(terms, lc), terms['g_loss'], self.model.decoder.last_layer(),
                    lc.adaptive_clamp, sync=self.strategy.info.enabled, process_group=self.strategy.process_group)
        total = generator_objective(terms, lc, weight)
        batch['real'], batch['fake'] = target, out.reconstruction.detach()     # for the discriminator phase
        metrics = {k: v.detach() for k, v in terms.items()}
        metrics.update(loss=total.detach(), g_weight=weight.detach(), logit_scale=out.logit_scale.detach(),
                       usage=out.codebook_usage.mean().detach())
        return total, metrics

    def _discriminator(self, batch: dict, step: int):
        lc = self.cfg.loss
        _, blur = self.gan(step)
        real, fake = batch['real'], batch['fake']
        b = real.shape[0]
        views = [self.diffaug(real, blur), self.diffaug(fake, blur)]
        if lc.bcr > 0:
            views += [self.bcr_aug(real), self.bcr_aug(fake)]
        logits = self.disc_wrapped(torch.cat(views)).float()       # one call: DDP sees one forward
        real_logits, fake_logits = logits[:b], logits[b:2 * b]
        d_loss = discriminator_hinge_loss(real_logits, fake_logits)
        bcr = torch.zeros((), device=real.device)
        if lc.bcr > 0:
            bcr = lc.bcr * (F.mse_loss(logits[2 * b:3 * b], real_logits) + F.mse_loss(logits[3 * b:], fake_logits))
        metrics = dict(d_loss=d_loss.detach(), bcr=bcr.detach(), acc_real=(real_logits > 0).float().mean().detach(),
                       acc_fake=(fake_logits < 0).float().mean().detach())
        return d_loss + bcr, metrics

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    # ------------------------------------------------------------------ data
    def train_stream(self, rank, world_size, num_workers, start_positions, worker_offset):
        dc = self.cfg.data
        context = self.model_cfg.text_context_length
        return TrainStream(self.train_source, train_transform(self.model_cfg.image_size, dc.crop_scale, dc.hflip),
                           lambda caption: tokenize(caption, context)[0], seed=self.cfg.seed, rank=rank,
                           world_size=world_size, num_workers=num_workers, start_positions=start_positions,
                           worker_offset=worker_offset)

    # ------------------------------------------------------------------ validation, images, export
    def validate(self, strategy) -> dict[str, float]:
        """Held-out PSNR, L1, in-batch CLIP loss and zero-shot top-1 through :func:`unitok.eval.evaluate`
        on a fixed class-balanced subset of ``eval_batches * batch_size`` images."""
        if self.val_source is None:
            return {}
        from ...eval import EvalConfig, evaluate
        bs = self.cfg.data.batch_size
        metrics = ('psnr', 'l1', 'clip_loss') + (('zero_shot',) if getattr(self.val_source, 'classnames', None) else ())
        ecfg = EvalConfig(metrics=metrics, batch_size=bs, max_samples=self.cfg.eval_batches * bs,
                          image_size=self.model_cfg.image_size, grid_samples=0)
        result = evaluate(self.model, self.val_source, ecfg, process_group=strategy.process_group)
        return {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}

    def save_images(self, strategy, path, averaged=None) -> bool:
        source = self.val_source if self.val_source is not None else \
            (self.train_source if hasattr(self.train_source, 'read') else None)
        if source is None:
            return False
        transform = eval_transform(self.model_cfg.image_size)
        images = []
        for i in range(len(source)):
            if len(images) == 8:
                break
            try:
                images.append(transform(source.read(i)[0]))
            except (ImageReadError, OSError, ValueError):
                continue
        if not images:
            return False
        x = torch.stack(images).to(strategy.device)
        rows = [x, self.model.reconstruct(x)]
        if averaged is not None:
            with averaged():
                rows.append(self.model.reconstruct(x))
        if not strategy.is_main:
            return False
        from ...utils.io import atomic_write
        grid = make_grid(rows)
        atomic_write(path, lambda f: grid.save(f, format='PNG'), what='image grid')
        return True

    def export(self, state: dict, directory: str) -> None:
        model = UniTok(self.model.config.replace(grad_checkpointing=False))
        model.load_state_dict(state)
        model.save_pretrained(directory)

    def extra_state(self) -> dict:
        return self.model.quantizer.extra_state()

    def load_extra_state(self, state: dict) -> None:
        self.model.quantizer.load_extra_state(state)

    def check_resume(self, saved_config: dict) -> None:
        saved = TrainConfig.from_dict(saved_config).model_config()
        if _architecture(saved) != _architecture(self.model_cfg):
            diff = {k: (v, getattr(self.model_cfg, k)) for k, v in vars(saved).items()
                    if getattr(self.model_cfg, k) != v and k not in ('grad_checkpointing', 'entropy_loss')}
            raise CheckpointError(f'cannot resume: the model architecture differs from the checkpoint\'s '
                                  f'(saved -> now: {diff}); start a new run, or use --init to start from its weights')

    def describe(self) -> str:
        counts = self.model.parameter_counts()
        return (f'{self.cfg.preset}: {counts["total"] / 1e6:.1f} M parameters; data {self.cfg.data.train}; '
                f'perceptual {type(self.perceptual).__name__ if self.perceptual else "none"}; discriminator '
                f'{type(self.disc).__name__ if self.disc else "none"}; held-out: {self.val_note}')


def _architecture(cfg):
    return cfg.replace(grad_checkpointing=False, entropy_loss=False)


def _held_out(dc):
    """(source, note): the held-out data, or None with the reason when there is none."""
    if dc.val:
        return open_source(dc.val, 'val', resampled=False), dc.val
    if not has_split(dc.train, 'val'):
        note = (f'none: {dc.train!r} has no validation split, so validation is skipped '
                '(pass --val-data to validate on held-out images)')
        log.warning('held-out %s', note)
        return None, note
    source = open_source(dc.train, 'val', resampled=False)
    if not hasattr(source, 'read'):
        return None, 'none: streamed shards are not validated in training (use unitok eval)'
    return source, f'the val split of {dc.train}'
