#!/usr/bin/env python3
"""Golden fixtures of the released UniTok MLLM (``FoundationVision/unitok_mllm``), made by the official code.

Runs the official ``eval/liquid`` model code of github.com/FoundationVision/UniTok unedited (only import-time
stubs for packages it imports but never uses here: deepspeed, open_clip, and the tokenizer-side modules of the
generation script) on a tiny random model of the released layout, and writes ``tests/fixtures/golden_mllm``.

Environment (its own, never the library's): python 3.11,

    python3 -m venv /work/venv-official
    /work/venv-official/bin/pip install torch==2.14.1 transformers==4.39.3 sentencepiece safetensors timm protobuf
    git clone https://github.com/FoundationVision/UniTok CLONE      # used at bb8012e8e8d7be66928bedd80506c56a55ea6305
    /work/venv-official/bin/python scripts/make_mllm_golden.py --official CLONE --out tests/fixtures/golden_mllm

The weights are not stored: every parameter is filled by :func:`fill` (a seeded normal per tensor name), which
the tests repeat; ``checkpoint_manifest.json`` holds the sha256 of every tensor the official
``save_pretrained`` wrote, so a test can prove it rebuilt the same checkpoint.
"""
import argparse
import hashlib
import json
import os
import sys
import time
import types
import zlib

import numpy as np
import torch

HIDDEN, LAYERS, HEADS, VOCAB = 64, 2, 4, 512
CORPUS = ["A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.", "USER: What is in this image? ASSISTANT:",
          "a red apple on a wooden table. Generate an image based on this description.", "<unconditional>",
          "a cat sleeping on a sofa", "Describe this image thoroughly.", "The capital of France is Paris.",
          "an emoji of a grinning face with big eyes", "a photo of a dog running in the park at sunset"]
QUESTION = 'What is in this image?'
PROMPTS = ['a red apple on a wooden table', 'a cat']
POSITIONS = 16              # image positions generated greedily
KEPT_CFG_POSITIONS = 2      # positions whose guided logits (all 8 sub-codes) are stored


def fill(name: str, shape) -> torch.Tensor:
    """The value of parameter ``name``: a normal seeded by crc32 of the name, scaled by its role."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = torch.randn(tuple(shape), generator=g)
    if len(shape) == 1:
        return 1.0 + 0.1 * x if name.endswith('.weight') else 0.1 * x      # norm scales; biases
    return x / float(shape[-1]) ** 0.5


def shims(official: str) -> None:
    """Stub modules the official files import at the top but do not use on this path."""
    ds = types.ModuleType('deepspeed')
    ds.zero = types.SimpleNamespace(GatheredParameters=None)
    sys.modules['deepspeed'] = ds
    oc = types.ModuleType('open_clip')
    for sub, names in {'factory': ['load_state_dict', 'get_model_config'],
                       'model': ['CLIPVisionCfg', 'CLIPTextCfg', '_build_vision_tower',
                                 'convert_to_custom_text_state_dict', 'resize_pos_embed']}.items():
        m = types.ModuleType(f'open_clip.{sub}')
        for n in names:
            setattr(m, n, None)
        sys.modules[f'open_clip.{sub}'] = m
    sys.modules['open_clip'] = oc
    for mod, name in (('utils.config', 'Args'), ('models.unitok', 'UniTok')):       # infer_genai's tokenizer side
        pkg = types.ModuleType(mod.split('.')[0])
        sys.modules.setdefault(mod.split('.')[0], pkg)
        m = types.ModuleType(mod)
        setattr(m, name, None)
        sys.modules[mod] = m
    sys.path.insert(0, os.path.join(official, 'eval', 'liquid'))


def train_spm(path: str) -> str:
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=os.path.join(path, 'spm'), model_type='bpe',
        vocab_size=VOCAB, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        split_digits=True, add_dummy_prefix=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, minloglevel=2)
    return os.path.join(path, 'spm.model')


def make_checkpoint(folder: str, work: str):
    from transformers import LlamaTokenizer, LlamaTokenizerFast
    from model.language_model.mini_gemini_llama import MiniGeminiConfig, MiniGeminiLlamaForCausalLM
    slow = LlamaTokenizer(vocab_file=train_spm(work), legacy=True, pad_token='<unk>')
    assert slow.convert_ids_to_tokens([3, 4]) == ['<0x00>', '<0x01>'], slow.convert_ids_to_tokens([3, 4])
    slow.save_pretrained(folder)
    LlamaTokenizerFast.from_pretrained(folder).save_pretrained(folder)          # adds tokenizer.json
    cfg = MiniGeminiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                           max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, tie_word_embeddings=False)
    model = MiniGeminiLlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(fill(n, p.shape))
    model.save_pretrained(folder, safe_serialization=True, max_shard_size='12MB')
    return model


def manifest(folder: str) -> dict:
    from safetensors import safe_open
    index = json.load(open(os.path.join(folder, 'model.safetensors.index.json')))
    out = {}
    for shard in sorted(set(index['weight_map'].values())):
        with safe_open(os.path.join(folder, shard), 'pt') as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = {'shard': shard, 'shape': list(t.shape), 'dtype': str(t.dtype).replace('torch.', ''),
                          'sha256': hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()}
    return out


def understanding(model, folder: str, codes: torch.Tensor) -> dict:
    from transformers import AutoTokenizer
    from conversation import conv_templates
    from mm_utils import tokenizer_image_token
    from constants import IMAGE_TOKEN_INDEX
    tok = AutoTokenizer.from_pretrained(folder, use_fast=False)       # as model/builder.py loads it
    conv = conv_templates['vicuna_v1'].copy()
    conv.append_message(conv.roles[0], '<image>\n' + QUESTION)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    ids = tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX, return_tensors='pt')[None]
    with torch.no_grad():
        _, _, _, _, embeds, _ = model.prepare_inputs_for_multimodal(ids, None, None, None, None, images=codes[None])       # as batched by its DataLoader
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0]
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    keep = list(range(at - 2, at + 4)) + list(range(logits.shape[0] - 8, logits.shape[0]))
    return {'prompt': prompt, 'ids': ids[0].tolist(), 'logits': logits[keep].numpy(), 'positions': keep}


def teacher_forced(model, folder: str, codes: torch.Tensor) -> dict:
    """The ar_head's teacher-forced logits on a text-to-image example of train.py's layout. The official
    training forward cannot run as released (its ar_head call asks return_dict=False and passes the tuple to
    linear_head), so its steps are driven here: the official multimodal splice, LLM, ar_head and linear head."""
    from transformers import AutoTokenizer
    from constants import IMAGE_TOKEN_INDEX
    tok = AutoTokenizer.from_pretrained(folder, use_fast=False)
    text_ids = tok(PROMPTS[0] + ' Generate an image based on this description.', return_tensors='pt').input_ids[0]
    ids = torch.cat([text_ids, torch.tensor([3, IMAGE_TOKEN_INDEX, 4, 2])])
    labels = ids.clone()
    labels[:len(text_ids)] = -100
    mask = torch.ones_like(ids[None]).bool()
    with torch.no_grad():
        out = model.prepare_inputs_labels_for_multimodal(ids[None], None, mask, None, labels[None], [codes],
                                                         None, torch.tensor([1]))
        embeds, (start, end) = out[4], out[8][0]
        hidden = model.model(inputs_embeds=embeds, attention_mask=out[2], position_ids=out[1]).last_hidden_state
        base = hidden[0, start - 1:end - 1][:4, None]                                # (4, 1, C): first 4 positions
        targets = codes[0].t()[:4]                                                   # (4, 8)
        h = torch.cat([base] + [model.ar_head.codebooks[i](targets[:, i])[:, None] for i in range(7)], dim=1)
        logits = model.ar_head.linear_head(model.ar_head(inputs_embeds=h, use_cache=False, return_dict=False)[0])
    return {'ids': ids.tolist(), 'image_start': int(start), 'head_logits': logits.numpy()}


def generate(model, folder: str, cfg_scale: float, prompts, positions: int = POSITIONS) -> dict:
    """Greedy image positions through T2I_forward_withcache, driven as eval/infer_genai.py drives it
    (its sample() with sample_logits=False). ``head_seconds``: the time spent in the ar_head loop."""
    from transformers import AutoTokenizer
    from eval.infer_genai import sample
    tok = AutoTokenizer.from_pretrained(folder, padding_side='left')
    texts = [p + ' Generate an image based on this description.\x00' for p in prompts]
    if cfg_scale > 1:
        texts = texts + ['<unconditional>\x00'] * len(prompts)
    inputs = tok(texts, return_tensors='pt', padding=True)
    kwargs = {'attention_mask': inputs['attention_mask'], 'use_cache': True,
              'cache_position': torch.arange(inputs['input_ids'].shape[1])}
    input_ids, multi, pred, kept, head_seconds = inputs['input_ids'], None, [], [], 0.0
    with torch.no_grad():
        for pos in range(positions):
            step = model.prepare_inputs_for_generation(input_ids, **kwargs)
            out = model.T2I_forward_withcache(**step, input_multi_ids=multi, return_dict=True,
                                              output_attentions=False, output_hidden_states=False)
            h, codes = out['last_hidden_state'][:, -1:, :], []
            t = time.perf_counter()
            for k in range(8):
                logits = model.ar_head.linear_head(model.ar_head(inputs_embeds=h, use_cache=False,
                                                                 output_attentions=False, output_hidden_states=False,
                                                                 return_dict=False)[0])
                if cfg_scale > 1:
                    c, u = torch.split(logits, len(logits) // 2, dim=0)
                    guided = u + (c - u) * cfg_scale
                    if pos < KEPT_CFG_POSITIONS:
                        kept.append(guided[:, -1].float().numpy())
                    half, _ = sample(guided, sample_logits=False)
                    nxt = torch.cat([half, half])
                else:
                    if pos < KEPT_CFG_POSITIONS:
                        kept.append(logits[:, -1].float().numpy())
                    nxt, _ = sample(logits, sample_logits=False)
                codes.append(nxt)
                if k < 7:
                    h = torch.cat([h, model.ar_head.codebooks[k](nxt)], dim=1)
            head_seconds += time.perf_counter() - t
            pred.append(torch.cat(codes, dim=1))
            multi = torch.stack(pred, dim=-1)
            input_ids = torch.cat([input_ids, torch.zeros_like(input_ids[:, :1])], dim=-1)
            kwargs = model._update_model_kwargs_for_generation(out, kwargs, is_encoder_decoder=False)
    codes = torch.stack(pred, dim=-1)[:len(prompts)]                      # (B, 8, POSITIONS)
    return {'texts': texts, 'ids': inputs['input_ids'].tolist(), 'mask': inputs['attention_mask'].tolist(),
            'codes': codes.numpy(), 'logits': np.stack(kept, 1), 'head_seconds': head_seconds}


def time_official(folder: str, prompt: str, cfg_scale: float, positions: int, dtype: str) -> None:
    """Print (JSON) the seconds of ``positions`` greedy positions of the official cached path on ``folder``
    (for benchmarks/mllm_speed.py --official), its head's share and the codes."""
    from transformers import AutoModelForCausalLM
    import model.language_model.mini_gemini_llama  # noqa: F401  (registers the mini_gemini type, as builder.py does)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=getattr(torch, dtype),
                                                 attn_implementation='sdpa').eval()
    generate(model, folder, cfg_scale, [prompt], 2)                        # warm-up
    t = time.perf_counter()
    out = generate(model, folder, cfg_scale, [prompt], positions)
    seconds = time.perf_counter() - t
    print(json.dumps({'seconds': seconds, 'head_seconds': out['head_seconds'], 'codes': out['codes'].tolist()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--official', required=True, help='a clone of github.com/FoundationVision/UniTok')
    ap.add_argument('--out', help='where the fixtures go')
    ap.add_argument('--work', default='/tmp/unitok_mllm_golden')
    ap.add_argument('--time', metavar='FOLDER', help='instead: time the official generation on this checkpoint')
    ap.add_argument('--prompt', default=PROMPTS[0])
    ap.add_argument('--cfg', type=float, default=5.0)
    ap.add_argument('--positions', type=int, default=16)
    ap.add_argument('--dtype', default='float32')
    a = ap.parse_args()
    shims(a.official)
    if a.time:
        return time_official(a.time, a.prompt, a.cfg, a.positions, a.dtype)
    if not a.out:
        ap.error('--out is required (or --time)')
    folder = os.path.join(a.work, 'unitok_mllm_tiny')
    os.makedirs(folder, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    make_checkpoint(folder, a.work)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation='eager').eval()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 4096, (1, 8, 256), generator=g)
    und, tf = understanding(model, folder, codes), teacher_forced(model, folder, codes)
    gen7, gen1 = generate(model, folder, 7.0, PROMPTS), generate(model, folder, 1.0, PROMPTS[:1])
    np.savez_compressed(os.path.join(a.out, 'golden_mllm.npz'), image_codes=codes[0].numpy(),
                        understanding_logits=und['logits'], head_logits=tf['head_logits'],
                        cfg7_codes=gen7['codes'], cfg7_logits=gen7['logits'], cfg1_codes=gen1['codes'],
                        cfg1_logits=gen1['logits'])
    import transformers
    meta = {'official_commit': 'bb8012e8e8d7be66928bedd80506c56a55ea6305', 'torch': torch.__version__,
            'transformers': transformers.__version__, 'question': QUESTION, 'prompts': PROMPTS,
            'understanding': {k: und[k] for k in ('prompt', 'ids', 'positions')},
            'teacher_forced': {k: tf[k] for k in ('ids', 'image_start')},
            'cfg7': {k: gen7[k] for k in ('texts', 'ids', 'mask')}, 'cfg1': {k: gen1[k] for k in ('texts', 'ids', 'mask')},
            'positions': POSITIONS, 'kept_logit_positions': KEPT_CFG_POSITIONS}
    json.dump(meta, open(os.path.join(a.out, 'golden_mllm.json'), 'w'), indent=1)
    json.dump(manifest(folder), open(os.path.join(a.out, 'checkpoint_manifest.json'), 'w'), indent=1)
    ck = os.path.join(a.out, 'checkpoint')
    os.makedirs(ck, exist_ok=True)
    for f in sorted(os.listdir(folder)):                  # everything but the weights
        if not f.endswith('.safetensors'):
            with open(os.path.join(folder, f), 'rb') as src, open(os.path.join(ck, f), 'wb') as dst:
                dst.write(src.read())
    print('wrote', a.out)


if __name__ == '__main__':
    main()
