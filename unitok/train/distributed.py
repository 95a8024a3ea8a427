"""Process-group setup and model wrapping for ``torchrun``: DDP (gloo on CPU, NCCL on GPU) or FSDP2."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..utils.distributed import (DistInfo, abort, all_gather_object, all_reduce, any_true, barrier,  # noqa: F401
                                 broadcast_object, init_distributed, rank_and_world, shutdown)


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    if not info.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[info.local_rank] if info.device.type == 'cuda' else None)


def shard_fsdp(model: nn.Module) -> list[nn.Parameter]:
    """FSDP2: shard every transformer block and the encoder, decoder and text tower; returns the small
    parameters left replicated (projections, quantizer, CLIP head -- FSDP2 cannot shard the scalar
    ``logit_scale``), whose gradients the caller averages with :func:`all_reduce_grads`.

    Parameters stay float32 and compute precision comes from autocast, exactly as with DDP (the
    quantizer and the projections must run in float32).
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    for block in [*model.encoder.blocks, *model.decoder.blocks, *model.text_encoder.transformer.resblocks]:
        fully_shard(block)
    for part in (model.encoder, model.decoder, model.text_encoder):
        fully_shard(part)
    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def all_reduce_grads(params: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of replicated parameters over ranks (one flat all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or world_size == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm (and in-place clipping when ``max_norm > 0``) over a mix of FSDP2-sharded
    (DTensor) and replicated parameters, which ``torch.nn.utils.clip_grad_norm_`` cannot mix."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device('cpu')
    sharded = torch.zeros((), device=device)
    replicated = torch.zeros((), device=device)
    for g in grads:
        if isinstance(g, DTensor):
            sharded += g.to_local().float().square().sum()
        else:
            replicated += g.float().square().sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sharded)                 # shards add up; replicated grads are already global
    norm = (sharded + replicated).sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef)
    return norm
