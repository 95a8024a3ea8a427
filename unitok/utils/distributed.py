"""Process-group helpers. Every collective is explicit: callers pass the group (``None``: the default
group) and each helper is a no-op without an initialised process group, so library code that takes a
``process_group`` argument works unchanged in one process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (or run alone)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError('device cuda was asked for, but no CUDA GPU is available')
        dev = torch.device('cuda', local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
    return DistInfo(rank, world, local, dev)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    if initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort() -> None:
    """Leave the process group without synchronising (after an error on this rank)."""
    if initialized():
        dist.destroy_process_group()


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without a process group."""
    if initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_reduce(tensor: torch.Tensor, op=None, group=None) -> torch.Tensor:
    if initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_object(obj, group=None) -> list:
    if not initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def any_true(flag: bool, device: torch.device | None = None, group=None) -> bool:
    """True on every rank if ``flag`` is True on any rank (one all-reduce; none in one process)."""
    if not initialized() or dist.get_world_size(group) == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=device or torch.device('cpu'))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group)
