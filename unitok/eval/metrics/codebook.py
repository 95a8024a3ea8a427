"""Codebook health over an evaluation set: per-sub-codebook usage, perplexity, entropy, dead codes,
and the number of distinct K-tuples of codes (the effective vocabulary of multi-codebook tokens).

A ``torchmetrics.Metric`` with exact integer states: code counts (summed over processes) and the
distinct K-tuples seen (concatenated over processes, de-duplicated in ``compute``), so the result
does not depend on batching or on the number of processes.

For the quantizers without a learned codebook (FSQ, LFQ, BSQ: :mod:`unitok.quantizers`) sub-code k
is group k of the latent's dims, so usage, perplexity and dead codes are those of the values each
group takes; for residual VQ sub-code k is level k.
"""
from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class CodebookStats(Metric):
    """``update(codes (B, K, ...))``; ``compute()`` -> dict (see :meth:`compute`).

    Args:
        num_codebooks, codebook_size: K sub-codebooks of ``codebook_size`` codes each.
        sync_on_compute: merge the states of every rank of ``process_group`` in ``compute``
            (collectives); default ``False``: this process's codes only, no collective.
        process_group: the group to merge over (``None``: the default group).
    """

    full_state_update = False

    def __init__(self, num_codebooks: int, codebook_size: int, sync_on_compute: bool = False, process_group=None):
        super().__init__(sync_on_compute=sync_on_compute, process_group=process_group)
        if num_codebooks < 1 or codebook_size < 1:
            raise ValueError(f'CodebookStats needs num_codebooks, codebook_size >= 1, got {num_codebooks}, {codebook_size}')
        self.K, self.n = num_codebooks, codebook_size
        # Each token's K-tuple packed exactly into int64 columns (63 bits each) for distinct counting.
        self.bits = max(1, math.ceil(math.log2(codebook_size)))
        self.per_column = max(1, 63 // self.bits)
        self.columns = math.ceil(num_codebooks / self.per_column)
        self.add_state('counts', torch.zeros(num_codebooks, codebook_size, dtype=torch.long), dist_reduce_fx='sum')
        self.add_state('tuples', [], dist_reduce_fx='cat')      # (rows, columns) int64, unique per update

    @classmethod
    def for_quantizer(cls, quantizer, **kwargs) -> 'CodebookStats':
        """The statistics of the codes of ``quantizer`` (a :class:`~unitok.quantizers.Quantizer` whose
        sub-codes share one vocabulary size)."""
        sizes = set(quantizer.vocab_sizes)
        if len(sizes) != 1:
            raise ValueError(f'CodebookStats needs sub-codes of one vocabulary size, got {quantizer.vocab_sizes}')
        return cls(quantizer.num_codebooks, sizes.pop(), **kwargs)

    def update(self, codes: torch.Tensor) -> None:
        """codes: ``(B, K, ...)`` integer code ids."""
        c = codes.detach().to(self.counts.device).long().reshape(codes.shape[0], self.K, -1)    # (B, K, L)
        flat = c.transpose(0, 1).reshape(self.K, -1)                                             # (K, B*L)
        offsets = torch.arange(self.K, device=flat.device)[:, None] * self.n
        self.counts += torch.bincount((flat + offsets).flatten(), minlength=self.K * self.n).view(self.K, self.n)
        columns = []
        for start in range(0, self.K, self.per_column):
            col = torch.zeros(flat.shape[1], dtype=torch.long, device=flat.device)
            for k in range(start, min(self.K, start + self.per_column)):
                col = (col << self.bits) | flat[k]
            columns.append(col)
        self.tuples.append(torch.unique(torch.stack(columns, 1), dim=0))

    def sync(self, *args, **kwargs) -> None:
        # A rank that saw no codes still takes part in the gather with an empty (0, columns) int64
        # block (torchmetrics would otherwise send a float32 placeholder of another shape).
        if isinstance(self.tuples, list) and not self.tuples:
            self.tuples.append(torch.zeros(0, self.columns, dtype=torch.long, device=self.counts.device))
        super().sync(*args, **kwargs)

    def compute(self) -> dict:
        """``{'codebook_usage', 'codebook_perplexity', 'codebook_entropy_bits', 'dead_codes',
        'distinct_code_tuples', 'tokens'}`` (numbers), ``'per_codebook'`` (a list of K dicts) and
        ``'counts'`` (the ``(K, codebook_size)`` int64 counts)."""
        tuples = self.tuples if isinstance(self.tuples, torch.Tensor) else (
            torch.cat(self.tuples) if self.tuples else torch.zeros(0, self.columns, dtype=torch.long))
        distinct = int(torch.unique(tuples.reshape(-1, self.columns), dim=0).shape[0]) if tuples.numel() else 0
        counts = self.counts.double()
        total = counts.sum(-1, keepdim=True).clamp_min(1)
        p = counts / total
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)                  # nats
        used = (self.counts > 0).sum(-1)
        return {
            'codebook_usage': float(used.double().mean() / self.n),
            'codebook_perplexity': float(entropy.exp().mean()),
            'codebook_entropy_bits': float(entropy.mean() / math.log(2)),
            'dead_codes': int((self.n - used).sum()),
            'distinct_code_tuples': distinct,
            'tokens': int(self.counts[0].sum()),
            'per_codebook': [{'usage': float(u / self.n), 'perplexity': float(e.exp()),
                              'entropy_bits': float(e / math.log(2)), 'dead_codes': int(self.n - u)}
                             for u, e in zip(used, entropy)],
            'counts': self.counts.clone().cpu(),
        }
