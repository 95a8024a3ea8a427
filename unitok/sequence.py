"""Codes <-> flat token sequences for downstream sequence models (AR generators, MLLMs).

A sequence is ``(B, L, K)``: one position per grid cell in raster order (query tokens first when
the model has them), K code ids per position, one per sub-codebook.
"""
from __future__ import annotations

import math

import torch


def square_grid(length: int) -> tuple[int, int]:
    """The square grid ``(s, s)`` of ``length`` positions (the one rule for inferring a grid from a
    token count); ValueError when ``length`` is not a positive square number."""
    side = math.isqrt(length) if length > 0 else 0
    if side == 0 or side * side != length:
        raise ValueError(f'{length} positions are not a square number, so no square grid holds them; '
                         'pass grid=(h, w)')
    return side, side


def codes_to_sequence(codes: torch.Tensor) -> torch.Tensor:
    """``(B, K, h, w)`` or ``(B, K, L)`` codes -> ``(B, L, K)`` sequence (raster order)."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f'codes must be a torch.Tensor (B, K, h, w) or (B, K, L), got {type(codes).__name__}')
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
    if not isinstance(sequence, torch.Tensor):
        raise TypeError(f'sequence must be a torch.Tensor (B, L, K), got {type(sequence).__name__}')
    if sequence.dim() != 3:
        raise ValueError(f'sequence must be (B, L, K), got {tuple(sequence.shape)}')
    if isinstance(num_query, bool) or not isinstance(num_query, int) or not 0 <= num_query < sequence.shape[1]:
        raise ValueError(f'num_query must be an integer in [0, L) with L = {sequence.shape[1]}, got {num_query!r}')
    B, L, K = sequence.shape
    codes = sequence.transpose(1, 2).contiguous()           # (B, K, L)
    if num_query:
        return codes
    if grid is None:
        grid = square_grid(L)
    g = tuple(grid) if isinstance(grid, (tuple, list)) else ()
    if len(g) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in g):
        raise ValueError(f'grid must be (h, w), two positive integers, got {grid!r}')
    grid = g
    if grid[0] * grid[1] != L:
        raise ValueError(f'grid {grid} does not hold {L} positions')
    return codes.view(B, K, *grid)
