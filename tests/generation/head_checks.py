"""The contract every depth head keeps: stepping through the K sub-codes with a cache gives the
teacher-forced logits, and step k reads only sub-codes before k."""
import torch


def stepped_and_changed(head, h: torch.Tensor, codes: torch.Tensor, vocab: int):
    """``(teacher-forced logits, logits of the cached step-by-step path, teacher-forced logits with
    sub-code 1 changed)``, each ``(N, K, V)``."""
    n, k_total = codes.shape
    forced = head(h, codes)
    cache = head.allocate_cache(n, torch.float32, torch.device('cpu'))
    x, steps = head.first_input(h), []
    for k in range(k_total):
        steps.append(head.step(x, k, cache))
        if k < k_total - 1:
            x = head.code_input(codes[:, k], k + 1)
    other = codes.clone()
    other[:, 1] = (other[:, 1] + 1) % vocab
    return forced, torch.stack(steps, 1), head(h, other)
