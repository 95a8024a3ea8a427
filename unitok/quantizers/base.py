"""The quantizer interface: latents -> codes and quantized latents, codes -> vectors.

Every quantizer of :mod:`unitok.quantizers` implements :class:`Quantizer`; the tokenizer, the code
export, the generator, the MLLM and the training tasks use only this interface. Axis legend: B batch,
L tokens, K sub-codes per token, D latent width, V_k vocabulary of sub-code k, d_k width of its vectors.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class QuantizerOutput:
    """Result of :meth:`Quantizer.forward`.

    Attributes:
        quantized: (B, L, D) the quantized latents. When the input requires grad this is the
            straight-through estimate ``z + sg(q - z)`` so gradients reach the encoder; otherwise
            exactly ``lookup(codes)``.
        codes: (B, K, L) int64 code ids, sub-code k indexes vocabulary k.
        losses: scalar losses; ``'commitment'`` is the quantizer loss the trainer weights with
            ``loss.quantizer``, ``'entropy'`` (optional) the one it weights with ``loss.entropy``.
        stats: detached statistics of this batch; ``'usage'`` (K,) (optional) is the share of each
            vocabulary in use, reported as the codebook usage.
    """
    quantized: torch.Tensor
    codes: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Quantizer(nn.Module):
    """Base class of the quantizers: K sub-codes per token, sub-code k drawn from a vocabulary of V_k.

    Subclasses set :attr:`num_codebooks`, :attr:`vocab_sizes` and :attr:`latent_dim` and implement
    :meth:`forward`, :meth:`nearest_codes`, :meth:`lookup` and :meth:`code_vectors`. The remaining
    methods have working defaults built on those.

    Attributes:
        num_codebooks: K, sub-codes per token.
        vocab_sizes: (V_0, ..., V_{K-1}), the vocabulary of each sub-code.
        latent_dim: D, width of the latents taken and returned.
        name: the registry name (see :mod:`unitok.quantizers.registry`), recorded by :meth:`identity`.
        sync_usage: sum running usage statistics over the processes of a distributed run (a trainer
            sets it when it runs several processes; quantizers without such statistics ignore it).
    """

    num_codebooks: int
    vocab_sizes: tuple[int, ...]
    latent_dim: int
    name: str = ''
    sync_usage: bool = False

    def forward(self, latents: torch.Tensor, update_usage: bool | None = None) -> QuantizerOutput:
        """Quantize latents (B, L, D); ``update_usage`` (default ``self.training``) updates running statistics."""
        raise NotImplementedError

    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """The encode path, without autograd: latents (B, L, D) -> codes (B, K, L) int64."""
        raise NotImplementedError

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, K, L) -> quantized latents (B, L, D) float32, after :meth:`check_codes`."""
        raise NotImplementedError

    def code_vectors(self, k: int) -> torch.Tensor:
        """What each code of sub-code k stands for: (V_k, d_k) float32."""
        raise NotImplementedError

    # ------------------------------------------------------------------ defaults
    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise one clear error unless ``codes`` is an integer (B, K, L) tensor with every sub-code k
        in [0, V_k)."""
        K = self.num_codebooks
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[1] != K:
            got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f'codes must be (B, {K}, L), got {got}')
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise TypeError(f'codes must be an integer tensor, got {codes.dtype}')
        if not codes.numel():
            return
        low, high = codes.amin(dim=(0, 2)).tolist(), codes.amax(dim=(0, 2)).tolist()   # (K,) each
        if len(set(self.vocab_sizes)) == 1:
            V = self.vocab_sizes[0]
            if min(low) < 0 or max(high) >= V:
                raise ValueError(f'codes must lie in [0, {V}), got values in [{min(low)}, {max(high)}]')
            return
        bad = [f'sub-code {k}: [{lo}, {hi}] not in [0, {V})'
               for k, (lo, hi, V) in enumerate(zip(low, high, self.vocab_sizes)) if lo < 0 or hi >= V]
        if bad:
            raise ValueError('codes out of range: ' + '; '.join(bad))

    def code_table(self) -> torch.Tensor:
        """All code vectors stacked, (K, V, d) float32; for quantizers whose sub-codes share V and d."""
        vectors = [self.code_vectors(k) for k in range(self.num_codebooks)]
        if len({tuple(v.shape) for v in vectors}) != 1:
            raise ValueError(f'the sub-codes of this quantizer differ in size {[tuple(v.shape) for v in vectors]}: '
                             'no single (K, V, d) table')
        return torch.stack(vectors)

    def identity(self) -> dict:
        """What consumers of codes compare: the registry name, the vocabularies and a sha256 of the
        float32 code vectors of every sub-code (JSON-able)."""
        name = self.name or type(self).__name__
        digest = hashlib.sha256(json.dumps([name, list(self.vocab_sizes)]).encode())
        with torch.no_grad():
            for k in range(self.num_codebooks):
                digest.update(self.code_vectors(k).detach().to('cpu', torch.float32).contiguous().numpy().tobytes())
        return {'quantizer': name, 'vocab_sizes': list(self.vocab_sizes), 'digest': digest.hexdigest()}

    def init_weights(self) -> None:
        """The initialisation of a training run from scratch (default: the constructor's)."""

    def configure_training(self, config) -> None:
        """Apply the training-only fields of a :class:`~unitok.UniTokConfig` to a loaded quantizer
        (the fields its state dict does not hold); default: nothing."""

    def materialize_non_persistent_buffers(self, device: torch.device) -> None:
        """Recreate the buffers that are not in the state dict on ``device`` (after building on the
        meta device)."""

    def extra_state(self) -> dict:
        """Training state outside the state dict that a resumed run needs (JSON-able)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` returned."""


@torch.no_grad()
def usage_stats(codes: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """Per-sub-code statistics of one batch of codes (K, N): ``'usage'`` (K,), the share of the
    vocabulary drawn more often than 1% of uniform, and ``'perplexity'`` (K,), exp of the entropy.

    For quantizers with implicit codebooks (FSQ, LFQ, BSQ) a sub-code is one group of dimensions, so
    this is the usage of each group's values."""
    K = codes.shape[0]
    offsets = torch.arange(K, device=codes.device)[:, None] * vocab_size
    counts = torch.bincount((codes + offsets).flatten(), minlength=K * vocab_size).view(K, vocab_size).float()
    freq = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(freq * torch.log(freq.clamp_min(1e-30))).sum(-1)
    return {'usage': (freq > 0.01 / vocab_size).float().mean(-1), 'perplexity': entropy.exp()}
