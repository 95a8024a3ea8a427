"""The released UniTok MLLM's checkpoint layout (``FoundationVision/unitok_mllm``), read and written.

A folder with ``config.json`` (``model_type: mini_gemini``, a Llama config), sharded safetensors with
``model.safetensors.index.json`` (or one ``model.safetensors``) and the Llama tokenizer files. Its keys:
the Llama LM (``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``), the image input
``model.multi_embedder.*`` (``quantizer.codebooks.{k}.codebook.weight`` / ``.vocab_usage``,
``attn_projection.*``, ``mm_projector.{0,1,3}.*``) and the sub-code head ``ar_head.*``.

The LM is loaded by ``transformers`` itself (``LlamaForCausalLM.from_pretrained``: shard by shard, in the
asked dtype, ``device_map='auto'`` through accelerate when a GPU is present); the image input and the head
are read from the shards that hold them. Everything is checked first (index, shards, keys), so a bad folder
is one clear error and nothing is loaded; pickled weights are never read.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch

from ..pretrained import CheckpointError, is_hub_id

MODEL_TYPE = 'mini_gemini'
INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'
PICKLES = ('.bin', '.pt', '.pth', '.pkl', '.pickle', '.ckpt')
EMBEDDER, HEAD = 'model.multi_embedder.', 'ar_head.'
_MLP = {'0': 'norm', '1': 'fc1', '3': 'fc2'}           # mm_projector's Sequential slots -> Projector names
TOKENIZER_FILES = ('tokenizer.model',)                 # copied on save where the source had them


@dataclass
class Layout:
    """A checked official folder: its config dict and which file holds each tensor."""
    folder: str
    config: dict
    weight_map: dict


def is_official(folder: str) -> bool:
    """Whether ``folder`` holds a released-MLLM checkpoint (``config.json`` of ``model_type`` mini_gemini)."""
    try:
        with open(os.path.join(folder, 'config.json')) as f:
            return json.load(f).get('model_type') == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def resolve_official(name: str, revision: str | None = None) -> str | None:
    """The local folder of a released-MLLM checkpoint named by a local path or a hub id (fetched by
    ``huggingface_hub``; offline from its cache), or None when ``name`` is not one."""
    if os.path.isdir(name):
        return name if is_official(name) else None
    if not is_hub_id(name):
        return None
    from huggingface_hub import hf_hub_download
    try:
        config = hf_hub_download(name, 'config.json', revision=revision)
    except Exception:            # no such file / repo / cache entry: not this layout; the caller's path reports
        return None
    if not is_official(os.path.dirname(config)):
        return None
    from ..pretrained import download
    return download(name, revision, ['*.json', '*.safetensors', *TOKENIZER_FILES])


def read_layout(folder: str) -> Layout:
    """Check ``folder`` (config, index, every shard present, safetensors only) and map its tensors to files."""
    try:
        with open(os.path.join(folder, 'config.json')) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f'cannot read {folder}/config.json: {e}') from None
    index, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = dict(json.load(f)['weight_map'])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f'cannot read the shard index {index}: {e}') from None
        missing = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(folder, s))})
        if missing:
            raise CheckpointError(f'{folder}: the index lists shard(s) {missing} that are not in the folder; '
                                  'nothing was loaded (download the whole checkpoint again)')
        bad = sorted({s for s in weight_map.values() if not s.endswith('.safetensors')})
        if bad:
            raise CheckpointError(f'{folder}: the index names non-safetensors shard(s) {bad}; only safetensors '
                                  'weights are read (pickles can run code): nothing was loaded')
    elif os.path.isfile(single):
        from safetensors import safe_open
        with safe_open(single, 'pt') as f:
            weight_map = {k: SINGLE for k in f.keys()}
    else:
        pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLES))
        why = (f'it holds only pickled weights {pickles}, which are refused (loading a pickle can run code); '
               'convert them to safetensors') if pickles else f'it has neither {INDEX} nor {SINGLE}'
        raise CheckpointError(f'{folder}: {why}; nothing was loaded')
    return Layout(folder, config, weight_map)


def llama_config(config: dict):
    """The ``LlamaConfig`` of the released model's ``config.json`` (the mini_gemini type is a Llama)."""
    from transformers import LlamaConfig
    drop = ('model_type', 'architectures', 'auto_map', 'transformers_version', 'torch_dtype', 'dtype')
    return LlamaConfig(**{k: v for k, v in config.items() if k not in drop and not (k == 'rope_scaling' and v is None)})


def check_keys(layout: Layout, expected: list[str]) -> None:
    missing = [k for k in expected if k not in layout.weight_map]
    if missing:
        raise CheckpointError(f'{layout.folder}: {len(missing)} tensor(s) of the released MLLM are not in the '
                              f'checkpoint (e.g. {missing[:4]}); nothing was loaded')


def load_tokenizer(folder: str, config):
    """The Llama tokenizer of the folder (``transformers.AutoTokenizer``, told the config: the mini_gemini
    type in config.json is not one it knows)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, config=config)
    except (OSError, ValueError) as e:
        raise CheckpointError(f'cannot load the tokenizer of {folder}: {str(e).splitlines()[0]}') from None


def load_lm(layout: Layout, config, dtype: torch.dtype, device_map: str | None = 'auto'):
    """The Llama LM through ``transformers`` (its keys were checked before; the others are not its own);
    ``device_map`` is used when a GPU is present (None: the CPU)."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    kwargs = {'device_map': device_map} if device_map and torch.cuda.is_available() else {}
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()           # the image input and head keys are read below, not unused
    try:
        lm = LlamaForCausalLM.from_pretrained(layout.folder, config=config, dtype=dtype, use_safetensors=True,
                                              low_cpu_mem_usage=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f'cannot load the language model of {layout.folder}: {str(e).splitlines()[0]}') from None
    finally:
        hf_logging.set_verbosity(level)
    return lm.eval()


def read_tensors(layout: Layout, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``keys`` read from the shards that hold them, one shard open at a time, cast to ``dtype``."""
    from safetensors import safe_open
    out: dict[str, torch.Tensor] = {}
    by_shard: dict[str, list[str]] = {}
    for k in keys:
        by_shard.setdefault(layout.weight_map[k], []).append(k)
    for shard, names in sorted(by_shard.items()):
        with safe_open(os.path.join(layout.folder, shard), 'pt') as f:
            for k in names:
                t = f.get_tensor(k)
                out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def to_library(state: dict[str, torch.Tensor], num_codebooks: int) -> dict[str, torch.Tensor]:
    """Official embedder/head keys -> the library's (``embedder.*``, ``head.*``)."""
    out: dict[str, torch.Tensor] = {}
    cb = f'{EMBEDDER}quantizer.codebooks.'
    out['embedder.codebooks'] = torch.stack([state[f'{cb}{k}.codebook.weight'] for k in range(num_codebooks)])
    out['embedder.usage'] = torch.stack([state[f'{cb}{k}.vocab_usage'] for k in range(num_codebooks)])
    for k, v in state.items():
        if k.startswith(EMBEDDER + 'attn_projection.'):
            out['embedder.projection.' + k[len(EMBEDDER + 'attn_projection.'):]] = v
        elif k.startswith(EMBEDDER + 'mm_projector.'):
            slot, rest = k[len(EMBEDDER + 'mm_projector.'):].split('.', 1)
            out[f'embedder.projector.{_MLP[slot]}.{rest}'] = v
        elif k.startswith(HEAD):
            out['head.' + k[len(HEAD):]] = v
    return out


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The library's ``embedder.*`` / ``head.*`` keys -> the official ones (inverse of :func:`to_library`)."""
    out: dict[str, torch.Tensor] = {}
    back = {v: k for k, v in _MLP.items()}
    for k, v in state.items():
        if k == 'embedder.codebooks' or k == 'embedder.usage':
            name = 'codebook.weight' if k.endswith('codebooks') else 'vocab_usage'
            for i in range(v.shape[0]):
                out[f'{EMBEDDER}quantizer.codebooks.{i}.{name}'] = v[i]
        elif k.startswith('embedder.projection.'):
            out[EMBEDDER + 'attn_projection.' + k[len('embedder.projection.'):]] = v
        elif k.startswith('embedder.projector.'):
            part, rest = k[len('embedder.projector.'):].split('.', 1)
            out[f'{EMBEDDER}mm_projector.{back[part]}.{rest}'] = v
        elif k.startswith('head.'):
            out[HEAD + k[len('head.'):]] = v
    return out


def save_layout(directory: str, config: dict, lm_state: dict[str, torch.Tensor], parts: dict[str, torch.Tensor],
                tokenizer, source: str | None, max_shard_size: str | int = '5GB') -> None:
    """Write the official layout all-or-nothing: config.json, safetensors shards + index, tokenizer files.
    ``lm_state``: the LM's weights under its own names; ``parts``: the library's ``embedder.*`` / ``head.*``
    tensors, stored in the LM's dtype (a trainer keeps them in float32), as the release stores one dtype."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from ..utils.io import staged_directory
    dtype = next(iter(lm_state.values())).dtype
    parts = {k: v.to(dtype) if v.is_floating_point() else v for k, v in parts.items()}
    state = {**lm_state, **to_official(parts)}
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    dtype_name = str(dtype).replace('torch.', '')
    with staged_directory(directory, 'MLLM directory') as stage:
        for name, keys in split.filename_to_tensors.items():
            save_file({k: state[k] for k in keys}, os.path.join(stage, name), metadata={'format': 'pt'})
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {'metadata': {**split.metadata, 'total_size': total}, 'weight_map': split.tensor_to_filename}
        if not split.is_sharded:                  # one file: keep the index form the release uses
            os.replace(os.path.join(stage, SINGLE), os.path.join(stage, 'model-00001-of-00001.safetensors'))
            index['weight_map'] = {k: 'model-00001-of-00001.safetensors' for k in state}
        with open(os.path.join(stage, INDEX), 'w') as f:
            json.dump(index, f, indent=2)
        with open(os.path.join(stage, 'config.json'), 'w') as f:
            json.dump({**config, 'torch_dtype': dtype_name}, f, indent=2)
        tokenizer.save_pretrained(stage)
        for name in TOKENIZER_FILES:
            if source and os.path.isfile(os.path.join(source, name)) and not os.path.exists(os.path.join(stage, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(stage, name))
