"""Codebook health over an evaluation set: per-sub-codebook usage, perplexity, entropy, dead codes,
and the number of distinct K-tuples of codes (the effective vocabulary of multi-codebook tokens)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist



class CodebookStats:
    def __init__(self, num_codebooks: int, codebook_size: int):
        self.K, self.n = num_codebooks, codebook_size
        self.counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.long)
        # Each token's K-tuple packed exactly into int64 columns (63 bits each) for distinct counting.
        self.bits = max(1, math.ceil(math.log2(codebook_size)))
        self.per_column = max(1, 63 // self.bits)
        self.tuples: list[torch.Tensor] = []

    def update(self, codes: torch.Tensor) -> None:
        """codes: (B, K, ...) integer code ids."""
        c = codes.detach().cpu().long().reshape(codes.shape[0], self.K, -1)     # (B, K, L)
        flat = c.transpose(0, 1).reshape(self.K, -1)                              # (K, B*L)
        offsets = torch.arange(self.K)[:, None] * self.n
        self.counts += torch.bincount((flat + offsets).flatten(), minlength=self.K * self.n).view(self.K, self.n)
        columns = []
        for start in range(0, self.K, self.per_column):
            col = torch.zeros(flat.shape[1], dtype=torch.long)
            for k in range(start, min(self.K, start + self.per_column)):
                col = (col << self.bits) | flat[k]
            columns.append(col)
        self.tuples.append(torch.unique(torch.stack(columns, 1), dim=0))

    def _distinct(self) -> torch.Tensor:
        if not self.tuples:
            return torch.zeros(0, 1, dtype=torch.long)
        if len(self.tuples) == 1:        # every entry is already unique
            return self.tuples[0]
        return torch.unique(torch.cat(self.tuples), dim=0)

    def all_reduce(self) -> 'CodebookStats':
        rows = self._distinct()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.counts)
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, rows)
            rows = torch.unique(torch.cat(parts), dim=0)
        self.tuples = [rows]
        return self

    def summary(self) -> dict:
        counts = self.counts.double()
        total = counts.sum(-1, keepdim=True).clamp_min(1)
        p = counts / total
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)                  # nats
        used = (self.counts > 0).sum(-1)
        distinct = int(self._distinct().shape[0])
        tokens = int(self.counts[0].sum())
        return {
            'codebook_usage': float(used.double().mean() / self.n),
            'codebook_perplexity': float(entropy.exp().mean()),
            'codebook_entropy_bits': float(entropy.mean() / math.log(2)),
            'dead_codes': int((self.n - used).sum()),
            'distinct_code_tuples': distinct,
            'tokens': tokens,
            'per_codebook': [{'usage': float(u / self.n), 'perplexity': float(e.exp()),
                              'entropy_bits': float(e / math.log(2)), 'dead_codes': int(self.n - u)}
                             for u, e in zip(used, entropy)],
        }
