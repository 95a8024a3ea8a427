"""Multi-codebook vector quantization (UniTok, arXiv 2502.20321, section 3.2).

A latent token of width ``K * d`` is split into K chunks of width d; chunk k is l2-normalised and
replaced by the most similar (cosine) l2-normalised code of its own sub-codebook k. With K
sub-codebooks of n codes the token can take n^K values while each lookup stays small. The exact
nearest-code search lives in :mod:`.search`.

Axis legend: B batch, L tokens, K sub-codebooks, n codes per sub-codebook, d code width, N = B * L.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .base import Quantizer, QuantizerOutput
from .search import _nearest, _SearchTable


class MultiCodebookQuantizer(Quantizer):
    """K sub-codebooks of ``codebook_size`` codes of width ``code_dim``, searched by cosine similarity.

    Args:
        num_codebooks: K.
        codebook_size: n, codes per sub-codebook.
        code_dim: d, width of each code; inputs are (B, L, K*d).
        beta: commitment weight.
        entropy_loss: compute the entropy regulariser (per-sample entropy minus codebook entropy).
        entropy_temperature: softmax temperature of that regulariser.
        sync_usage: sum each batch's code histogram over the processes of ``process_group`` before the
            usage statistics and the running :attr:`vocab_usage` are updated (what the official code does
            in distributed training). This is a collective: with it on, every process must run the same
            number of usage-updating forwards. Off by default, so that no forward pass ever talks to
            other processes unless asked; a trainer turns it on (``quantizer.sync_usage = True``) when
            it runs several processes. Without an initialised process group it does nothing.
        process_group: the group of that all-reduce; None is the default group.

    State dict: ``codebook`` (K, n, d) and the running code frequency ``vocab_usage`` (K, n). The
    official release stores them per sub-codebook (``codebooks.{k}.codebook.weight``,
    ``codebooks.{k}.vocab_usage``); such state dicts are accepted by ``load_state_dict`` as they are,
    and :func:`to_official_layout` converts back.
    """

    name = 'multi_codebook'

    def __init__(self, num_codebooks: int, codebook_size: int, code_dim: int, beta: float = 0.25,
                 entropy_loss: bool = False, entropy_temperature: float = 0.01, sync_usage: bool = False,
                 process_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.num_codebooks, self.codebook_size, self.code_dim = num_codebooks, codebook_size, code_dim
        self.vocab_sizes = (codebook_size,) * num_codebooks
        self.latent_dim = num_codebooks * code_dim
        self.beta = beta
        self.sync_usage = sync_usage
        self.process_group = process_group
        self.use_entropy_loss = entropy_loss
        self.entropy_temperature = entropy_temperature
        self.codebook = nn.Parameter(torch.randn(num_codebooks, codebook_size, code_dim))
        self.register_buffer('vocab_usage', torch.zeros(num_codebooks, codebook_size))
        # Forward passes that updated the running usage (python-side in the official code).
        self.register_buffer('usage_updates', torch.zeros((), dtype=torch.long), persistent=False)
        # Offsets that turn per-sub-codebook ids into rows of the flattened (K*n, d) table.
        self.register_buffer('_offsets', torch.arange(num_codebooks) * codebook_size, persistent=False)
        self.register_load_state_dict_pre_hook(_from_official_layout)
        self._search_cache: tuple[torch.Tensor, _SearchTable] | None = None

    def extra_repr(self) -> str:
        return (f'num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, '
                f'code_dim={self.code_dim}, beta={self.beta:g}')

    # ------------------------------------------------------------------ tables
    def normalized_codebooks(self) -> torch.Tensor:
        """Unit-norm code vectors, (K, n, d) float32."""
        return F.normalize(self.codebook.float(), dim=-1)

    def code_vectors(self, k: int) -> torch.Tensor:
        """The unit code vectors of sub-codebook k, (n, d) float32."""
        return self.normalized_codebooks()[k]

    def code_table(self) -> torch.Tensor:
        """All unit code vectors, (K, n, d) float32."""
        return self.normalized_codebooks()

    @torch.no_grad()
    def _search_table(self) -> _SearchTable:
        """The normalised codebooks prepared for the nearest-code search, rebuilt when the codebook changed.

        A copy of the raw codebook is the key: comparing it (~1 MB at released sizes) costs far less than
        the preparation, and holds whatever changed the codebook (optimizer steps, load_state_dict,
        sharded all-gathers).
        """
        raw = self.codebook.detach()
        cached = self._search_cache
        if (cached is None or cached[0].shape != raw.shape or cached[0].dtype != raw.dtype
                or cached[0].device != raw.device or not torch.equal(cached[0], raw)):
            cached = (raw.clone(), _SearchTable(F.normalize(raw.float(), dim=-1)))
            self._search_cache = cached
        return cached[1]

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
        """Code ids of the most similar codes, (B, L, K*d) -> (B, K, L) int64: the float32 argmax (first
        index among equal maxima), under autocast and whatever ``torch.set_float32_matmul_precision`` says."""
        with torch.autocast(latents.device.type, enabled=False):
            z = self._split(latents)
            B, L = z.shape[:2]
            codes = _nearest(z.view(B * L, self.num_codebooks, self.code_dim).transpose(0, 1),
                             self._search_table())                 # (K, N)
        return codes.view(self.num_codebooks, B, L).transpose(0, 1)  # (B, K, L)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Unit code vectors for code ids: (B, K, L) -> (B, L, K*d) float32. Inverse of :meth:`nearest_codes`."""
        self.check_codes(codes)
        B, K, L = codes.shape
        rows = codes.long().transpose(1, 2) + self._offsets         # (B, L, K) rows of the stacked table
        table = self.normalized_codebooks().view(K * self.codebook_size, self.code_dim)
        return F.embedding(rows, table).view(B, L, K * self.code_dim)

    # ------------------------------------------------------------------ training forward
    def forward(self, latents: torch.Tensor, update_usage: bool | None = None) -> QuantizerOutput:
        """Quantize ``latents`` (B, L, K*d); always in float32, whatever the autocast state.

        ``update_usage`` (default: ``self.training``) folds this batch's code histogram into
        :attr:`vocab_usage`; with :attr:`sync_usage` the histogram is summed over the processes first.
        """
        update_usage = self.training if update_usage is None else update_usage
        with torch.autocast(latents.device.type, enabled=False):
            z = self._split(latents)                                # (B, L, K, d)
            B, L, K, d = z.shape
            table = self.normalized_codebooks()                     # (K, n, d)
            with torch.no_grad():
                # The table normalised above, not the cached one: in training the codebook changes at
                # every step, so the cache would only add a copy and a comparison.
                codes = _nearest(z.detach().view(B * L, K, d).transpose(0, 1), table.detach())  # (K, N)
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
        if update_usage and self.sync_usage and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, group=self.process_group)
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

    def init_weights(self) -> None:
        self.init_codebooks()

    def configure_training(self, config) -> None:
        self.use_entropy_loss = config.entropy_loss

    def materialize_non_persistent_buffers(self, device: torch.device) -> None:
        self.usage_updates = torch.zeros((), dtype=torch.long, device=device)
        self._offsets = torch.arange(self.num_codebooks, device=device) * self.codebook_size

    def extra_state(self) -> dict:
        return {'usage_updates': int(self.usage_updates)}

    def load_extra_state(self, state: dict) -> None:
        self.usage_updates.fill_(state['usage_updates'])


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
