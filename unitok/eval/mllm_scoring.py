"""The MLLM evaluation's classifier and control: summed answer log-likelihoods with one KV-cached
prefix per image, and the derangement that swaps every image for one of another class."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from .loading import MLLMEvalError


def crossing_derangement(labels: Sequence[int], seed: int = 0) -> list[int]:
    """A seeded permutation ``partner`` of ``range(len(labels))`` with ``labels[partner[i]] != labels[i]``
    for every ``i``: items grouped by class (classes and items in seeded random order), then shifted by
    the size of the largest class. Needs no class holding more than half of the items."""
    n = len(labels)
    counts = Counter(int(v) for v in labels)
    largest = max(counts.values()) if counts else 0
    if n < 2 or 2 * largest > n:
        raise MLLMEvalError(f'the swapped-image control needs items of several classes, none holding more than half '
                            f'of them; got {n} items with class counts {dict(sorted(counts.items()))}: evaluate more '
                            'items (--max-items)')
    g = torch.Generator().manual_seed(seed)
    class_key = dict(zip(sorted(counts), torch.randperm(len(counts), generator=g).tolist()))
    item_key = torch.randperm(n, generator=g).tolist()
    order = sorted(range(n), key=lambda i: (class_key[int(labels[i])], item_key[i]))
    partner = [0] * n
    for p, i in enumerate(order):
        partner[i] = order[(p + largest) % n]
    return partner


@torch.no_grad()
def answer_log_likelihoods(model, codes: torch.Tensor, question: str, answers: Sequence[str]) -> torch.Tensor:
    """Summed log-likelihoods ``(B, C)`` float64 of each answer (its tokens and the end-of-turn token,
    the training target of :meth:`~unitok.mllm.UniTokMLLM.understanding_example`) given each image's
    codes ``(B, K, h, w)`` and ``question``. One pass over the B prefixes (image + question), whose KV
    cache is repeated for the C answers, run as one right-padded batch of B * C rows."""
    from transformers import DynamicCache

    from ..mllm.data import IGNORE
    if not answers:
        raise MLLMEvalError('answer_log_likelihoods needs at least one answer')
    B, C = codes.shape[0], len(answers)
    device = model.device
    examples = [model.understanding_example(c, question) for c in codes]
    P = len(examples[0]['input_ids'])
    targets = []
    for a in answers:
        full = model.understanding_example(codes[0], question, a)
        labels = full['labels']
        targets.append(labels[labels != IGNORE])                 # answer tokens + end of turn
        if not torch.equal(full['input_ids'][:P], examples[0]['input_ids']):
            raise MLLMEvalError(f'the answer {a!r} changes the tokens of the question before it')
    ids = torch.stack([e['input_ids'] for e in examples]).to(device)               # (B, P)
    image = torch.stack([e['image_mask'] for e in examples]).to(device)
    grid = torch.stack([e['codes'] for e in examples]).to(device)                  # (B, P, K)
    mask = torch.ones_like(ids)
    positions = torch.arange(P, device=device).expand(B, P)
    was = model.training
    model.eval()
    try:
        cache = DynamicCache(config=model.llm.config)
        h = model.hidden_states(model.embed(ids, image, grid), mask, positions, cache)[:, -1]   # (B, D)
        first = model.text_logits(h).float().log_softmax(-1)                        # (B, V)
        T = max(len(t) for t in targets)
        out = torch.zeros(B, C, dtype=torch.float64, device=device)
        for c, t in enumerate(targets):
            out[:, c] = first[:, int(t[0])].double()
        if T > 1:
            # the inputs after the prefix: every answer but its last token, right-padded (B*C, T-1)
            inputs = torch.zeros(C, T - 1, dtype=torch.long)
            valid = torch.zeros(C, T - 1, dtype=torch.bool)
            for c, t in enumerate(targets):
                inputs[c, :len(t) - 1] = t[:-1]
                valid[c, :len(t) - 1] = True
            inputs, valid = inputs.repeat(B, 1).to(device), valid.repeat(B, 1).to(device)
            cache.batch_repeat_interleave(C)                                        # row b -> rows b*C..b*C+C-1
            full_mask = torch.cat([mask.repeat_interleave(C, 0), valid.long()], dim=1)
            pos = (P + torch.arange(T - 1, device=device)).expand(B * C, T - 1)
            hh = model.hidden_states(model.embed(inputs), full_mask, pos, cache)   # (B*C, T-1, D)
            logp = model.text_logits(hh).float().log_softmax(-1)                    # (B*C, T-1, V)
            nxt = torch.zeros(C, T - 1, dtype=torch.long)
            for c, t in enumerate(targets):
                nxt[c, :len(t) - 1] = t[1:]
            nxt = nxt.repeat(B, 1).to(device)
            rest = logp.gather(-1, nxt[..., None])[..., 0].double() * valid       # (B*C, T-1)
            out += rest.sum(1).view(B, C)
    finally:
        model.train(was)
    return out.cpu()
