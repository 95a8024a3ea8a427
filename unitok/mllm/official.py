"""The released UniTok MLLM (``FoundationVision/unitok_mllm``) as a :class:`~unitok.mllm.UniTokMLLM`.

    >>> mllm = unitok.UniTokMLLM.from_pretrained('FoundationVision/unitok_mllm',
    ...                                          tokenizer='FoundationVision/unitok_tokenizer')
    >>> mllm.chat('cat.jpg', 'What is in this image?')
    >>> codes = mllm.generate_image('a red apple', cfg_scale=5.0, temperature=0.9, top_k=2048, top_p=0.96)

Its parts, mapped from the official checkpoint (:mod:`unitok.mllm.official_layout`): the Llama-2-7B LM as
``transformers``' ``LlamaForCausalLM``; the image input as a :class:`~unitok.mllm.connector.CausalCodeEmbedder`
(8 sub-codebooks, causal attention projection 64 -> 1024 with 16 heads, mm_projector); the sub-code head
as a :class:`~unitok.generation.heads.LlamaCodeHead`; prompts as :class:`~unitok.mllm.formats.VicunaV1`.
``<boi>``/``<eoi>`` are the Llama byte tokens 3 and 4 (ordinary rows of the LM's table).

How generated positions are read back (``feedback``):

* ``'position'`` (default, the official inference, ``T2I_forward_withcache``): each sampled position goes
  through the causal projection alone, a sequence of one, so it sees none of the positions before it;
* ``'prefix'`` (consistent with training, where the whole image passed the causal projection at once):
  the position is embedded with all the generated positions before it. The causal projection makes an
  earlier position's embedding independent of later ones, so this is exactly the training-time input.

An image being understood always passes the projection whole (causally), in both modes, as officially.

Fine-tuning (``unitok train-mllm --init FoundationVision/unitok_mllm``, :class:`~unitok.train.tasks.mllm.MLLMTask`)
uses the official training layouts (``eval/liquid/train.py``): understanding as the vicuna_v1 conversation with
the answer and ``</s>`` as text targets; text-to-image as ``<s> PROMPT Generate an image based on this
description. <boi> image <eoi> </s>`` (``<s> <unconditional> ...`` for the null prompt), with text targets
``<boi>``, ``<eoi>``, ``</s>`` and the head's targets at the image. :meth:`freeze_llm` keeps the LM (except
LoRA adapters) and the codebooks frozen; :meth:`save_pretrained` writes the official layout with the adapters
merged into the LM's weights, so the result loads like the release.
"""
from __future__ import annotations

import hashlib
import logging
import os

import torch
import torch.nn as nn

from ..pretrained import CheckpointError
from .config import MLLMConfig
from .connector import CausalCodeEmbedder
from .data import IGNORE
from .formats import PromptFormat, VicunaV1
from .model import UniTokMLLM, _drop_llm_weights, _ignore_missing_llm_weights
from .official_layout import (EMBEDDER, HEAD, Layout, check_keys, llama_config, load_lm, load_tokenizer, read_layout,
                              read_tensors, resolve_official, save_layout, to_library, to_official)
from .prompts import check_length, codes_as_rows

log = logging.getLogger(__name__)

FEEDBACK = ('position', 'prefix')
PAD_COLOUR = (122, 116, 104)       # the official evaluation's padding colour (the data's mean)
GRID, PROJ_HEADS = (16, 16), 16


def expand2square(image, colour=PAD_COLOUR):
    """A PIL image padded to a square with ``colour``, the original centred (as the official evaluation)."""
    from PIL import Image
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), colour)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def codebook_digest(codebooks: torch.Tensor) -> str:
    """sha256 of raw codebooks ``(K, V, d)`` at bfloat16, the precision the released checkpoint stores."""
    t = codebooks.detach().float().cpu().to(torch.bfloat16).contiguous()
    return hashlib.sha256(t.view(torch.int16).numpy().tobytes()).hexdigest()


class OfficialMLLM(UniTokMLLM):
    """The released MLLM; build it with :meth:`load` (or ``UniTokMLLM.from_pretrained``)."""

    def __init__(self, config: MLLMConfig, llm: nn.Module, text_tokenizer, embedder: CausalCodeEmbedder,
                 head: nn.Module, prompt_format: PromptFormat | None = None, raw_config: dict | None = None,
                 source: str | None = None, feedback: str = 'position'):
        nn.Module.__init__(self)
        if feedback not in FEEDBACK:
            raise ValueError(f'feedback must be one of {FEEDBACK}, got {feedback!r}')
        self.config, self.llm, self.embedder, self.head = config, llm, embedder, head
        self.__dict__.update(text_tokenizer=text_tokenizer, _image_tokenizer=None, raw_config=dict(raw_config or {}),
                             source=source, prompt_format=prompt_format or VicunaV1())
        self.feedback = feedback
        eos = int(text_tokenizer.eos_token_id)
        self._stop, self._end_of_turn = {eos}, eos

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, directory: str, tokenizer=None, map_location: str = 'cpu', revision: str | None = None,
                        **options) -> 'OfficialMLLM':
        folder = resolve_official(os.fspath(directory), revision)
        if folder is None:
            raise CheckpointError(f'{directory!r} is not a released UniTok MLLM checkpoint (a folder or hub repo '
                                  'whose config.json has model_type "mini_gemini")')
        return cls.load(folder, tokenizer=tokenizer, device=map_location, **options)

    @classmethod
    def load(cls, folder: str, *, dtype: torch.dtype = torch.bfloat16, tokenizer=None, device: str | None = None,
             feedback: str = 'position', device_map: str | None = 'auto') -> 'OfficialMLLM':
        """Load an official folder: everything checked first, then the LM through ``transformers`` shard by
        shard in ``dtype`` (``device_map='auto'`` when a GPU is present; None: on the CPU, for a trainer to
        place), the image input and head from their shards. ``tokenizer``: the UniTok tokenizer (model, folder
        or hub id) to encode and decode images."""
        layout = read_layout(folder)
        config = llama_config(layout.config)
        embedder, head = _empty_parts(layout, config)
        parts = {**{'embedder.' + k: v for k, v in embedder.state_dict().items()},
                 **{'head.' + k: v for k, v in head.state_dict().items()}}
        with torch.device('meta'):
            from transformers import LlamaForCausalLM
            lm_keys = list(LlamaForCausalLM(config).state_dict())
        check_keys(layout, lm_keys + list(to_official(parts)))
        _report_unused(layout, lm_keys)
        state = to_library(read_tensors(layout, [k for k in layout.weight_map if k.startswith((EMBEDDER, HEAD))],
                                        dtype), embedder.num_codebooks)
        embedder.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith('embedder.')}, assign=True)
        head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith('head.')}, assign=True)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        head.rotary = LlamaRotaryEmbedding(config)                  # its buffers are not in the checkpoint
        lm = load_lm(layout, config, dtype, device_map)
        text_tok = load_tokenizer(folder, config)
        K, V, d = embedder.codebooks.shape
        cfg = MLLMConfig(llm=os.path.abspath(folder), num_codebooks=K, codebook_size=V, code_dim=d, grid=GRID,
                         post_quant=False, llm_dim=config.hidden_size, base_vocab=config.vocab_size,
                         image_token_ids={'<boi>': 3, '<eoi>': 4},
                         llm_ref={'layout': 'official', 'codebook_sha256': codebook_digest(embedder.codebooks)})
        at = lm.get_input_embeddings().weight.device
        mllm = cls(cfg, lm, text_tok, embedder.to(at), head.to(at), raw_config=layout.config,
                   source=os.path.abspath(folder), feedback=feedback)
        if device not in (None, 'cpu') and not getattr(lm, 'hf_device_map', None):
            mllm.to(device)
        if tokenizer is not None:
            mllm.set_image_tokenizer(tokenizer)
        return mllm.eval()

    def save_pretrained(self, directory: str, max_shard_size: str | int = '5GB') -> None:
        """Write the official layout (config.json, safetensors shards + index, tokenizer files), all-or-nothing;
        LoRA adapters merged into the LM's weights, every tensor in the LM's dtype."""
        from .lora import merged_state_dict
        parts = {**{'embedder.' + k: v for k, v in self.embedder.state_dict().items()},
                 **{'head.' + k: v for k, v in self.head.state_dict().items()}}
        save_layout(directory, self.raw_config, merged_state_dict(self.llm), parts, self.text_tokenizer, self.source,
                    max_shard_size)

    def set_image_tokenizer(self, tokenizer) -> None:
        """Use this UniTok tokenizer for images; warns when its codebooks differ (by sha256 at bfloat16) from
        the copy inside this MLLM, which then reads and writes codes of another code space."""
        from ..model import UniTok
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = UniTok.from_pretrained(os.fspath(tokenizer))
        raw = tokenizer.quantizer.codebook.detach().reshape(self.embedder.codebooks.shape)
        theirs, ours = codebook_digest(raw), self.config.llm_ref['codebook_sha256']
        if theirs != ours:
            log.warning('the UniTok tokenizer\'s codebooks (sha256 %s) differ from the codebooks inside this MLLM '
                        '(sha256 %s): its codes are read with the MLLM\'s copy', theirs[:12], ours[:12])
        self.__dict__['_image_tokenizer'] = tokenizer.to(self.device).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.embedder.codebooks.device

    # ------------------------------------------------------------------ inputs
    def image_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        """Sub-codes ``(N, K)`` -> ``(N, C)``, each position alone through the causal projection."""
        return self.embedder(codes[:, None])[:, 0]

    def next_image_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        """Input of the last generated position of ``codes (N, n, K)``: alone (``'position'``) or read with
        the positions before it (``'prefix'``)."""
        return self.embedder(codes[:, -1:] if self.feedback == 'position' else codes)[:, -1:]

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None,
              codes: torch.Tensor | None = None, generated: bool = False) -> torch.Tensor:
        """Text ids through the LM's table; the image positions of each row through the embedder, the image
        whole (causal); positions being sampled (``generated``) as :attr:`feedback` says."""
        x = self.llm.get_input_embeddings()(input_ids)
        if image_mask is None or not bool(image_mask.any()):
            return x
        x = x.clone()
        for b in range(x.shape[0]):
            where = image_mask[b].nonzero()[:, 0]
            if len(where):
                run = codes[b, where]                                                  # (n, K)
                alone = generated and self.feedback == 'position'
                e = self.embedder(run[:, None])[:, 0] if alone else self.embedder(run[None])[0]
                x[b, where] = e.to(x.dtype)
        return x

    def understanding_example(self, codes: torch.Tensor, question: str, answer: str | None = None) -> dict:
        """The official understanding prompt (:class:`VicunaV1`) with the image's L positions spliced in; with an
        ``answer``, its ids and ``</s>`` follow as the text targets (the official vicuna_v1 training layout)."""
        ids, at = self.prompt_format.understanding_ids(self.text_tokenizer, question, True)
        target = [] if answer is None else self.prompt_format.answer_ids(self.text_tokenizer, answer)
        L, K = self.config.num_positions, self.config.num_codebooks
        full = ids[:at] + [0] * L + ids[at:] + target
        check_length(self, len(full))
        image = torch.zeros(len(full), dtype=torch.bool)
        image[at:at + L] = True
        grid = torch.zeros(len(full), K, dtype=torch.long)
        grid[at:at + L] = codes_as_rows(self.config, codes)
        labels = torch.full((len(full),), IGNORE)
        if target:                        # position t predicts token t+1: the prompt's last one predicts target[0]
            labels[len(full) - len(target) - 1:-1] = torch.tensor(target)
        return dict(input_ids=torch.tensor(full), image_mask=image, codes=grid, labels=labels,
                    image_targets=torch.zeros(len(full), dtype=torch.bool))

    def generation_example(self, codes: torch.Tensor, prompt: str | None) -> dict:
        """The official text-to-image training sequence ``<s> PROMPT Generate an image based on this description.
        <boi> image <eoi> </s>`` (``prompt=None``: ``<s> <unconditional>``): text targets ``<boi>`` (from the
        prompt's last token), ``<eoi>`` (from the image's last position) and ``</s>``; the head's targets are
        the L image positions, each predicted from the position before it."""
        f, tok = self.prompt_format, self.text_tokenizer
        pre = f.generation_training_ids(tok, prompt)
        L, K, P = self.config.num_positions, self.config.num_codebooks, len(pre)
        ids = pre + [f.boi_id] + [0] * L + [f.eoi_id, int(tok.eos_token_id)]
        check_length(self, len(ids))
        image = torch.zeros(len(ids), dtype=torch.bool)
        image[P + 1:P + 1 + L] = True
        grid = torch.zeros(len(ids), K, dtype=torch.long)
        grid[P + 1:P + 1 + L] = codes_as_rows(self.config, codes)
        labels = torch.full((len(ids),), IGNORE)
        labels[P - 1], labels[P + L], labels[P + L + 1] = f.boi_id, f.eoi_id, int(tok.eos_token_id)
        targets = torch.zeros(len(ids), dtype=torch.bool)
        targets[P:P + L] = True
        return dict(input_ids=torch.tensor(ids), image_mask=image, codes=grid, labels=labels, image_targets=targets)

    def freeze_llm(self) -> None:
        """Train the image input's projections, the head and LoRA adapters (if any): the LM and the codebooks
        stay frozen (the official training freezes its quantizer too). From here on :meth:`state_dict` leaves
        the frozen LM out, as :class:`UniTokMLLM`'s does, so checkpoints hold what trains;
        :meth:`save_pretrained` still writes the whole model."""
        for n, p in self.llm.named_parameters():
            p.requires_grad_('lora_' in n)
        self.embedder.codebooks.requires_grad_(False)
        if not self.__dict__.get('_trainable_state'):
            self.register_state_dict_post_hook(_drop_llm_weights)
            self.register_load_state_dict_post_hook(_ignore_missing_llm_weights)
            self.__dict__['_trainable_state'] = True

    def text_example(self, question: str) -> dict:
        ids, _ = self.prompt_format.understanding_ids(self.text_tokenizer, question, False)
        return dict(input_ids=torch.tensor(ids), image_mask=torch.zeros(len(ids), dtype=torch.bool),
                    codes=torch.zeros(len(ids), self.config.num_codebooks, dtype=torch.long))

    def generation_prompt(self, prompt: str | None) -> list[int]:
        """``PROMPT Generate an image based on this description.\\x00`` (None: ``<unconditional>\\x00``) as ids."""
        return self.prompt_format.generation_ids(self.text_tokenizer, prompt)

    def encode_image(self, image) -> torch.Tensor:
        """Codes ``(K, h, w)``; a path or PIL image is padded to a square with the official colour and resized
        (bilinear) to the tokenizer's size, 256 px for the release's; tensors go to the tokenizer as they are."""
        if not isinstance(image, torch.Tensor):
            import numpy as np
            from PIL import Image
            img = Image.open(image) if isinstance(image, (str, os.PathLike)) else image
            size = self.image_tokenizer.config.image_size
            img = expand2square(img.convert('RGB')).resize((size, size), Image.BILINEAR)
            image = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(127.5).sub(1)
        return super().encode_image(image)

    def code_logits(self, prompt: str, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced sub-code logits ``(L, K, V)`` of an image ``codes (K, h, w)`` after ``prompt`` in the
        training layout (``<s> PROMPT Generate an image based on this description. <boi>`` + image, read whole)."""
        tok = self.text_tokenizer
        ids = self.prompt_format.generation_training_ids(tok, prompt) + [self.prompt_format.boi_id]
        rows = codes_as_rows(self.config, codes).to(self.device)
        L, P = len(rows), len(ids)
        with torch.inference_mode():
            x = torch.cat([self.embed(torch.tensor([ids], device=self.device)),
                           self.embedder(rows[None]).to(self.llm.dtype)], dim=1)
            h = self.hidden_states(x, torch.ones(1, P + L, dtype=torch.long, device=self.device))[0]
            return self.head(h[P - 1:P - 1 + L].to(self.head.pos_embed.dtype), rows)


UniTokMLLM.released = OfficialMLLM


def code_space_of(folder: str) -> tuple[int, int, tuple[int, int]]:
    """``(K, codebook size, grid)`` of the codes an official folder reads, from its tensors' shapes alone (a
    trainer checks its codes against them before the LM is loaded)."""
    layout = read_layout(folder)
    embedder, _ = _empty_parts(layout, llama_config(layout.config))
    return embedder.num_codebooks, embedder.codebook_size, GRID


def _empty_parts(layout: Layout, config) -> tuple[CausalCodeEmbedder, nn.Module]:
    """The embedder and head sized from the checkpoint's tensors (on the meta device, weights come next)."""
    from safetensors import safe_open
    from ..generation.heads import LlamaCodeHead
    wm = layout.weight_map
    K = len([k for k in wm if k.startswith(f'{EMBEDDER}quantizer.codebooks.') and k.endswith('codebook.weight')])
    depth = len({k.split('.')[2] for k in wm if k.startswith(f'{HEAD}layers.')})
    shape_keys = [f'{EMBEDDER}quantizer.codebooks.0.codebook.weight', f'{EMBEDDER}attn_projection.proj.weight',
                  f'{HEAD}linear_head.weight']
    missing = [k for k in shape_keys if k not in wm]
    if not K or not depth or missing:
        raise CheckpointError(f'{layout.folder}: not the released MLLM layout (no image input / head tensors '
                              f'{missing or "model.multi_embedder.*, ar_head.layers.*"}); nothing was loaded')
    shapes = {}
    for k in shape_keys:
        with safe_open(os.path.join(layout.folder, wm[k]), 'pt') as f:
            shapes[k] = f.get_slice(k).get_shape()
    (V, d), proj_dim, heads_V = shapes[shape_keys[0]], shapes[shape_keys[1]][0], shapes[shape_keys[2]][0]
    with torch.device('meta'):
        embedder = CausalCodeEmbedder(K, V, d, config.hidden_size, proj_dim, PROJ_HEADS)
        head = LlamaCodeHead(config, K, heads_V, depth)
    return embedder, head


def _report_unused(layout: Layout, lm_keys: list[str]) -> None:
    known = set(lm_keys)
    unused = [k for k in layout.weight_map if k not in known and not k.startswith((EMBEDDER, HEAD))]
    if unused:
        log.warning('%s: %d tensor(s) not used by the released MLLM are ignored (e.g. %s)', layout.folder,
                    len(unused), unused[:3])
