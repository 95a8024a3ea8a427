"""A unified multimodal LLM over UniTok codes: one causal LM that reads and writes images.

    >>> import unitok
    >>> mllm = unitok.UniTokMLLM.build('runs/tokenizer/model')             # default LLM: SmolLM2-135M-Instruct
    >>> mllm.chat('cat.png', 'What is in this image?')                    # -> str
    >>> codes = mllm.generate_image('Draw an emoji of a red apple.', cfg_scale=2.0)   # (1, K, h, w)
    >>> mllm.save_pretrained('mllm'); unitok.UniTokMLLM.from_pretrained('mllm')

Any ``transformers`` causal LM works unchanged, through ``inputs_embeds`` and ``past_key_values``:

* **reading** an image: codes -> code vectors (-> the tokenizer's post-quant projection) -> per-token
  MLP -> LLM input embeddings, between ``<boi>`` and ``<eoi>`` (special tokens added to the LLM's
  tokenizer; their ids are looked up, their embeddings are new parameters of this model, the LLM's
  own embedding table is left as it is);
* **writing** an image: the LLM's last hidden state at ``<boi>`` and at each image position goes
  through a :class:`~unitok.generation.DepthHead` to the K sub-codes of the next position; sampled
  codes are fed back through the same input path.

Sequence layouts (text from the LLM's chat template):
``understanding: [user: <boi> img*L <eoi> \\n question] [assistant: answer <end-of-turn>]`` with text
cross-entropy on the answer; ``generation: [user: prompt] [assistant: <boi> img*L]`` with the depth
head's cross-entropy on the L positions (all K sub-codes). A mixed batch runs in one forward; the
loss is the sum of the text token losses and the image position losses (each the mean over its K
sub-codes) divided by the number of text targets plus image positions (or, with ``loss='official'``, the
released MLLM's weighing: every sub-code a token, plus a z-loss; :mod:`unitok.mllm.loss_terms`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..config import ConfigError
from ..generation.heads import DepthHead
from ..pretrained import CheckpointError, Pretrained
from .config import MLLMConfig
from .connector import CodeInput, Projector
from .official_layout import resolve_official
from .loss_terms import combined_loss
from .llm import IMAGE_TOKENS, LLMError, add_image_tokens, check_reference, load_llm, stop_ids
from .generate import generate_codes, generate_text
from .prompts import (chat_sequence, codes_as_rows, end_of_turn, generation_prefix, generation_sequence, image_codes,
                      image_request_rows, text_sequence, understanding_sequence)

log = logging.getLogger(__name__)

CONFIG_NAME = 'mllm.json'
WEIGHTS_NAME = 'mllm.safetensors'
LLM_COPY = 'llm'                  # sub-directory of a save with the LLM's weights (save_llm=True)
FORMAT = 'unitok-mllm'


class UniTokMLLM(Pretrained, nn.Module):
    """A causal LM plus the connector, the image-token embeddings and the depth head.

    Build one with :meth:`build` (from a UniTok tokenizer and an LLM spec) or :meth:`from_pretrained`.
    Its state dict holds only what it trains (connector, new-token embeddings, head, LoRA adapters)
    and the frozen code vectors; the LLM's own weights are referenced (``config.llm_ref``).
    """
    config_class = MLLMConfig
    config_file, weights_file, weights_format, model_kind = CONFIG_NAME, WEIGHTS_NAME, FORMAT, 'UniTok MLLM'
    released: type | None = None         # the released MLLM's class (unitok.mllm.official.OfficialMLLM)
    hub_extra_files = (f'{LLM_COPY}/*',)

    def __init__(self, config: MLLMConfig, llm: nn.Module, text_tokenizer, code_input: CodeInput,
                 image_tokenizer=None):
        super().__init__()
        c = self.config = config
        self.llm = llm
        self.__dict__['text_tokenizer'] = text_tokenizer           # not a module
        self.__dict__['_image_tokenizer'] = image_tokenizer
        self.code_input = code_input
        hidden = c.projector_hidden or c.llm_dim
        self.projector = Projector(code_input.out_dim, hidden, c.llm_dim)
        self.special_embed = nn.Embedding(len(IMAGE_TOKENS), c.llm_dim)
        width = c.head_width
        ffn = c.head_ffn or 32 * math.ceil(width * 8 / 3 / 32)
        self.head = DepthHead(c.llm_dim, width, c.head_depth, c.head_heads, ffn, c.num_codebooks, c.codebook_size)
        _init_own_weights(self)
        self._stop = stop_ids(text_tokenizer)
        self._end_of_turn = end_of_turn(text_tokenizer)
        self.register_state_dict_post_hook(_drop_llm_weights)
        self.register_load_state_dict_post_hook(_ignore_missing_llm_weights)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, tokenizer, llm=None, **overrides) -> 'UniTokMLLM':
        """A new MLLM for a UniTok ``tokenizer`` (model or directory) and an LLM (spec string, or a
        ``(model, tokenizer)`` pair of ``transformers`` objects); ``overrides``: :class:`MLLMConfig` fields."""
        from ..codes import tokenizer_identity
        from ..model import UniTok
        path = None
        if isinstance(tokenizer, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(tokenizer))
            tokenizer = UniTok.from_pretrained(path)
        tokenizer = tokenizer.eval().requires_grad_(False)
        tc = tokenizer.config
        if tc.num_query:
            raise ConfigError(f'the multimodal LLM reads grid codes; this tokenizer has {tc.num_query} query tokens')
        spec = llm if isinstance(llm, str) or llm is None else overrides.get('llm', 'custom')
        if isinstance(llm, (tuple, list)):
            from .llm import llm_reference
            model, text_tok = llm
            ref = llm_reference(spec, None, model, text_tok)
        else:
            model, text_tok, ref = load_llm(llm)
        base_vocab = len(text_tok)
        ids = add_image_tokens(text_tok)
        if [ids[t] for t in IMAGE_TOKENS] != [base_vocab + i for i in range(len(IMAGE_TOKENS))]:
            raise LLMError(f'the LLM tokenizer already holds image tokens {ids} below its size {base_vocab}: pass '
                           'the original tokenizer')
        g = tc.grid_size
        post_quant = overrides.pop('post_quant', True)
        width = tokenizer.post_quant_proj(torch.zeros(1, 1, tc.num_codebooks * tc.code_dim)).shape[-1] \
            if post_quant else 0
        cfg = MLLMConfig(**{**dict(llm=ref['llm'], num_codebooks=tc.num_codebooks, codebook_size=tc.codebook_size,
                                   code_dim=tc.code_dim, grid=(g, g), post_quant=post_quant, post_quant_dim=width,
                                   llm_dim=model.config.hidden_size, base_vocab=base_vocab, image_token_ids=ids,
                                   llm_ref=ref, tokenizer_ref={'path': path, **tokenizer_identity(tokenizer),
                                                               'config': tc.to_dict()}), **overrides})
        code_input = CodeInput(tokenizer.quantizer.code_table().detach(), tokenizer.post_quant_proj if post_quant else None,
                               width)
        mllm = cls(cfg, model, text_tok, code_input, image_tokenizer=tokenizer)
        if cfg.lora_rank:
            mllm.add_lora()
        return mllm

    def add_lora(self) -> None:
        """Wrap the LLM with LoRA adapters (``config.lora_rank``, ``lora_alpha``, ``lora_targets``)."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise LLMError('LoRA adapters need peft: pip install "unitok-vision[mllm]"') from None
        c = self.config
        if c.lora_rank <= 0:
            raise ConfigError(f'lora_rank must be > 0 to add adapters, got {c.lora_rank}')
        if getattr(self.llm, 'peft_config', None):
            return
        lc = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, target_modules=list(c.lora_targets),
                        lora_dropout=0.0, bias='none')
        self.llm = get_peft_model(self.llm, lc)

    def freeze_llm(self) -> None:
        """Train only the connector, the image-token embeddings, the head and LoRA adapters (if any)."""
        for n, p in self.llm.named_parameters():
            p.requires_grad_('lora_' in n)
        self.code_input.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.special_embed.weight.device

    @property
    def image_tokenizer(self):
        """The UniTok tokenizer (loaded on first use from ``config.tokenizer_ref['path']``)."""
        if self._image_tokenizer is None:
            path = self.config.tokenizer_ref.get('path')
            if not path:
                raise CheckpointError('this MLLM has no UniTok tokenizer reference: pass tokenizer= to from_pretrained')
            self.set_image_tokenizer(path)
        return self._image_tokenizer

    def set_image_tokenizer(self, tokenizer) -> None:
        """Use this UniTok tokenizer (model or directory) to encode and decode images; it must be the
        one whose codes this MLLM was trained on (K, codebook size, grid, config and codebook sha256)."""
        from ..codes import check_agreement, code_space
        from ..model import UniTok
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = UniTok.from_pretrained(os.fspath(tokenizer))
        check_agreement({**self.config.tokenizer_ref, **code_space(self.config)}, tokenizer, where='this MLLM',
                        consumer='the tokenizer', there='in this MLLM', error=CheckpointError,
                        fix='use the tokenizer it was trained with')
        self.__dict__['_image_tokenizer'] = tokenizer.to(self.device).eval().requires_grad_(False)

    @property
    def text_vocab(self) -> int:
        return self.config.base_vocab

    # ------------------------------------------------------------------ save / load (unitok.pretrained)
    def save_pretrained(self, directory: str, save_llm: bool = False, *, repo_id: str | None = None) -> None:
        """Write ``mllm.json`` and ``mllm.safetensors`` (connector, image-token embeddings, head, LoRA
        adapters, frozen code vectors); the LLM as a reference (``llm_ref``) unless ``save_llm``, which
        also writes the LLM and its tokenizer to ``directory/llm``."""
        super().save_pretrained(directory, repo_id=repo_id, save_llm=save_llm)

    def _config_json(self, directory: str, save_llm: bool = False) -> str:
        cfg = self.config.to_dict()
        if save_llm:
            cfg['llm'] = _save_llm_copy(self, directory)
        return json.dumps(cfg, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str, llm=None, tokenizer=None, map_location: str = 'cpu',
                        revision: str | None = None, ignore_mismatch: bool = False, **official) -> 'UniTokMLLM':
        """Load a directory of :meth:`save_pretrained` (or a hub id). ``llm``: another spec or
        ``(model, tokenizer)`` pair for the referenced LLM (checked against the saved config, vocabulary
        and weights digests; ``ignore_mismatch``: other weights are a warning); ``tokenizer``: the UniTok
        tokenizer (default: the referenced path, loaded on first use). The released MLLM
        (``FoundationVision/unitok_mllm``) loads as an :class:`OfficialMLLM` (``official``: its options,
        e.g. ``dtype``)."""
        folder = resolve_official(os.fspath(directory), revision) if llm is None else None
        if folder is not None:         # the class registers itself (unitok.mllm.official, imported by unitok.mllm)
            return UniTokMLLM.released.load(folder, tokenizer=tokenizer, device=map_location, **official)
        return cls._load_pretrained(directory, map_location, revision, llm=llm, tokenizer=tokenizer,
                                    ignore_mismatch=ignore_mismatch)

    @classmethod
    def _empty(cls, config: MLLMConfig, directory: str | None = None, llm=None, ignore_mismatch: bool = False,
               **options) -> 'UniTokMLLM':
        model, text_tok = _referenced_llm(config, directory, llm, ignore_mismatch)
        mllm = cls(config, model, text_tok, _code_input_like(config))
        if config.lora_rank:
            mllm.add_lora()
        return mllm

    def _take_state(self, state, map_location, tokenizer=None, **options) -> None:
        self.load_state_dict(state, strict=True)        # the LLM's own weights are not in the file
        self.code_input.offsets = torch.arange(self.config.num_codebooks) * self.config.codebook_size
        self.to(map_location)
        if tokenizer is not None:
            self.set_image_tokenizer(tokenizer)

    # ------------------------------------------------------------------ embeddings and the LLM
    def image_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        """Sub-codes ``(N, K)`` -> LLM input embeddings ``(N, llm_dim)`` (the one input path of images)."""
        return self.projector(self.code_input(codes))

    def next_image_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        """The input ``(N, 1, C)`` of the last generated position of ``codes (N, n, K)``."""
        return self.image_embeds(codes[:, -1])[:, None]

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None,
              codes: torch.Tensor | None = None, generated: bool = False) -> torch.Tensor:
        """Input embeddings ``(B, T, C)``: text ids through the LLM's table, ``<boi>``/``<eoi>`` through
        :attr:`special_embed`, positions of ``image_mask`` from ``codes (B, T, K)`` through :meth:`image_embeds`
        (each position alone, so ``generated``, set for positions being sampled, changes nothing here)."""
        base = self.config.base_vocab
        table = self.llm.get_input_embeddings()
        x = table(input_ids.clamp(0, base - 1))
        special = input_ids >= base
        if image_mask is not None:
            special = special & ~image_mask
        x = torch.where(special[..., None], self.special_embed((input_ids - base).clamp(0, len(IMAGE_TOKENS) - 1))
                        .to(x.dtype), x)
        if image_mask is not None and bool(image_mask.any()):
            x = x.clone()
            x[image_mask] = self.image_embeds(codes[image_mask]).to(x.dtype)
        return x

    def _decoder(self):
        return self.llm.get_decoder()

    def hidden_states(self, embeds, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        """The LLM's last hidden states ``(B, T, C)`` for input embeddings (through ``past_key_values``)."""
        decoder = self._decoder()
        key = _cache_argument(decoder)
        out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=cache is not None, **{key: cache})
        return out.last_hidden_state

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.get_output_embeddings()(hidden)[..., :self.config.base_vocab]

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict, denominator: torch.Tensor | None = None, loss: str = 'ours'
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of a collated batch (:func:`unitok.mllm.data.collate`): text CE on ``labels`` and the
        head's CE at ``image_targets`` (position t predicts the codes of position t+1), weighed as ``loss``
        says (``'ours'`` or ``'official'``, :mod:`unitok.mllm.loss_terms`).

        ``denominator``: what the summed losses are divided by (default: this batch's
        :func:`~unitok.mllm.loss_terms.target_count`; data-parallel training passes the global count / world
        size, so that every target weighs the same whatever rank it is on)."""
        ids, mask, image_mask, codes = batch['input_ids'], batch['attention_mask'], batch['image_mask'], batch['codes']
        x = self.embed(ids, image_mask, codes)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        h = self.hidden_states(x, mask, positions)                                    # (B, T, C)
        return combined_loss(self, h, batch, denominator, loss)

    loss_weights = (1.0, 1.0)

    # ------------------------------------------------------------------ sequences (unitok.mllm.prompts)
    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes of one image ``(K, h, w)`` or ``(1, K, h, w)`` -> ``(L, K)`` int64, with clear errors."""
        return codes_as_rows(self.config, codes)

    def understanding_example(self, codes: torch.Tensor, question: str, answer: str | None = None) -> dict:
        """The sequence of one question about an image (and its answer as the text target)."""
        return understanding_sequence(self, codes, question, answer)

    def text_example(self, question: str) -> dict:          # a question without an image
        return text_sequence(self, question)

    def generation_prompt(self, prompt: str | None) -> list[int]:
        """Token ids of a text-to-image request, ending with ``<boi>``; ``None`` -> the null prompt."""
        return generation_prefix(self, prompt)

    def generation_example(self, codes: torch.Tensor, prompt: str | None) -> dict:
        """The sequence of one text-to-image example (``prompt=None``: the null prompt of guidance)."""
        return generation_sequence(self, codes, prompt)

    @property
    def max_length(self) -> int:
        return int(getattr(self.llm.config, 'max_position_embeddings', 0) or 1 << 30)

    # ------------------------------------------------------------------ inference API
    def encode_image(self, image) -> torch.Tensor:
        """A path, PIL image or ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in [-1, 1] -> codes ``(K, h, w)``.
        Paths and PIL images are resized (shorter side, centre crop); tensors must have the tokenizer's size."""
        return image_codes(self, image)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, K, h, w)`` -> images ``(B, 3, H, W)`` in [-1, 1] through the UniTok tokenizer."""
        return self.image_tokenizer.decode(codes)

    def chat(self, image, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, generator=None, stream: Callable[[str], None] | None = None,
             use_cache: bool = True) -> str:
        """Answer ``question`` about ``image`` (path, PIL image, tensor, or codes ``(K, h, w)`` int).

        ``stream``: called with each new piece of text as it is generated. Greedy by default."""
        ids = generate_text(self, chat_sequence(self, image, question, max_new_tokens), max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, stream=stream,
                            use_cache=use_cache)
        return self.text_tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_image(self, prompt: str | Sequence[str], *, n: int = 1, cfg_scale: float = 1.0,
                       temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                       top_p: float | Sequence[float] = 1.0, generator=None, use_cache: bool = True,
                       callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Codes ``(B, K, h, w)`` of ``n`` images per prompt (``B = n * len(prompts)``), for ``decode_codes``.

        ``cfg_scale != 1`` mixes the logits with those of the null prompt, ``u + s * (c - u)``.
        ``callback(done, partial)``: called after each grid position with the positions sampled so far and
        a copy of the codes, -1 where not sampled yet (as :func:`unitok.generation.generate`)."""
        return generate_codes(self, image_request_rows(self, prompt, n), cfg_scale=cfg_scale, temperature=temperature,
                              top_k=top_k, top_p=top_p, generator=generator, use_cache=use_cache, callback=callback)


def _init_own_weights(mllm: UniTokMLLM) -> None:
    """Image-token embeddings around the LLM's own table; the head small, its logits uniform at the start."""
    with torch.no_grad():
        table = mllm.llm.get_input_embeddings().weight
        mean, std = table.float().mean(0), table.float().std().clamp_min(1e-6)
        mllm.special_embed.weight.copy_(mean + std * torch.randn_like(mllm.special_embed.weight))
        for m in mllm.head.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        mllm.head.pos_embed.normal_(std=0.02)
        mllm.head.weight.zero_()                                  # uniform logits at the start
        mllm.head.bias.zero_()


def _cache_argument(decoder) -> str:
    """``'cache'`` where the LLM takes it under that name (newer transformers), else ``'past_key_values'``."""
    import inspect
    kind = type(decoder)
    if kind not in _CACHE_ARG:
        _CACHE_ARG[kind] = 'cache' if 'cache' in inspect.signature(decoder.forward).parameters else 'past_key_values'
    return _CACHE_ARG[kind]


_CACHE_ARG: dict[type, str] = {}


def _save_llm_copy(mllm: UniTokMLLM, directory: str) -> str:
    """Write the LLM and its tokenizer to ``directory/llm``; returns the spec the config then holds."""
    if getattr(mllm.llm, 'peft_config', None):
        raise ValueError('save_llm with LoRA adapters: the adapters are saved in any case and the LLM is '
                         'referenced; save without save_llm')
    mllm.llm.save_pretrained(os.path.join(directory, LLM_COPY))
    mllm.text_tokenizer.save_pretrained(os.path.join(directory, LLM_COPY))
    return LLM_COPY


def _referenced_llm(config: MLLMConfig, directory: str | None, llm=None, ignore_mismatch: bool = False) -> tuple:
    """The LLM and its tokenizer a saved config references (or ``llm``, checked against it), with the
    image tokens added at the saved ids."""
    if isinstance(llm, (tuple, list)):
        model, text_tok = llm
    else:
        spec = llm or (os.path.join(directory, config.llm) if config.llm == LLM_COPY else config.llm)
        model, text_tok, _ = load_llm(spec)
    check_reference(config.llm_ref, model, text_tok, config.base_vocab, ignore_mismatch)
    width = model.get_input_embeddings().weight.shape[1]
    if config.llm_dim and config.llm_dim != width:
        raise LLMError(f'the saved MLLM says llm_dim {config.llm_dim}, the LLM has width {width}: its mllm.json does '
                       'not fit this LLM (edited, or another LLM)')
    if len(text_tok) != config.base_vocab and not all(t in text_tok.get_vocab() for t in IMAGE_TOKENS):
        raise LLMError(f'the LLM tokenizer has {len(text_tok)} tokens, the saved model was trained with '
                       f'{config.base_vocab} (before the image tokens)')
    add_image_tokens(text_tok, expected=config.image_token_ids)
    return model, text_tok


def _is_llm_weight(key: str) -> bool:
    return key.startswith('llm.') and 'lora_' not in key


def _drop_llm_weights(module, state_dict, prefix, local_metadata) -> None:
    for k in [k for k in state_dict if _is_llm_weight(k[len(prefix):])]:
        del state_dict[k]


def _ignore_missing_llm_weights(module, incompatible) -> None:
    keep = [k for k in incompatible.missing_keys if not _is_llm_weight(k)]
    incompatible.missing_keys[:] = keep


def _code_input_like(config: MLLMConfig) -> CodeInput:
    """An empty :class:`CodeInput` of a saved config (the weights come from the state dict)."""
    K, V, d = config.num_codebooks, config.codebook_size, config.code_dim
    post = None
    if config.post_quant:
        from ..config import UniTokConfig
        from ..model import UniTok
        tc = UniTokConfig.from_dict(config.tokenizer_ref['config'])
        with torch.device('meta'):
            post = UniTok(tc).post_quant_proj
        post = post.to_empty(device='cpu')
    return CodeInput(torch.ones(K, V, d), post, config.post_quant_dim)
