"""Codes <-> flat token sequences for downstream sequence models (AR generators, MLLMs).

A sequence is ``(B, L, K)``: one position per grid cell in raster order (query tokens first when
the model has them), K code ids per position, one per sub-codebook.
"""
from __future__ import annotations

import torch


def codes_to_sequence(codes: torch.Tensor) -> torch.Tensor:
    """``(B, K, h, w)`` or ``(B, K, L)`` codes -> ``(B, L, K)`` sequence (raster order)."""
    if codes.dim() == 4:
        codes = codes.flatten(2)                            # (B, K, h*w)
    if codes.dim() != 3:
        raise ValueError(f'codes must be (B, K, h, w) or (B, K, L), got {tuple(codes.shape)}')
    return codes.transpose(1, 2).contiguous()               # (B, L, K)


def sequence_to_codes(sequence: torch.Tensor, grid: tuple[int, int] | None = None,
                      num_query: int = 0) -> torch.Tensor:
    """``(B, L, K)`` sequence -> codes for ``UniTok.decode``.

    Without query tokens the result is the grid ``(B, K, h, w)`` (``grid`` defaults to square);
    with ``num_query > 0`` it is ``(B, K, L)``, the layout ``UniTok.encode`` returns for such models.
    """
    if sequence.dim() != 3:
        raise ValueError(f'sequence must be (B, L, K), got {tuple(sequence.shape)}')
    B, L, K = sequence.shape
    codes = sequence.transpose(1, 2).contiguous()           # (B, K, L)
    if num_query:
        return codes
    if grid is None:
        side = int(round(L ** 0.5))
        if side * side != L:
            raise ValueError(f'sequence length {L} is not a square; pass grid=(h, w)')
        grid = (side, side)
    if grid[0] * grid[1] != L:
        raise ValueError(f'grid {grid} does not hold {L} positions')
    return codes.view(B, K, *grid)
