"""Learning-rate and GAN schedules as pure functions of the step (so resuming needs no state)."""
from __future__ import annotations

import math


def cosine_factor(step: int, total: int, warmup: int, start_ratio: float = 0.0, end_ratio: float = 0.1) -> float:
    """Linear warm-up from ``start_ratio`` to 1 over ``warmup`` steps, then cosine decay to ``end_ratio``
    at the last step (the official ``cos`` schedule)."""
    if step < warmup:
        return start_ratio + (1 - start_ratio) * step / warmup
    past = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return end_ratio + (1 - end_ratio) * (0.5 + 0.5 * math.cos(math.pi * past))


def gan_schedule(step: int, start: int, warmup: int) -> tuple[float, float]:
    """``(ramp, blur)`` of the adversarial loss at ``step``: the GAN weight ramps 0 -> 1 over ``warmup``
    steps after ``start``; the blur of discriminator inputs fades 1 -> 0 over twice that."""
    since = step - start
    if since < 0:
        return 0.0, 0.0
    warmup = max(1, warmup)
    return min(1.0, since / warmup), 1.0 - min(1.0, since / (2 * warmup))
