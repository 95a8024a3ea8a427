"""Peak memory of loading the released MLLM's layout: a locally made sharded checkpoint of >= 2 GB (bf16).

    python benchmarks/mllm_official_load_memory.py [--dir /tmp/unitok_mllm_2gb] [--layers 16]

Writes (once) an official-layout folder (config.json of a mini_gemini Llama at width 2048, ``--layers``
layers, vocabulary 32000; the image input and head at their released sizes; random bf16 weights in 1 GB
shards), then loads it with ``UniTokMLLM.from_pretrained`` (bf16) in a fresh process and reports the
peak resident memory (``ru_maxrss``) above the process's memory after its imports, against the weights'
bf16 size (every weight is touched after loading, so memory-mapped weights count). Target: at most 1.3x.
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, resource, sys, time
import torch, transformers, unitok.mllm
from unitok.mllm import UniTokMLLM
def rss():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS')) * 1024
base = rss()
t = time.perf_counter()
m = UniTokMLLM.from_pretrained(sys.argv[1])
took = time.perf_counter() - t
loading_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.no_grad():                  # touch every weight: memory-mapped ones become resident (and counted)
    for p in m.state_dict().values():
        p.sum()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
n = sum(p.numel() * p.element_size() for p in m.state_dict().values())
print(json.dumps({'base': base, 'loading_peak': loading_peak, 'peak': peak, 'after': rss(), 'weights': n,
                  'seconds': took,
                  'dtypes': sorted({str(p.dtype) for p in m.parameters()})}))
'''


def make_checkpoint(folder: str, layers: int, hidden: int = 2048, intermediate: int = 5504, heads: int = 16,
                    vocab: int = 32000) -> int:
    """Write an official-layout folder of random bf16 weights shard by shard (never the whole model in
    memory); returns the bytes of weights."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    from unitok.mllm.official_layout import INDEX, llama_config, to_official
    cfg = {'architectures': ['MiniGeminiLlamaForCausalLM'], 'model_type': 'mini_gemini', 'hidden_size': hidden,
           'intermediate_size': intermediate, 'num_hidden_layers': layers, 'num_attention_heads': heads,
           'num_key_value_heads': heads, 'vocab_size': vocab, 'max_position_embeddings': 2048, 'rms_norm_eps': 1e-5,
           'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': 0, 'tie_word_embeddings': False,
           'torch_dtype': 'bfloat16'}
    config = llama_config(cfg)
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    from unitok.generation.heads import LlamaCodeHead
    from unitok.mllm.connector import CausalCodeEmbedder
    with torch.device('meta'):
        embedder, head = CausalCodeEmbedder(8, 4096, 8, config.hidden_size), LlamaCodeHead(config, 8, 4096, 3)
    parts = {**{'embedder.' + k: v for k, v in embedder.state_dict().items()},
             **{'head.' + k: v for k, v in head.state_dict().items()}}
    shapes.update({k: v.shape for k, v in to_official(parts).items()})
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, total, n = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f'model-{n:05d}.safetensors'
            save_file(shard, os.path.join(folder, name), metadata={'format': 'pt'})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0
    for k, s in shapes.items():
        t = (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
        shard[k] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= 1 << 30:
            flush()
    flush()
    with open(os.path.join(folder, INDEX), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(cfg, f)
    _tokenizer(folder)
    return total


def _tokenizer(folder: str) -> None:
    """A byte-fallback Llama tokenizer file (the tiny stand-in of the golden fixtures)."""
    import shutil
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'fixtures',
                       'golden_mllm', 'checkpoint')
    for f in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model'):
        shutil.copyfile(os.path.join(src, f), os.path.join(folder, f))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--dir', default='/tmp/unitok_mllm_2gb')
    ap.add_argument('--layers', type=int, default=16)
    a = ap.parse_args()
    if not os.path.isfile(os.path.join(a.dir, 'config.json')):
        print(f'writing {a.dir} ...', flush=True)
        make_checkpoint(a.dir, a.layers)
    on_disk = sum(os.path.getsize(os.path.join(a.dir, f)) for f in os.listdir(a.dir) if f.endswith('.safetensors'))
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    out = subprocess.run([sys.executable, '-c', CHILD, a.dir], capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gb = 1 << 30
    print(f'checkpoint on disk: {on_disk / gb:.2f} GiB; loaded weights ({", ".join(r["dtypes"])}): '
          f'{r["weights"] / gb:.2f} GiB in {r["seconds"]:.1f} s')
    print(f'RSS after imports {r["base"] / gb:.2f} GiB; peak while loading {r["loading_peak"] / gb:.2f} GiB; '
          f'peak with every weight touched {r["peak"] / gb:.2f} GiB; at the end {r["after"] / gb:.2f} GiB')
    ratio = (r['peak'] - r['base']) / r['weights']
    print(f'peak above imports / bf16 weights = {ratio:.2f}x (target <= 1.3x)')


if __name__ == '__main__':
    main()
