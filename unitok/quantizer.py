"""Multi-codebook vector quantization (UniTok, arXiv 2502.20321, section 3.2).

A latent token of width ``K * d`` is split into K chunks of width d; chunk k is l2-normalised and
replaced by the most similar (cosine) l2-normalised code of its own sub-codebook k. With K
sub-codebooks of n codes the token can take n^K values while each lookup stays small.

The module is standalone (no dependency on the rest of UniTok) and vectorised over sub-codebooks.

Axis legend used below: B batch, L tokens, K sub-codebooks, n codes per sub-codebook,
d code width, N = B * L.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# Similarities scored per step of the nearest-code search (K * n * tokens floats, ~8 MB).
_SEARCH_TILE = 1 << 21


@dataclass
class QuantizerOutput:
    """Result of :meth:`MultiCodebookQuantizer.forward`.

    Attributes:
        quantized: (B, L, K*d) the selected codes, one unit vector per chunk. When the input requires
            grad this is the straight-through estimate ``z + sg(q - z)`` so gradients reach the encoder;
            otherwise exactly ``lookup(codes)``.
        codes: (B, K, L) int64 code ids, chunk k indexes sub-codebook k.
        losses: ``'commitment'``: ``beta * ||sg(q) - z||^2 + ||q - sg(z)||^2`` (mean over elements);
            ``'entropy'``: the codebook entropy loss (zero unless enabled).
        stats: detached statistics of this batch: ``'usage'`` (K,) share of each sub-codebook's codes
            chosen more than 1% of a uniform share (the official usage metric, as a fraction);
            ``'perplexity'`` (K,) exp(entropy) of the code histogram.
    """
    quantized: torch.Tensor
    codes: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class MultiCodebookQuantizer(nn.Module):
    """K sub-codebooks of ``codebook_size`` codes of width ``code_dim``, searched by cosine similarity.

    Args:
        num_codebooks: K.
        codebook_size: n, codes per sub-codebook.
        code_dim: d, width of each code; inputs are (B, L, K*d).
        beta: commitment weight.
        entropy_loss: compute the entropy regulariser (per-sample entropy minus codebook entropy).
        entropy_temperature: softmax temperature of that regulariser.

    State dict: ``codebook`` (K, n, d) and the running code frequency ``vocab_usage`` (K, n). The
    official release stores them per sub-codebook (``codebooks.{k}.codebook.weight``,
    ``codebooks.{k}.vocab_usage``); such state dicts are accepted by ``load_state_dict`` as they are,
    and :func:`to_official_layout` converts back.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, code_dim: int, beta: float = 0.25,
                 entropy_loss: bool = False, entropy_temperature: float = 0.01):
        super().__init__()
        self.num_codebooks, self.codebook_size, self.code_dim = num_codebooks, codebook_size, code_dim
        self.beta = beta
        self.use_entropy_loss = entropy_loss
        self.entropy_temperature = entropy_temperature
        self.codebook = nn.Parameter(torch.randn(num_codebooks, codebook_size, code_dim))
        self.register_buffer('vocab_usage', torch.zeros(num_codebooks, codebook_size))
        # Forward passes that updated the running usage (python-side in the official code).
        self.register_buffer('usage_updates', torch.zeros((), dtype=torch.long), persistent=False)
        # Offsets that turn per-sub-codebook ids into rows of the flattened (K*n, d) table.
        self.register_buffer('_offsets', torch.arange(num_codebooks) * codebook_size, persistent=False)
        self.register_load_state_dict_pre_hook(_from_official_layout)

    def extra_repr(self) -> str:
        return (f'num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, '
                f'code_dim={self.code_dim}, beta={self.beta:g}')

    # ------------------------------------------------------------------ tables
    def normalized_codebooks(self) -> torch.Tensor:
        """Unit-norm code vectors, (K, n, d) float32."""
        return F.normalize(self.codebook.float(), dim=-1)

    @torch.no_grad()
    def init_codebooks(self, scale: float = 1.0) -> None:
        """Uniform init in +-scale * d^-0.5 / 36, the official ``vocab_init=-1`` rule."""
        bound = abs(scale) * self.code_dim ** -0.5 / 36
        self.codebook.uniform_(-bound, bound)

    # ------------------------------------------------------------------ codes <-> vectors
    def _split(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 3 or latents.shape[-1] != self.num_codebooks * self.code_dim:
            raise ValueError(f'quantizer expects latents (B, L, {self.num_codebooks * self.code_dim}), '
                             f'got {tuple(latents.shape)}')
        B, L, _ = latents.shape
        return F.normalize(latents.float().reshape(B, L, self.num_codebooks, self.code_dim), dim=-1)  # (B, L, K, d)

    @torch.no_grad()
    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """Code ids of the most similar codes, (B, L, K*d) -> (B, K, L) int64."""
        with torch.autocast(latents.device.type, enabled=False):
            z = self._split(latents)
            B, L = z.shape[:2]
            codes = _nearest(z.view(B * L, self.num_codebooks, self.code_dim).transpose(0, 1),
                             self.normalized_codebooks())           # (K, N)
        return codes.view(self.num_codebooks, B, L).transpose(0, 1)  # (B, K, L)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Unit code vectors for code ids: (B, K, L) -> (B, L, K*d) float32. Inverse of :meth:`nearest_codes`."""
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f'codes must be (B, {self.num_codebooks}, L), got {tuple(codes.shape)}')
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise TypeError(f'codes must be an integer tensor, got {codes.dtype}')
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f'codes must lie in [0, {self.codebook_size}), got values in '
                             f'[{int(codes.min())}, {int(codes.max())}]')
        B, K, L = codes.shape
        rows = codes.long().transpose(1, 2) + self._offsets         # (B, L, K) rows of the stacked table
        table = self.normalized_codebooks().view(K * self.codebook_size, self.code_dim)
        return F.embedding(rows, table).view(B, L, K * self.code_dim)

    # ------------------------------------------------------------------ training forward
    def forward(self, latents: torch.Tensor, update_usage: bool | None = None) -> QuantizerOutput:
        """Quantize ``latents`` (B, L, K*d); always in float32, whatever the autocast state.

        ``update_usage`` (default: ``self.training``) folds this batch's code histogram into
        :attr:`vocab_usage`; in distributed training the histogram is summed over ranks first.
        """
        update_usage = self.training if update_usage is None else update_usage
        with torch.autocast(latents.device.type, enabled=False):
            z = self._split(latents)                                # (B, L, K, d)
            B, L, K, d = z.shape
            table = self.normalized_codebooks()                     # (K, n, d)
            with torch.no_grad():
                codes = _nearest(z.detach().view(B * L, K, d).transpose(0, 1), table)  # (K, N)
            rows = codes.transpose(0, 1) + self._offsets            # (N, K)
            q = F.embedding(rows, table.view(K * self.codebook_size, d)).view(B, L, K, d)
            commitment = F.mse_loss(q.detach(), z) * self.beta + F.mse_loss(q, z.detach())
            entropy = (_entropy_loss(z.view(B * L, K, d).transpose(0, 1), table, self.entropy_temperature)
                       if self.use_entropy_loss else z.new_zeros(()))
            # Straight-through estimator; without autograd the codes themselves (so lookup(codes) == quantized).
            quantized = (q.detach() - z.detach()) + z if z.requires_grad else q
            stats = self._batch_stats(codes, update_usage)
        return QuantizerOutput(
            quantized=quantized.view(B, L, K * d),
            codes=codes.view(K, B, L).transpose(0, 1),
            losses={'commitment': commitment, 'entropy': entropy},
            stats=stats,
        )

    @torch.no_grad()
    def code_histogram(self, codes: torch.Tensor) -> torch.Tensor:
        """Counts of each code, (K, n) float32, from codes (K, N)."""
        K, n = self.num_codebooks, self.codebook_size
        return torch.bincount((codes + self._offsets[:, None]).flatten(), minlength=K * n).view(K, n).float()

    @torch.no_grad()
    def _batch_stats(self, codes: torch.Tensor, update_usage: bool) -> dict[str, torch.Tensor]:
        counts = self.code_histogram(codes)                          # (K, n)
        if update_usage and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        freq = counts / counts.sum(-1, keepdim=True)
        usage = (freq > 0.01 / self.codebook_size).float().mean(-1)  # (K,)
        entropy = -(freq * torch.log(freq.clamp_min(1e-30))).sum(-1)
        if update_usage:
            self._update_usage(freq)
        return {'usage': usage, 'perplexity': entropy.exp()}

    def _update_usage(self, freq: torch.Tensor) -> None:
        # Official schedule: copy on the first update, EMA 0.9 for the next 99, then EMA 0.99.
        n_done = int(self.usage_updates)
        if n_done == 0:
            self.vocab_usage.copy_(freq)
        else:
            momentum = 0.9 if n_done < 100 else 0.99
            self.vocab_usage.mul_(momentum).add_(freq, alpha=1 - momentum)
        self.usage_updates += 1


def _from_official_layout(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: stack official per-sub-codebook entries into ``codebook``/``vocab_usage``."""
    for ours, theirs in (('codebook', 'codebook.weight'), ('vocab_usage', 'vocab_usage')):
        keys = [f'{prefix}codebooks.{k}.{theirs}' for k in range(module.num_codebooks)]
        if prefix + ours not in state_dict and all(k in state_dict for k in keys):
            state_dict[prefix + ours] = torch.stack([state_dict.pop(k) for k in keys])


def to_official_layout(state_dict: dict, prefix: str = 'quantizer.') -> dict:
    """Inverse of the loading hook: split ``codebook``/``vocab_usage`` into official per-sub-codebook keys."""
    out = {}
    for key, value in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name == 'codebook':
            out.update({f'{prefix}codebooks.{k}.codebook.weight': v for k, v in enumerate(value.unbind(0))})
        elif name == 'vocab_usage':
            out.update({f'{prefix}codebooks.{k}.vocab_usage': v for k, v in enumerate(value.unbind(0))})
        else:
            out[key] = value
    return out


def _nearest(z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """argmax_j <z[k, i], table[k, j]> for every k, i: z (K, N, d), table (K, n, d) -> (K, N) int64.

    Exactly ``torch.argmax`` of the float32 similarities (first index among equal maxima), but fast
    on CPU, where the (K, N, n) similarity matrix of released sizes is far larger than the caches and
    ``argmax`` itself is slow. Tokens are scored in tiles that stay in cache, as (K, n, tile) so that
    every reduction runs over an outer axis and vectorises over the tokens, and the argmax is found
    with max-reductions only: the best block of codes, then the first position equal to the maximum.
    """
    K, N, d = z.shape
    n = table.shape[1]
    block = next((b for b in (32, 64, 16, 128) if n % b == 0 and n > b), n)
    n_blocks = n // block
    z_t = z.transpose(1, 2).contiguous()                               # (K, d, N)
    table = table.contiguous()
    # Among positions equal to the maximum, the first one gets the largest weight.
    block_weight = torch.arange(n_blocks, 0, -1, dtype=torch.float32, device=z.device).view(1, n_blocks, 1)
    code_weight = torch.arange(block, 0, -1, dtype=torch.float32, device=z.device).view(1, block, 1)
    tile = max(1, min(N, _SEARCH_TILE // max(1, K * n)))
    out = torch.empty(K, N, dtype=torch.long, device=z.device)
    buffer = torch.empty(K, n, tile, device=z.device)   # reused: fresh large allocations page-fault
    for s in range(0, N, tile):
        t = min(tile, N - s)
        sims = torch.bmm(table, z_t[:, :, s:s + t], out=buffer[:, :, :t]).view(K, n_blocks, block, t)  # (K, nb, blk, t)
        block_max = sims.amax(2)                                                      # (K, nb, t)
        best = block_max.amax(1, keepdim=True)                                        # (K, 1, t)
        b_idx = n_blocks - ((block_max == best) * block_weight).amax(1, keepdim=True).long()
        b_idx.clamp_(0, n_blocks - 1)                                                 # NaN rows: any code
        winner = sims.gather(1, b_idx[:, :, None].expand(K, 1, block, t)).squeeze(1)  # (K, blk, t)
        c_idx = (block - ((winner == best) * code_weight).amax(1).long()).clamp_(0, block - 1)
        out[:, s:s + t] = b_idx.squeeze(1) * block + c_idx
    return out


def _entropy_loss(z: torch.Tensor, table: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over sub-codebooks of (per-sample entropy - entropy of the mean assignment).

    z (K, N, d), table (K, n, d); soft assignments are a softmax over negative squared distances.
    """
    dist2 = z.square().sum(-1, keepdim=True) + table.square().sum(-1)[:, None, :] - 2 * torch.bmm(z, table.transpose(1, 2))
    logits = -dist2 / temperature                                     # (K, N, n)
    prob, log_prob = logits.softmax(-1), logits.log_softmax(-1)
    per_sample = (-(prob * log_prob).sum(-1)).mean(-1)                # (K,)
    mean_prob = prob.mean(1)                                          # (K, n)
    codebook = -(mean_prob * torch.log(mean_prob + 1e-7)).sum(-1)     # (K,)
    return (per_sample - codebook).mean()
