"""How faithful a reduced-precision model (e.g. the bf16 fast path) is to its float32 reference.

Near-tie rule. Both models search the same float32 codebook exactly (the fast path keeps the quantizer
and the projections into it float32), so a code can only change because the unit latent moved: let z and
z' be the reference and fast unit latents of one token in sub-codebook k, j* the reference code and
j' != j* the fast one. The fast search chose j', so <z', c_j' - c_j*> >= 0, hence the reference
similarity gap

    gap = <z, c_j*> - <z, c_j'> = <z - z', c_j* - c_j'> + <z', c_j* - c_j'> <= |z - z'| |c_j* - c_j'|

(Cauchy-Schwarz), plus the float32 rounding of the four dot products, each at most gamma_d =
d u / (1 - d u) with u = 2^-24 for unit vectors. A disagreement is a *near tie* when
gap <= |z - z'| |c_j* - c_j'| + 4 gamma_d; one that is not would mean that the search itself is not
faithful. :class:`CodeAgreement` also reports |z - z'| so the bound can be read as a number.

:func:`bf16_runs_in_hardware` says whether the fast path can be fast on a device at all.
:data:`INFERENCE_PRECISIONS` names the inference settings that the command line and the code exporter take.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ['CodeAgreement', 'compare_codes', 'near_tie_bound', 'bf16_runs_in_hardware', 'INFERENCE_PRECISIONS',
           'check_precision', 'precision_of']

_U32 = 2.0 ** -24

#: Inference precisions by name (``--precision`` of ``unitok encode/decode/reconstruct/export-codes``)
#: and the :meth:`~unitok.UniTok.from_pretrained` arguments each one stands for. ``bf16`` is the fast
#: path; ``bf16-convs32`` the fast path with the encoder's convolutional stages kept float32, the
#: setting whose codes agree with float32's for >= 99% of tokens in docs/RESULTS.md (0.4-0.7 points more
#: than ``bf16`` on two trained tokenizers, for 10-70% more encode time, depending on the CPU).
INFERENCE_PRECISIONS: dict[str, dict] = {
    'fp32': {},
    'bf16': {'dtype': torch.bfloat16},
    'bf16-convs32': {'dtype': torch.bfloat16, 'fp32_encoder_convs': True},
}


def check_precision(name: str) -> str:
    """``name`` if it is a key of :data:`INFERENCE_PRECISIONS`, else a ValueError naming them."""
    if name not in INFERENCE_PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(map(repr, INFERENCE_PRECISIONS))}; got {name!r}')
    return name


def precision_of(model) -> str | None:
    """The :data:`INFERENCE_PRECISIONS` name of a :class:`~unitok.UniTok`'s current setting, or None for
    a setting without a name (float16, float64, float32 encoder tail blocks)."""
    if model.dtype == torch.float32:
        return 'fp32'
    if model.dtype != torch.bfloat16 or model.fp32_encoder_tail:
        return None
    return 'bf16-convs32' if model.fp32_encoder_convs else 'bf16'


def bf16_runs_in_hardware(device: str | torch.device = 'cpu') -> bool:
    """Whether bf16 matmuls run on bf16 units of ``device``: on a CPU, AVX512-BF16 or AMX; on CUDA, a
    GPU with bf16 support. Elsewhere (e.g. an AVX2-only CPU) PyTorch emulates them, and the bf16 fast
    path is slower than float32: measured on a 2-core AVX2 AMD EPYC, a 1024^3 bf16 matmul ran at
    about 1 GFLOP/s against 107 in float32 (docs/RESULTS.md, "Fast path on a CPU without bf16 units")."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == 'cpu':
        return bool(getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)()
                    or getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)())
    return True                                  # other backends: their own business


@dataclass
class CodeAgreement:
    """Code agreement of a model with its float32 reference over ``decisions`` (token, sub-codebook) pairs.

    Attributes:
        decisions: tokens x sub-codebooks compared.
        equal: decisions with the same code.
        near_ties: disagreements within the near-tie bound (see the module docstring).
        not_near_ties: disagreements beyond it (0 when the search is faithful).
        max_gap: largest reference similarity gap among the disagreements (0 if none).
        max_shift: largest |z - z'| over all decisions (unit latents of the two models).
        median_shift: median |z - z'|.
    """
    decisions: int
    equal: int
    near_ties: int
    not_near_ties: int
    max_gap: float
    max_shift: float
    median_shift: float

    @property
    def agreement(self) -> float:
        """Share of decisions with equal codes."""
        return self.equal / max(self.decisions, 1)

    def merge(self, other: 'CodeAgreement') -> 'CodeAgreement':
        """Totals over two batches (the median shift is the decision-weighted mean of the two medians)."""
        n = self.decisions + other.decisions
        return CodeAgreement(
            n, self.equal + other.equal, self.near_ties + other.near_ties,
            self.not_near_ties + other.not_near_ties, max(self.max_gap, other.max_gap),
            max(self.max_shift, other.max_shift),
            (self.median_shift * self.decisions + other.median_shift * other.decisions) / max(n, 1))


def near_tie_bound(shift: torch.Tensor, code_distance: torch.Tensor, code_dim: int) -> torch.Tensor:
    """|z - z'| |c_j* - c_j'| + 4 gamma_d: the largest reference similarity gap a latent shift explains."""
    gamma = code_dim * _U32 / (1 - code_dim * _U32)
    return shift * code_distance + 4 * gamma


@torch.no_grad()
def compare_codes(reference, other, images: torch.Tensor) -> CodeAgreement:
    """Encode ``images`` with the float32 ``reference`` model and with ``other`` (e.g. the same weights
    after ``to(torch.bfloat16)``) and classify every code disagreement by the near-tie rule."""
    qr, qo = reference.quantizer, other.quantizer
    table = qr.normalized_codebooks()                                     # (K, n, d) float32
    if not torch.equal(table, qo.normalized_codebooks().to(table.device)):
        raise ValueError('compare_codes needs two models with the same codebooks (the same weights, '
                         'one of them cast: the fast path keeps the codebooks float32)')
    lat_r, _ = reference.encode_latents(images)
    lat_o, _ = other.encode_latents(images.to(other.device))
    lat_o = lat_o.to(lat_r.device)
    z_r, z_o = qr._split(lat_r), qr._split(lat_o)                         # (B, L, K, d) unit, float32
    c_r = qr.nearest_codes(lat_r).transpose(1, 2)                         # (B, L, K)
    c_o = qo.nearest_codes(lat_o).to(c_r.device).transpose(1, 2)
    shift = (z_r - z_o).norm(dim=-1)                                      # (B, L, K)
    differ = c_r != c_o
    b, l, k = differ.nonzero(as_tuple=True)
    z = z_r[b, l, k]                                                      # (m, d)
    best, chosen = table[k, c_r[b, l, k]], table[k, c_o[b, l, k]]         # (m, d)
    gap = (z * best).sum(-1) - (z * chosen).sum(-1)
    bound = near_tie_bound(shift[b, l, k], (best - chosen).norm(dim=-1), qr.code_dim)
    near = int((gap <= bound).sum())
    return CodeAgreement(
        decisions=differ.numel(), equal=int((~differ).sum()), near_ties=near,
        not_near_ties=int(differ.sum()) - near, max_gap=float(gap.max()) if gap.numel() else 0.0,
        max_shift=float(shift.max()), median_shift=float(shift.median()))
