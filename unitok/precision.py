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
:func:`cast_for_inference`, :func:`keep_encoder_tail_fp32` and :func:`keep_encoder_convs_fp32` are the
fast-path policy itself: which parts of a :class:`~unitok.UniTok` a bfloat16/float16 cast leaves float32,
and the hooks that cast activations at the boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

__all__ = ['CodeAgreement', 'compare_codes', 'near_tie_bound', 'bf16_runs_in_hardware', 'INFERENCE_PRECISIONS',
           'check_precision', 'precision_of', 'check_model_dtype', 'cast_for_inference', 'keep_encoder_tail_fp32',
           'keep_encoder_convs_fp32', 'bf16_emulation_warning']

_U32 = 2.0 ** -24

#: Inference precisions by name (``--precision`` of ``unitok encode/decode/reconstruct/export-codes``)
#: and the :meth:`~unitok.UniTok.from_pretrained` arguments each one stands for. ``bf16`` is the fast
#: path; ``bf16-convs32`` the fast path with the encoder's convolutional stages kept float32, the
#: setting whose codes agree best with float32's (docs/RESULTS.md has the agreement and the cost).
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
    path is slower than float32 (docs/RESULTS.md, "Fast path on a CPU without bf16 units")."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == 'cpu':
        return bool(getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)()
                    or getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)())
    return True                                  # other backends: their own business



# ---------------------------------------------------------------------- the fast-path policy of UniTok
def check_model_dtype(dtype) -> torch.dtype:
    """``dtype`` if it is a model dtype (float32, bfloat16, float16, float64), else a ValueError."""
    allowed = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if dtype not in allowed:
        raise ValueError(f'model dtype must be one of torch.float32, torch.bfloat16 (the inference fast '
                         f'path), torch.float16 or torch.float64; got {dtype!r}')
    return dtype


def own_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def input_in_dtype_of(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``images`` in the dtype of ``module``'s parameters (float32 for the first conv of the fast path
    too); under autocast only float64 is cast, autocast handles the rest."""
    want = own_dtype(module)
    if images.dtype != want and (images.dtype == torch.float64 or not torch.is_autocast_enabled(images.device.type)):
        images = images.to(want)
    return images


def float32_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a part kept in float32 inside a reduced-precision model: its input in its own dtype."""
    return (args[0].to(own_dtype(module)), *args[1:])


def _output_like(reference: torch.Tensor, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of a part kept in float32 (``reference`` bound with functools.partial): its output in the
    dtype that ``reference``, a parameter of what takes the output next, has now."""
    return out.to(reference.dtype)


def bf16_emulation_warning(device: torch.device) -> str:
    return (f'bfloat16 on {device}: this device has no bf16 units (on a CPU: AVX512-BF16 or AMX), so PyTorch '
            'emulates bf16 matmuls and the bf16 fast path runs several times slower than float32 here; use '
            'float32 (--precision fp32)')


def cast_for_inference(model, *args, **kwargs) -> torch.dtype | None:
    """``nn.Module.to(model, *args, **kwargs)``, except that a bfloat16/float16 dtype casts the encoder,
    decoder and text tower only: ``model.FP32_PARTS``, the encoder's first convolution and the parts that
    :func:`keep_encoder_tail_fp32` / :func:`keep_encoder_convs_fp32` chose stay float32, with hooks that
    cast activations at their boundaries. Returns the reduced dtype, or None for any other cast."""
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    if dtype is None or dtype not in (torch.bfloat16, torch.float16):
        nn.Module.to(model, *args, **kwargs)
        if dtype is not None:
            _hook_first_conv(model, False)
        return None
    if device is not None or memory_format is not None:
        nn.Module.to(model, device=device, non_blocking=non_blocking, memory_format=memory_format)
    first = model.encoder.patch_embed.backbone.stem.conv1
    kept = [(p, p.data) for p in first.parameters()]          # its weights are not cast (restored below)
    depth, tail = len(model.encoder.blocks), model.fp32_encoder_tail
    for name, child in model.named_children():
        if name in model.FP32_PARTS:
            continue
        if name != 'encoder' or not (tail or model.fp32_encoder_convs):
            child.to(dtype)
            continue
        for sub, part in child.named_children():              # all but the float32 parts
            if sub == 'blocks':
                for block in part[:depth - tail]:
                    block.to(dtype)
            elif not ((sub == 'norm' and tail) or (sub == 'patch_embed' and model.fp32_encoder_convs)):
                part.to(dtype)
        for param in child.parameters(recurse=False):
            param.data = param.data.to(dtype)
    for param, data in kept:
        param.data = data
    _hook_first_conv(model, True)
    return dtype


def _hook_first_conv(model, enable: bool) -> None:
    """Hooks of the encoder's first conv in a reduced-precision model: input in its own dtype (the
    images, unrounded), output in the dtype of the stem's next layer."""
    for handle in getattr(model, '_first_conv_hooks', ()):
        handle.remove()
    model._first_conv_hooks = []
    if enable:
        stem = model.encoder.patch_embed.backbone.stem
        model._first_conv_hooks = [stem.conv1.register_forward_pre_hook(float32_input),
                                   stem.conv1.register_forward_hook(partial(_output_like, stem.norm1.weight))]


def keep_encoder_tail_fp32(model, blocks: int) -> None:
    """Run the last ``blocks`` encoder blocks and the encoder's final norm of ``model`` in float32
    (their input cast up), now and after later casts."""
    depth = len(model.encoder.blocks)
    if not isinstance(blocks, int) or isinstance(blocks, bool) or not 0 <= blocks <= depth:
        raise ValueError(f'blocks must be an int in [0, {depth}] (encoder depth), got {blocks!r}')
    handle = getattr(model, '_fp32_tail_hook', None)
    if handle is not None:
        handle.remove()
        model._fp32_tail_hook = None
    model.fp32_encoder_tail = blocks
    if blocks:
        for block in model.encoder.blocks[depth - blocks:]:
            block.float()
        model.encoder.norm.float()
        model._fp32_tail_hook = model.encoder.blocks[depth - blocks].register_forward_pre_hook(float32_input)


def keep_encoder_convs_fp32(model, enable: bool) -> None:
    """Run the encoder's convolutional stages (its patch embedding) of ``model`` in float32, now and after
    later casts; their output is cast to the dtype of the transformer blocks."""
    if not isinstance(enable, bool):
        raise ValueError(f'enable must be a bool, got {enable!r}')
    for handle in getattr(model, '_fp32_conv_hooks', ()):
        handle.remove()
    model._fp32_conv_hooks = []
    model.fp32_encoder_convs = enable
    embed = model.encoder.patch_embed
    if enable:
        embed.float()
        model._fp32_conv_hooks = [embed.register_forward_pre_hook(float32_input),
                                  embed.register_forward_hook(partial(_output_like, model.encoder.pos_embed))]


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
