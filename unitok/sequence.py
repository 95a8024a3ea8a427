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


def flatten_codes(codes: torch.Tensor, num_codebooks: int, num_query: int = 0,
                  grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Codes as ``UniTok.encode`` returns them -> ``(B, K, Q + h*w)`` and the grid ``(h, w)``, checked
    against a model of ``num_codebooks`` sub-codebooks and ``num_query`` query tokens, with clear errors."""
    K, Q = num_codebooks, num_query
    want = f'(B, {K}, h, w)' if Q == 0 else f'(B, {K}, {Q} + h*w)'
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f'codes must be a torch.Tensor {want}, got {type(codes).__name__}'
                        + (' (use torch.from_numpy)' if hasattr(codes, '__array__') else ''))
    if grid is not None:
        g = tuple(grid) if isinstance(grid, (tuple, list)) else ()
        if len(g) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in g):
            raise ValueError(f'grid must be (h, w), two positive integers, got {grid!r}')
        grid = g
    if codes.dim() >= 2 and codes.shape[1] != K and codes.shape[0] == K and codes.dim() in (2, 3):
        raise ValueError(f'codes must have shape {want}, got {tuple(codes.shape)}: {codes.shape[1]} '
                         f'sub-codebooks in axis 1 where the model has {K}; the batch axis seems to be '
                         'missing (use codes[None])')
    if codes.dim() == 4 and Q == 0:
        B, k, h, w = codes.shape
        if grid is not None and tuple(grid) != (h, w):
            raise ValueError(f'grid {tuple(grid)} does not match codes of grid {h}x{w}')
        flat = codes.reshape(B, k, h * w)
    elif codes.dim() == 3:
        B, k, L = codes.shape
        if grid is None:
            grid = square_grid(L - Q)
        if L != Q + grid[0] * grid[1]:
            raise ValueError(f'codes hold {L} tokens but {Q} query + grid {grid[0]}x{grid[1]} '
                             f'needs {Q + grid[0] * grid[1]}')
        flat = codes
    else:
        want = f'(B, {K}, h, w)' if Q == 0 else f'(B, {K}, {Q} + h*w)'
        raise ValueError(f'codes must have shape {want}, got {tuple(codes.shape)}')
    if flat.shape[1] != K:
        raise ValueError(f'codes must have shape {want}, got {tuple(codes.shape)}: {flat.shape[1]} '
                         f'sub-codebooks in axis 1, the model has {K}')
    if flat.shape[0] == 0 or flat.shape[2] == 0:
        raise ValueError(f'codes are empty: shape {tuple(codes.shape)}')
    return flat, (grid if codes.dim() == 3 else (codes.shape[2], codes.shape[3]))
