"""Binary spherical quantization (BSQ, arXiv 2406.07548, the quantizer of QLIP): lookup-free
quantization of l2-normalised groups, so every code lies on the unit sphere of its group.

Each group of b dims is l2-normalised and quantized to sign(x) / sqrt(b); the codes, entropy and
commitment terms are those of :class:`~unitok.quantizers.lfq.LookupFreeQuantizer` on those unit groups
(the entropy term exact over the 2^b codes of a group, which is cheap at b = 9).
"""
from __future__ import annotations

from .lfq import LookupFreeQuantizer, build_binary
from .registry import register_quantizer


class BinarySphericalQuantizer(LookupFreeQuantizer):
    """:class:`LookupFreeQuantizer` on l2-normalised groups: codes +-1/sqrt(b) per dim."""

    name = 'bsq'
    spherical = True


@register_quantizer('bsq')
def _bsq(config) -> BinarySphericalQuantizer:
    return build_binary(BinarySphericalQuantizer, config)
