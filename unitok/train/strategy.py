"""Parallelism strategies: how modules are wrapped, synchronised, clipped and saved.

The loop and the tasks talk to one :class:`Strategy` object and never branch on the kind of
parallelism. :class:`SingleProcess` is the identity; :class:`DDP` replicates modules with
``DistributedDataParallel``; :class:`FSDP2` shards the units a task names with ``fully_shard`` and
keeps the rest replicated (their gradients averaged by one flat all-reduce before clipping).
State dicts handed out are always full and on the CPU, so checkpoints do not depend on the strategy.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn

from ..utils import distributed as D
from ..utils.distributed import DistInfo


class Strategy:
    """Single process: every method is the plain PyTorch operation."""
    name = 'single'

    def __init__(self, info: DistInfo | None = None):
        self.info = info or DistInfo()

    # -- process-group facts and collectives (no-ops in one process)
    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def process_group(self):
        """The group tasks hand to library code that reduces statistics (None: no collective)."""
        return dist.group.WORLD if self.info.enabled else None

    def any(self, flag: bool | torch.Tensor) -> bool:
        """True on every rank when ``flag`` is true on any rank (a host-device sync)."""
        return D.any_true(bool(flag), self.device) if self.info.enabled else bool(flag)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return D.all_reduce(tensor) if self.info.enabled else tensor

    def all_gather_object(self, obj) -> list:
        return D.all_gather_object(obj)

    def broadcast_object(self, obj):
        return D.broadcast_object(obj)

    def barrier(self) -> None:
        D.barrier()

    # -- modules
    def wrap(self, module: nn.Module, shard_units: list[nn.Module] | None = None,
             owner: nn.Module | None = None) -> nn.Module:
        """The module to call in training (``module`` itself stays the one to save and to average).

        ``shard_units``: submodules FSDP2 shards (blocks first); ``owner``: the module the phase names
        when ``module`` is a thin wrapper around it (e.g. one whose forward computes the loss).
        """
        return module

    def no_sync(self, module: nn.Module, sync: bool):
        """Context for a backward pass that should (``sync``) or should not reduce gradients yet."""
        return nullcontext()

    def clip_grad_norm_(self, module: nn.Module, max_norm: float) -> torch.Tensor:
        """Reduce what is still unreduced, then clip in place; returns the global norm (a tensor)."""
        params = [p for p in module.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float('inf'))

    def full_state_dict(self, module: nn.Module) -> dict:
        """Complete CPU state dict (under FSDP2 complete on rank 0 only)."""
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def load_full_state_dict(self, module: nn.Module, state: dict) -> None:
        module.load_state_dict(state)

    def optimizer_state_dict(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def describe(self) -> str:
        return f'{self.world_size} process(es), {self.name}'


class DDP(Strategy):
    """Every module replicated; gradients averaged by DDP's bucketed all-reduce during backward."""
    name = 'ddp'

    def __init__(self, info: DistInfo):
        super().__init__(info)
        self._wrapped: dict[int, nn.Module] = {}

    def wrap(self, module, shard_units=None, owner=None):
        if not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.info.local_rank] if self.device.type == 'cuda' else None
        wrapped = DistributedDataParallel(module, device_ids=ids)
        self._wrapped[id(owner if owner is not None else module)] = wrapped
        return wrapped

    def no_sync(self, module, sync):
        wrapped = self._wrapped.get(id(module))
        return wrapped.no_sync() if wrapped is not None and not sync else nullcontext()


class FSDP2(Strategy):
    """``fully_shard`` on the units a task names (blocks first, then their parents); parameters left
    outside every unit (small projections, the quantizer, scalars FSDP2 cannot shard) stay replicated.

    Parameters stay float32 and compute precision comes from autocast, exactly as with DDP.
    """
    name = 'fsdp'

    def __init__(self, info: DistInfo):
        super().__init__(info)
        self._units: dict[int, list[nn.Module]] = {}
        self._replicated: dict[int, list[nn.Parameter]] = {}
        self._ddp = DDP(info)

    def wrap(self, module, shard_units=None, owner=None):
        if not shard_units:                       # e.g. a small discriminator: replicate it
            return self._ddp.wrap(module, owner=owner)
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        for unit in shard_units:
            fully_shard(unit)
        key = id(owner if owner is not None else module)
        self._units[key] = list(shard_units)
        self._replicated[key] = [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
        return module

    def _sharded(self, module) -> bool:
        return id(module) in self._units

    def no_sync(self, module, sync):
        if not self._sharded(module):
            return self._ddp.no_sync(module, sync)
        for unit in self._units[id(module)]:
            unit.set_requires_gradient_sync(sync)
        return nullcontext()

    def clip_grad_norm_(self, module, max_norm):
        if not self._sharded(module):
            return super().clip_grad_norm_(module, max_norm)
        _average_grads(self._replicated[id(module)], self.world_size)
        return _clip_mixed(list(module.parameters()), max_norm)

    def full_state_dict(self, module):
        if not self._sharded(module):
            return super().full_state_dict(module)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, module, state):
        if not self._sharded(module):
            return super().load_full_state_dict(module, state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state_dict(self, module, optimizer):
        if not self._sharded(module):
            return super().optimizer_state_dict(module, optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, module, optimizer, state):
        if not self._sharded(module):
            return super().load_optimizer_state_dict(module, optimizer, state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(module, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def _average_grads(params: list[nn.Parameter], world_size: int) -> None:
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


def _clip_mixed(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm and in-place clipping over FSDP2-sharded (DTensor) and replicated
    parameters together, which ``torch.nn.utils.clip_grad_norm_`` cannot mix."""
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
    if D.initialized():
        dist.all_reduce(sharded)                 # shards add up; replicated grads are already global
    norm = (sharded + replicated).sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef)
    return norm


def build_strategy(kind: str, info: DistInfo) -> Strategy:
    """``kind``: 'single' | 'ddp' | 'fsdp' ('ddp'/'fsdp' in one process fall back to single)."""
    if not info.enabled:
        return Strategy(info)
    if kind == 'ddp':
        return DDP(info)
    if kind == 'fsdp':
        return FSDP2(info)
    raise ValueError(f"unknown parallelism {kind!r}; choose 'ddp' or 'fsdp'")
