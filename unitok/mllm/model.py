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
sub-codes) divided by the number of text targets plus image positions.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..generation.heads import DepthHead
from ..utils import dataclass_io
from .connector import CodeInput, Projector
from .llm import (IMAGE_TOKENS, LLMError, add_image_tokens, chat_prompt, check_reference, load_llm,
                  stop_ids)

log = logging.getLogger(__name__)

CONFIG_NAME = 'mllm.json'
WEIGHTS_NAME = 'mllm.safetensors'
LLM_COPY = 'llm'                  # sub-directory of a save with the LLM's weights (save_llm=True)
FORMAT = 'unitok-mllm'
IGNORE = -100


@dataclass
class MLLMConfig:
    """Architecture of a :class:`UniTokMLLM` (the LLM itself is referenced, not described).

    ``num_codebooks``, ``codebook_size``, ``code_dim``, ``grid`` and ``post_quant_dim`` come from the
    UniTok tokenizer; ``image_token_ids``, ``base_vocab`` and ``llm_ref`` from the LLM at build time.
    """
    llm: str = 'smollm2'                  # LLM spec (see unitok.mllm.llm)
    num_codebooks: int = 8
    codebook_size: int = 4096
    code_dim: int = 8
    grid: tuple[int, int] = (16, 16)
    post_quant: bool = True               # read code vectors through the tokenizer's post-quant projection
    post_quant_dim: int = 0
    projector_hidden: int = 0             # 0: the LLM width
    head_width: int = 256
    head_depth: int = 2
    head_heads: int = 4
    head_ffn: int = 0                     # 0: 8/3 of the head width, rounded up to a multiple of 32
    lora_rank: int = 0                    # > 0: LoRA adapters (peft) in the LLM
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
    llm_dim: int = 0
    base_vocab: int = 0                   # the LLM's vocabulary before the image tokens were added
    image_token_ids: dict = field(default_factory=dict)
    llm_ref: dict = field(default_factory=dict)         # spec, gguf file, config / vocab sha256
    tokenizer_ref: dict = field(default_factory=dict)   # UniTok path and identity (config / codebook sha256)

    def __post_init__(self):
        dataclass_io.coerce_fields(self)

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        return dataclass_io.to_dict(self)

    @classmethod
    def from_dict(cls, d) -> 'MLLMConfig':
        return dataclass_io.from_dict(cls, d)


class UniTokMLLM(nn.Module):
    """A causal LM plus the connector, the image-token embeddings and the depth head.

    Build one with :meth:`build` (from a UniTok tokenizer and an LLM spec) or :meth:`from_pretrained`.
    Its state dict holds only what it trains (connector, new-token embeddings, head, LoRA adapters)
    and the frozen code vectors; the LLM's own weights are referenced (``config.llm_ref``).
    """

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
        self._init_own_weights()
        self._stop = stop_ids(text_tokenizer)
        self._end_of_turn = _end_of_turn(text_tokenizer)
        self.register_state_dict_post_hook(_drop_llm_weights)
        self.register_load_state_dict_post_hook(_ignore_missing_llm_weights)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, tokenizer, llm=None, **overrides) -> 'UniTokMLLM':
        """A new MLLM for a UniTok ``tokenizer`` (model or directory) and an LLM (spec string, or a
        ``(model, tokenizer)`` pair of ``transformers`` objects); ``overrides``: :class:`MLLMConfig` fields."""
        from ..generation.codes import tokenizer_identity
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
        g = tc.image_size // 16
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

    def _init_own_weights(self) -> None:
        with torch.no_grad():
            table = self.llm.get_input_embeddings().weight
            mean, std = table.float().mean(0), table.float().std().clamp_min(1e-6)
            self.special_embed.weight.copy_(mean + std * torch.randn_like(self.special_embed.weight))
            for m in self.head.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
            self.head.pos_embed.normal_(std=0.02)
            self.head.weight.zero_()                                  # uniform logits at the start
            self.head.bias.zero_()

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
        from ..generation.codes import tokenizer_identity
        from ..model import UniTok
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = UniTok.from_pretrained(os.fspath(tokenizer))
        mine, c = tokenizer_identity(tokenizer), self.config
        tc = tokenizer.config
        if (tc.num_codebooks, tc.codebook_size) != (c.num_codebooks, c.codebook_size):
            raise CheckpointError(f'the tokenizer has {tc.num_codebooks} x {tc.codebook_size} codes, this MLLM\'s '
                                  f'head writes {c.num_codebooks} x {c.codebook_size}')
        theirs = c.tokenizer_ref
        for k in ('config_sha256', 'codebook_sha256'):
            if theirs.get(k) and mine.get(k) and theirs[k] != mine[k]:
                raise CheckpointError(f'the tokenizer is not the one this MLLM was trained with ({k} differs)')
        self.__dict__['_image_tokenizer'] = tokenizer.to(self.device).eval().requires_grad_(False)

    @property
    def text_vocab(self) -> int:
        return self.config.base_vocab

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str, save_llm: bool = False) -> None:
        """Write ``mllm.json`` and ``mllm.safetensors`` (connector, image-token embeddings, head, LoRA
        adapters, frozen code vectors); the LLM as a reference (``llm_ref``) unless ``save_llm``, which
        also writes the LLM and its tokenizer to ``directory/llm``."""
        from safetensors.torch import save_file
        from ..utils.io import atomic_write
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        cfg = self.config.to_dict()
        if save_llm:
            if getattr(self.llm, 'peft_config', None):
                raise ValueError('save_llm with LoRA adapters: the adapters are saved in any case and the LLM is '
                                 'referenced; save without save_llm')
            self.llm.save_pretrained(os.path.join(directory, LLM_COPY))
            self.text_tokenizer.save_pretrained(os.path.join(directory, LLM_COPY))
            cfg['llm'] = LLM_COPY
        text = json.dumps(cfg, indent=2)
        atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(state, p, metadata={'format': FORMAT}),
                     mode='path', what='MLLM weights')
        atomic_write(os.path.join(directory, CONFIG_NAME), lambda f: f.write(text + '\n'), mode='w',
                     what='MLLM config')

    @classmethod
    def from_pretrained(cls, directory: str, llm=None, tokenizer=None, map_location: str = 'cpu') -> 'UniTokMLLM':
        """Load a directory of :meth:`save_pretrained`. ``llm``: another spec or ``(model, tokenizer)``
        pair for the referenced LLM (checked against the saved config and vocabulary digests);
        ``tokenizer``: the UniTok tokenizer (default: the referenced path, loaded on first use)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        directory = os.fspath(directory)
        cfg_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        missing = [p for p in (cfg_path, weights_path) if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(f'{directory!r} is not a UniTok MLLM directory: missing {", ".join(missing)}')
        try:
            with open(cfg_path, encoding='utf-8') as f:
                config = MLLMConfig.from_dict(json.load(f))
        except (ConfigError, ValueError, TypeError, OSError) as e:
            raise CheckpointError(f'invalid {cfg_path}: {e}') from None
        try:
            state = load_file(weights_path, device=str(map_location))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f'cannot read {weights_path}: {e}') from None
        if isinstance(llm, (tuple, list)):
            model, text_tok = llm
        else:
            spec = llm or (os.path.join(directory, config.llm) if config.llm == LLM_COPY else config.llm)
            model, text_tok, _ = load_llm(spec)
        check_reference(config.llm_ref, model, text_tok, config.base_vocab)
        if len(text_tok) != config.base_vocab and not all(t in text_tok.get_vocab() for t in IMAGE_TOKENS):
            raise LLMError(f'the LLM tokenizer has {len(text_tok)} tokens, the saved model was trained with '
                           f'{config.base_vocab} (before the image tokens)')
        add_image_tokens(text_tok, expected=config.image_token_ids)
        code_input = _code_input_like(config)
        mllm = cls(config, model, text_tok, code_input)
        if config.lora_rank:
            mllm.add_lora()
        result = mllm.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f'{weights_path} does not match {cfg_path}: missing keys {result.missing_keys[:8]}, '
                                  f'unexpected keys {result.unexpected_keys[:8]}')
        mllm.code_input.offsets = torch.arange(config.num_codebooks) * config.codebook_size
        mllm.to(map_location)
        if tokenizer is not None:
            mllm.set_image_tokenizer(tokenizer)
        return mllm.eval()

    # ------------------------------------------------------------------ embeddings and the LLM
    def image_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        """Sub-codes ``(N, K)`` -> LLM input embeddings ``(N, llm_dim)`` (the one input path of images)."""
        return self.projector(self.code_input(codes))

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None,
              codes: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings ``(B, T, C)``: text ids through the LLM's table, ``<boi>``/``<eoi>`` through
        :attr:`special_embed`, positions of ``image_mask`` from ``codes (B, T, K)`` through :meth:`image_embeds`."""
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
    def forward(self, batch: dict, denominator: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of a collated batch (:func:`unitok.mllm.data.collate`): text CE on ``labels`` and the
        depth head's CE at ``image_targets`` (position t predicts the codes of position t+1).

        ``denominator``: what the summed losses are divided by (default: this batch's text targets plus
        image positions; data-parallel training passes the global count / world size, so that every
        target weighs the same whatever rank it is on)."""
        ids, mask, image_mask, codes = batch['input_ids'], batch['attention_mask'], batch['image_mask'], batch['codes']
        x = self.embed(ids, image_mask, codes)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        h = self.hidden_states(x, mask, positions)                                    # (B, T, C)
        labels, targets = batch['labels'], batch['image_targets']
        text = labels != IGNORE
        zero = h.new_zeros((), dtype=torch.float32)
        text_sum, text_n, text_acc = zero, text.sum(), zero
        if bool(text.any()):
            logits = self.text_logits(h[text]).float()
            text_sum = F.cross_entropy(logits, labels[text], reduction='sum')
            text_acc = (logits.argmax(-1) == labels[text]).float().mean()
        sel = targets[:, :-1]
        img_n = sel.sum()
        img_sum, img_acc = zero, zero
        if bool(sel.any()):
            hh = h[:, :-1][sel].to(self.head.pos_embed.dtype)
            tgt = codes[:, 1:][sel]                                                    # (N, K)
            logits = self.head(hh, tgt).float()                                        # (N, K, V)
            ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction='none').view_as(tgt)
            img_sum = ce.mean(1).sum()
            img_acc = (logits.argmax(-1) == tgt).float().mean()
        w = self.loss_weights
        if denominator is None:
            denominator = (text_n + img_n).clamp_min(1)
        loss = (w[0] * text_sum + w[1] * img_sum) / denominator
        metrics = {'loss': loss.detach(), 'text_loss': (text_sum / text_n.clamp_min(1)).detach(),
                   'image_loss': (img_sum / img_n.clamp_min(1)).detach(), 'text_accuracy': text_acc.detach(),
                   'image_accuracy': img_acc.detach()}
        return loss, metrics

    loss_weights = (1.0, 1.0)

    # ------------------------------------------------------------------ sequences
    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes of one image ``(K, h, w)`` or ``(1, K, h, w)`` -> ``(L, K)`` int64, with clear errors."""
        c = self.config
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f'codes must be an integer tensor (K, h, w), got {type(codes).__name__}'
                            f'{" " + str(codes.dtype) if isinstance(codes, torch.Tensor) else ""}')
        if codes.dim() == 4 and codes.shape[0] == 1:
            codes = codes[0]
        want = (c.num_codebooks, *c.grid)
        if tuple(codes.shape) != want:
            raise ValueError(f'codes must have shape {want} (K sub-codebooks, grid {c.grid[0]}x{c.grid[1]}), got '
                             f'{tuple(codes.shape)}')
        if int(codes.min()) < 0 or int(codes.max()) >= c.codebook_size:
            raise ValueError(f'codes must lie in [0, {c.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]')
        return codes.long().flatten(1).t().contiguous()                               # (L, K)

    def _ids(self, text: str) -> list[int]:
        return self.text_tokenizer(text, add_special_tokens=False)['input_ids']

    def understanding_example(self, codes: torch.Tensor, question: str, answer: str | None = None) -> dict:
        """The sequence of one question about an image (and its answer as the text target)."""
        boi, eoi = (self.config.image_token_ids[t] for t in IMAGE_TOKENS)
        L = self.config.num_positions
        prompt = self._ids(chat_prompt(self.text_tokenizer, f'{IMAGE_TOKENS[0]}{IMAGE_TOKENS[1]}\n{question}'))
        at = prompt.index(boi)
        if prompt[at + 1] != eoi:
            raise LLMError('the chat template split the image tokens apart')
        ids = prompt[:at + 1] + [0] * L + prompt[at + 1:]
        image = [False] * (at + 1) + [True] * L + [False] * (len(prompt) - at - 1)
        grid = torch.zeros(len(ids), self.config.num_codebooks, dtype=torch.long)
        grid[at + 1:at + 1 + L] = self.check_codes(codes)
        labels = [IGNORE] * len(ids)
        if answer is not None:
            target = self._ids(answer) + [self._end_of_turn]
            labels = labels[:-1] + [target[0]] + target[1:] + [IGNORE]
            ids = ids + target
            image += [False] * len(target)
            grid = torch.cat([grid, grid.new_zeros(len(target), grid.shape[1])])
        self._check_length(len(ids))
        return dict(input_ids=torch.tensor(ids), image_mask=torch.tensor(image), codes=grid,
                    labels=torch.tensor(labels), image_targets=torch.zeros(len(ids), dtype=torch.bool))

    def generation_prompt(self, prompt: str | None) -> list[int]:
        """Token ids of a text-to-image request, ending with ``<boi>``; ``None`` -> the null prompt."""
        boi = self.config.image_token_ids[IMAGE_TOKENS[0]]
        return self._ids(chat_prompt(self.text_tokenizer, prompt or '')) + [boi]

    def generation_example(self, codes: torch.Tensor, prompt: str | None) -> dict:
        """The sequence of one text-to-image example (``prompt=None``: the null prompt of guidance)."""
        L = self.config.num_positions
        pre = self.generation_prompt(prompt)
        ids = pre + [0] * L
        self._check_length(len(ids))
        grid = torch.zeros(len(ids), self.config.num_codebooks, dtype=torch.long)
        grid[len(pre):] = self.check_codes(codes)
        image = torch.zeros(len(ids), dtype=torch.bool)
        image[len(pre):] = True
        targets = torch.zeros(len(ids), dtype=torch.bool)
        targets[len(pre) - 1:len(ids) - 1] = True
        return dict(input_ids=torch.tensor(ids), image_mask=image, codes=grid,
                    labels=torch.full((len(ids),), IGNORE), image_targets=targets)

    @property
    def max_length(self) -> int:
        return int(getattr(self.llm.config, 'max_position_embeddings', 0) or 1 << 30)

    def _check_length(self, n: int, what: str = 'the sequence') -> None:
        if n > self.max_length:
            raise ValueError(f'{what} has {n} tokens, more than the LLM\'s context of {self.max_length} '
                             f'(an image takes {self.config.num_positions} positions): shorten the prompt')

    # ------------------------------------------------------------------ inference API
    def encode_image(self, image) -> torch.Tensor:
        """A path, PIL image or ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in [-1, 1] -> codes ``(K, h, w)``.
        Paths and PIL images are resized (shorter side, centre crop); tensors must have the tokenizer's size."""
        from ..images import to_tensor
        tok = self.image_tokenizer
        size = tok.config.image_size
        if isinstance(image, torch.Tensor):
            x = image[None] if image.dim() == 3 else image
            if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
                raise ValueError(f'image must be a tensor (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}')
            if tuple(x.shape[-2:]) != (size, size):
                raise ValueError(f'image is {x.shape[-2]}x{x.shape[-1]}; this MLLM reads {size}x{size} images '
                                 f'(grid {self.config.grid[0]}x{self.config.grid[1]}): resize it, or pass a path/PIL '
                                 'image to resize automatically')
        else:
            x = to_tensor(image, size=size)
        return tok.encode(x.to(tok.device))[0]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, K, h, w)`` -> images ``(B, 3, H, W)`` in [-1, 1] through the UniTok tokenizer."""
        return self.image_tokenizer.decode(codes)

    def chat(self, image, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, generator=None, stream: Callable[[str], None] | None = None,
             use_cache: bool = True) -> str:
        """Answer ``question`` about ``image`` (path, PIL image, tensor, or codes ``(K, h, w)`` int).

        ``stream``: called with each new piece of text as it is generated. Greedy by default."""
        from .generate import generate_text
        if image is None:
            ids = self._ids(chat_prompt(self.text_tokenizer, question))
            example = dict(input_ids=torch.tensor(ids), image_mask=torch.zeros(len(ids), dtype=torch.bool),
                           codes=torch.zeros(len(ids), self.config.num_codebooks, dtype=torch.long))
        else:
            codes = image if isinstance(image, torch.Tensor) and not image.dtype.is_floating_point \
                else self.encode_image(image)
            example = self.understanding_example(codes, question)
        self._check_length(len(example['input_ids']) + max_new_tokens, 'the question plus max_new_tokens')
        ids = generate_text(self, example, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, generator=generator, stream=stream, use_cache=use_cache)
        return self.text_tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_image(self, prompt: str | Sequence[str], *, n: int = 1, cfg_scale: float = 1.0,
                       temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                       top_p: float | Sequence[float] = 1.0, generator=None, use_cache: bool = True) -> torch.Tensor:
        """Codes ``(B, K, h, w)`` of ``n`` images per prompt (``B = n * len(prompts)``), for ``decode_codes``.

        ``cfg_scale != 1`` mixes the logits with those of the null prompt, ``u + s * (c - u)``."""
        from .generate import generate_codes
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f'prompt must be a string or a list of strings, got {prompt!r}')
        if not isinstance(n, int) or n < 1:
            raise ValueError(f'n must be an int >= 1, got {n!r}')
        rows = [self.generation_prompt(p) for p in prompts for _ in range(n)]
        for r in rows:
            self._check_length(len(r) + self.config.num_positions, 'the prompt plus the image')
        return generate_codes(self, rows, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator, use_cache=use_cache)


def _cache_argument(decoder) -> str:
    """``'cache'`` where the LLM takes it under that name (newer transformers), else ``'past_key_values'``."""
    import inspect
    kind = type(decoder)
    if kind not in _CACHE_ARG:
        _CACHE_ARG[kind] = 'cache' if 'cache' in inspect.signature(decoder.forward).parameters else 'past_key_values'
    return _CACHE_ARG[kind]


_CACHE_ARG: dict[type, str] = {}


def _end_of_turn(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    for t in ('<|im_end|>', '<|eot_id|>', '<|end|>'):
        if t in vocab:
            return int(vocab[t])
    if tokenizer.eos_token_id is None:
        raise LLMError('the LLM tokenizer has no end-of-turn or EOS token to end answers with')
    return int(tokenizer.eos_token_id)


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
