"""Batches of MLLM sequences: right-padded, with the masks :meth:`UniTokMLLM.forward` reads."""
from __future__ import annotations

import torch

IGNORE = -100


def collate(examples: list[dict], pad_id: int = 0, length: int | None = None) -> dict[str, torch.Tensor]:
    """Examples of :meth:`UniTokMLLM.understanding_example` / ``generation_example`` -> one batch,
    right-padded to the longest (or to ``length``; ``attention_mask`` 0 on padding, which carries no target)."""
    if not examples:
        raise ValueError('cannot collate an empty list of examples')
    T = max(len(e['input_ids']) for e in examples)
    if length is not None:
        if T > length:
            raise ValueError(f'a sequence of {T} tokens does not fit the length {length}')
        T = length
    B, K = len(examples), examples[0]['codes'].shape[1]
    out = {'input_ids': torch.full((B, T), pad_id, dtype=torch.long),
           'attention_mask': torch.zeros(B, T, dtype=torch.long),
           'image_mask': torch.zeros(B, T, dtype=torch.bool),
           'codes': torch.zeros(B, T, K, dtype=torch.long),
           'labels': torch.full((B, T), IGNORE, dtype=torch.long),
           'image_targets': torch.zeros(B, T, dtype=torch.bool)}
    for i, e in enumerate(examples):
        n = len(e['input_ids'])
        out['attention_mask'][i, :n] = 1
        for k in ('input_ids', 'image_mask', 'codes', 'labels', 'image_targets'):
            out[k][i, :n] = e[k]
    return out
