"""UniTok: a unified discrete image tokenizer for generation and understanding.

Paper: "UniTok: A Unified Tokenizer for Visual Generation and Understanding", Ma et al., 2025
(arXiv 2502.20321). Reference implementation: github.com/FoundationVision/UniTok (state-dict names
and numerics match it; see tests/test_golden.py).

Data flow (shapes for the released model, 256 px)::

    images (B, 3, H, W) in [-1, 1]
      -> encoder (ViTamin, /16)                  (B, Q + h*w, C)      C = 1024
      -> quant_proj                              (B, Q + h*w, K*d)    K*d = 8*8
      -> quantizer: codes (B, K, Q + h*w), quantized (B, Q + h*w, K*d)
      -> post_quant_proj                         (B, Q + h*w, C)
      -> decoder (grid h x w)                    (B, 3, H, W)
      mean over tokens -> fc_norm -> projection  (B, E) image embedding, E = 768
    texts -> BPE ids (N, 77) -> text_encoder     (N, E) text embedding
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import PRESETS, UniTokConfig
from .hub import official_release
from .images import check_images
from .model_card import unitok_model_card
from .modules.decoder import ViTaminDecoder
from .modules.encoder import VITAMIN_VARIANTS, build_encoder
from .modules.projection import build_projection
from .modules.text import build_text_tower, text_ids, tokenize
from .precision import (bf16_emulation_warning, bf16_runs_in_hardware, cast_for_inference, check_model_dtype,
                        input_in_dtype_of, keep_encoder_convs_fp32, keep_encoder_tail_fp32)
from .pretrained import CheckpointError, Pretrained
from .quantizers import QuantizerOutput, create_quantizer, to_official_layout
from .safe_pickle import read_official_checkpoint
from .sequence import flatten_codes
from .zero_shot import check_classifier, zero_shot_classifier


@dataclass
class UniTokOutput:
    """What :meth:`UniTok.forward` returns (the inputs of the training losses).

    Attributes:
        reconstruction: (b, 3, H, W) float32 decoder output of the first ``b = recon_batch_size`` images,
            not clamped; None when ``recon_batch_size == 0``.
        codes: (B, K, Q + h*w) int64 code ids (query tokens first).
        quantizer_loss: scalar commitment loss.
        entropy_loss: scalar entropy loss (0 unless ``config.entropy_loss``).
        codebook_usage: (K,) share of each sub-codebook's codes used by this batch.
        image_features: (B, E) unit-norm image embeddings (from the quantized tokens).
        text_features: (N, E) unit-norm text embeddings, or None without texts.
        logit_scale: scalar, the CLIP temperature ``exp(logit_scale)``.
    """
    reconstruction: torch.Tensor | None
    codes: torch.Tensor
    quantizer_loss: torch.Tensor
    entropy_loss: torch.Tensor
    codebook_usage: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor | None
    logit_scale: torch.Tensor


class UniTok(Pretrained, nn.Module):
    """The UniTok tokenizer: image <-> multi-codebook codes, plus CLIP-aligned image/text embeddings.

    Code layout: :meth:`encode` returns ``(B, K, h, w)`` int64 codes, ``h, w = H/p, W/p`` (p: the patch size),
    sub-codebook k in channel k. A model with ``num_query = Q > 0`` query tokens returns ``(B, K, Q + h*w)`` instead:
    the Q query codes first, then the grid in raster order (the grid alone cannot hold them); pass
    ``grid=(h, w)`` to :meth:`decode` for non-square images in that case.
    """
    config_class, model_kind = UniTokConfig, 'UniTok model'        # the save/load contract: unitok.pretrained

    def __init__(self, config: UniTokConfig):
        super().__init__()
        config.validate()
        self.config = config
        spec = VITAMIN_VARIANTS[config.encoder]
        width, latent, proj_heads = spec.embed_dim, config.latent_dim, max(1, spec.embed_dim // config.latent_dim)

        self.encoder = build_encoder(config.encoder, config.image_size, config.num_query, config.drop_path,
                                     config.patch_size)
        self.quant_proj = build_projection(config.projection, width, latent, proj_heads)
        self.quantizer = create_quantizer(config)
        self.post_quant_proj = build_projection(config.projection, latent, width, proj_heads)
        self.decoder = ViTaminDecoder(
            width, conv_dims=(spec.conv_dims[1], spec.conv_dims[0]), depth=config.decoder_depth or spec.depth,
            num_heads=spec.num_heads, conv_depths=config.decoder_conv_depths, num_query=config.num_query,
            drop_path=config.drop_path, patch_size=config.patch_size)
        self.text_encoder = build_text_tower(
            config.text_width, config.text_heads, config.text_layers, config.text_vocab_size,
            config.text_context_length, config.embed_dim)
        self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        self.projection = nn.Linear(width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.set_grad_checkpointing(config.grad_checkpointing)
        self.fp32_encoder_tail = 0          # see keep_encoder_tail_fp32
        self.fp32_encoder_convs = False     # see keep_encoder_convs_fp32

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_preset(cls, name: str, **overrides) -> 'UniTok':
        """A randomly initialised model from a named preset (see :data:`unitok.PRESETS`)."""
        return cls(UniTokConfig.from_preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, map_location: str | torch.device = 'cpu',
                        revision: str | None = None, dtype: torch.dtype | None = None,
                        fp32_encoder_tail: int = 0, fp32_encoder_convs: bool = False) -> 'UniTok':
        """Load a directory (``config.json`` + ``model.safetensors``), an official ``.pth`` release (read without
        executing pickled code) or a hub id of either (``'FoundationVision/unitok_tokenizer'``); else CheckpointError.
        ``dtype=torch.bfloat16`` (or float16) returns the inference fast path: see :meth:`to`;
        ``fp32_encoder_tail=n`` keeps the last n encoder blocks float32 (:meth:`keep_encoder_tail_fp32`);
        ``fp32_encoder_convs=True`` keeps the encoder's convolutional stages float32
        (:meth:`keep_encoder_convs_fp32`: the setting whose codes agree best with the float32 model's)."""
        model = cls._load_pretrained(path_or_hub_id, map_location, revision)
        if dtype is None:
            return model
        model.keep_encoder_tail_fp32(fp32_encoder_tail).keep_encoder_convs_fp32(fp32_encoder_convs)
        return model.to(check_model_dtype(dtype), _stacklevel=3)     # a warning points at the caller

    @classmethod
    def _load_other(cls, path: str, map_location, **options) -> 'UniTok | None':
        if os.path.isfile(path):                          # not .safetensors: an official release file
            return cls._from_state(*read_official_checkpoint(path, map_location), where=repr(path))
        if path in PRESETS:
            raise CheckpointError(f'{path!r} is a preset name, not a saved model: use unitok.create_model({path!r}) '
                                  f'for a random model of it, or pass a model directory, an official .pth or a hub id')
        return None

    @classmethod
    def _load_hub(cls, repo_id: str, revision: str | None, map_location, **options) -> 'UniTok':
        release = official_release(repo_id, revision, (cls.config_file, cls.weights_file))  # None: our layout
        return cls._load_other(release, map_location) if release else super()._load_hub(repo_id, revision, map_location)

    def _expected_state(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        # the official per-sub-codebook quantizer layout is accepted too
        expected = self.state_dict()
        if not {'quantizer.codebook', 'quantizer.vocab_usage'} & set(state):
            expected = to_official_layout(expected)
        return expected

    def _take_state(self, state: Mapping[str, torch.Tensor], map_location, **options) -> None:
        self.load_state_dict(state, strict=True, assign=True)
        self.materialize_non_persistent_buffers()

    model_card = unitok_model_card          # the README.md of save_pretrained, for the name repo_id

    # ------------------------------------------------------------------ precision (see unitok.precision)
    #: Top-level parts that stay float32 when the model is cast to bfloat16/float16: the projections
    #: into and out of the quantizer, the quantizer (codebooks, nearest-code search) and the CLIP head.
    FP32_PARTS = ('quant_proj', 'quantizer', 'post_quant_proj', 'fc_norm', 'projection', 'logit_scale')

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the encoder, decoder and text tower (the first conv stays float32: see :meth:`to`)."""
        return self.encoder.pos_embed.dtype

    def to(self, *args, _stacklevel: int = 2, **kwargs) -> 'UniTok':
        """``nn.Module.to``, except that a bfloat16/float16 dtype is the inference fast path
        (:func:`unitok.precision.cast_for_inference`): the encoder, decoder and text tower are cast once,
        :attr:`FP32_PARTS` and the encoder's first conv stay float32, so the quantizer searches float32
        latents; images and embeddings come back float32. ``to(torch.float32)`` casts everything back.
        A bfloat16 cast on a device without bf16 units warns (RuntimeWarning): there it is slower."""
        where = self.encoder.pos_embed.device
        if cast_for_inference(self, *args, **kwargs) == torch.bfloat16 and not bf16_runs_in_hardware(where):
            warnings.warn(bf16_emulation_warning(where), RuntimeWarning, stacklevel=_stacklevel)
        return self

    def keep_encoder_tail_fp32(self, blocks: int) -> 'UniTok':
        """Run the last ``blocks`` encoder blocks and the final norm in float32 in a bfloat16/float16 model
        (codes closer to float32's); call it before the cast, as ``from_pretrained(..., fp32_encoder_tail=n)`` does."""
        keep_encoder_tail_fp32(self, blocks)
        return self

    def keep_encoder_convs_fp32(self, enable: bool = True) -> 'UniTok':
        """Run the encoder's convolutional stages in float32 in a bfloat16/float16 model (the setting for
        faithful codes); call it before the cast, as ``from_pretrained(..., fp32_encoder_convs=True)`` does."""
        keep_encoder_convs_fp32(self, enable)
        return self

    def bfloat16(self) -> 'UniTok':
        """Same as ``to(torch.bfloat16)``: the inference fast path."""
        return self.to(torch.bfloat16, _stacklevel=3)

    def half(self) -> 'UniTok':
        """Same as ``to(torch.float16)`` (the fast-path split, in float16)."""
        return self.to(torch.float16, _stacklevel=3)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    @torch.no_grad()
    def init_weights(self, conv_gain: float = 0.5) -> None:
        """Initialisation for training from scratch, as in the official recipe.

        Projections and decoder: truncated-normal(0.02) linears, Xavier-normal(gain) convs, unit
        LayerNorms, zero biases; codebooks uniform in +-d^-0.5/36. The encoder keeps timm's ViT init
        and the text tower open_clip's.
        """
        for part in (self.quant_proj, self.post_quant_proj, self.decoder):
            for m in part.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                elif isinstance(m, nn.Conv2d):
                    nn.init.xavier_normal_(m.weight, gain=conv_gain)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.quantizer.init_weights()

    def materialize_non_persistent_buffers(self) -> None:
        """Recreate the buffers that are not in the state dict (after building on the meta device)."""
        device = self.logit_scale.device
        self.quantizer.materialize_non_persistent_buffers(device)
        if getattr(self.text_encoder, 'attn_mask', None) is not None:
            self.text_encoder.attn_mask = self.text_encoder.build_causal_mask().to(device)
        left = [name for name, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f'tensors left on the meta device: {left[:5]}')

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def parameter_counts(self) -> dict[str, int]:
        """Number of parameters per top-level part."""
        counts = {name: sum(p.numel() for p in module.parameters()) for name, module in self.named_children()}
        counts['clip_head'] = counts.pop('fc_norm') + counts.pop('projection') + self.logit_scale.numel()
        counts['total'] = sum(p.numel() for p in self.parameters())
        return counts

    # ------------------------------------------------------------------ image -> codes
    def _project(self, fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Projections run in float32 with autocast off, as in the official model.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.grad_checkpointing and torch.is_grad_enabled():
                return checkpoint(fn, x, use_reentrant=False)
            return fn(x)

    def encode_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Continuous latents before quantization: ``(B, Q + h*w, K*d)`` float32, and the grid ``(h, w)``."""
        images = self._as_model_dtype(images)
        grid = (images.shape[-2] // self.config.patch_size, images.shape[-1] // self.config.patch_size)
        return self._project(self.quant_proj, self.encoder(images)), grid

    def _as_model_dtype(self, images: torch.Tensor) -> torch.Tensor:
        """Checked images in the first conv's dtype (see :func:`unitok.precision.input_in_dtype_of`)."""
        check_images(images)
        return input_in_dtype_of(self.encoder.patch_embed, images)

    def _quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Images -> ``(codes (B, K, Q + h*w), unit code vectors (B, Q + h*w, K*d), grid (h, w))``."""
        latents, grid = self.encode_latents(images)
        codes = self.quantizer.nearest_codes(latents)
        return codes, self.quantizer.lookup(codes), grid

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> codes ``(B, K, H/16, W/16)`` int64 (see class docstring for Q > 0)."""
        latents, (h, w) = self.encode_latents(images)
        codes = self.quantizer.nearest_codes(latents)               # (B, K, Q + h*w)
        return codes if self.config.num_query else codes.view(codes.shape[0], codes.shape[1], h, w)

    # ------------------------------------------------------------------ codes -> image
    def decode_latents(self, quantized: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Quantized latents ``(B, Q + h*w, K*d)`` -> images ``(B, 3, 16h, 16w)``, float32, not clamped."""
        return self._decode_tokens(self._project(self.post_quant_proj, quantized), grid)

    def _decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # tokens: post_quant_proj output (B, Q + h*w, C) float32, cast to the decoder's dtype
        return self.decoder(tokens.to(self.dtype), grid).float()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes (as returned by :meth:`encode`) -> images ``(B, 3, H, W)`` clamped to [-1, 1]."""
        flat, grid = flatten_codes(codes, self.config.num_codebooks, self.config.num_query, grid)
        return self.decode_latents(self.quantizer.lookup(flat.to(self.device)), grid).clamp_(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """``decode(encode(images))`` in one pass, clamped to [-1, 1]."""
        _, quantized, grid = self._quantize(images)
        return self.decode_latents(quantized, grid).clamp_(-1, 1)

    @torch.no_grad()
    def analyze(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass for evaluation: ``(codes (B, K, Q + h*w), reconstruction clamped to [-1, 1],
        unit-norm image embedding (B, E))`` -- each equal to what ``encode``, ``reconstruct`` and
        ``encode_image`` return, without computing the shared parts twice."""
        codes, quantized, grid = self._quantize(images)
        tokens = self._project(self.post_quant_proj, quantized)
        reconstruction = self._decode_tokens(tokens, grid).clamp_(-1, 1)
        return codes, reconstruction, F.normalize(self._image_embedding(tokens), dim=-1)

    # ------------------------------------------------------------------ CLIP embeddings
    def _image_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: post_quant_proj output (B, Q + h*w, C); the mean includes the query tokens.
        return self.projection(self.fc_norm(tokens.mean(dim=1)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings ``(B, E)`` computed from the *quantized* tokens (what an MLLM would see)."""
        _, quantized, _ = self._quantize(images)
        features = self._image_embedding(self._project(self.post_quant_proj, quantized))
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """BPE token ids ``(N, text_context_length)`` on the model's device."""
        return tokenize(texts, self.config.text_context_length).to(self.device)

    def _text_ids(self, texts) -> torch.Tensor:
        """Checked token ids ``(N, text_context_length)`` on the model's device from strings or ids."""
        return text_ids(texts, self.config.text_context_length, self.config.text_vocab_size).to(self.device)

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        """Text embeddings ``(N, E)`` from strings or token ids ``(N, text_context_length)``."""
        features = self.text_encoder(self._text_ids(texts))
        if self.dtype in (torch.bfloat16, torch.float16):
            features = features.float()
        return F.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def zero_shot_classifier(self, classnames: Sequence[str],
                             templates: Sequence[str | Callable[[str], str]] = ('a photo of a {}.',),
                             batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Class weights ``(E, C)`` over templates (strings with one ``{}`` or callables): unitok.zero_shot."""
        return zero_shot_classifier(self, classnames, templates, batch_size, progress)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits ``(B, C)``: scaled cosine similarity of image embeddings and class weights."""
        check_classifier(classifier, self.config.embed_dim)
        features = self.encode_image(images, normalize=True)
        return self.logit_scale.exp() * features @ classifier.to(features.dtype)

    # ------------------------------------------------------------------ training forward
    def forward(self, images: torch.Tensor, texts=None, recon_batch_size: int | None = None) -> UniTokOutput:
        """Training pass: quantize with the straight-through estimator, reconstruct the first
        ``recon_batch_size`` images (None: all, the default; 0: none), and embed images (and texts)
        for the CLIP loss."""
        if recon_batch_size is not None and (not isinstance(recon_batch_size, int) or recon_batch_size < 0):
            raise ValueError(f'recon_batch_size must be None (all images) or an int >= 0 (0: none), '
                             f'got {recon_batch_size!r}')
        latents, grid = self.encode_latents(images)
        q: QuantizerOutput = self.quantizer(latents)
        tokens = self._project(self.post_quant_proj, q.quantized)     # (B, Q + h*w, C) float32
        b = images.shape[0] if recon_batch_size is None else min(recon_batch_size, images.shape[0])
        reconstruction = self._decode_tokens(tokens[:b], grid) if b > 0 else None
        image_features = F.normalize(self._image_embedding(tokens), dim=-1)
        text_features = None if texts is None else self.encode_text(texts, normalize=True)
        zero = q.losses['commitment'].new_zeros(())      # for the optional entropy loss and usage statistic
        return UniTokOutput(
            reconstruction=reconstruction, codes=q.codes,
            quantizer_loss=q.losses['commitment'], entropy_loss=q.losses.get('entropy', zero),
            codebook_usage=q.stats.get('usage', zero.new_zeros(self.quantizer.num_codebooks)),
            image_features=image_features, text_features=text_features,
            logit_scale=self.logit_scale.exp(),
        )
