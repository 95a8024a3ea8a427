"""Seeds derived from integers, the same in every process and on every platform."""
from __future__ import annotations

import hashlib


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & ((1 << 63) - 1)
