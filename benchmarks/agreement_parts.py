"""Which parts of the encoder's conv stages decide the bf16 fast path's code agreement (diagnostic).

    python benchmarks/agreement_parts.py demo_output/train/model backbone.stem backbone.stem+backbone.stages

For each setting (``+``-joined submodule names of ``encoder.patch_embed``), the model is loaded in bf16
(the fast path), the listed submodules get back their float32 weights and run in float32 (input cast
up, output cast back to bf16), and the codes of held-out builtin:emoji images are compared with the
float32 model's by :func:`unitok.precision.compare_codes`. The first row is the fast path as it loads
(bf16; since 2026-12-07 with the first conv float32). This is how ``fp32_encoder_convs=True`` (all of
the patch embedding) and the float32 first conv were chosen; see docs/RESULTS.md.
"""
import argparse

import torch

import unitok
from unitok.data import open_source
from unitok.data.transforms import eval_transform
from unitok.model import _float32_input          # the hook keep_encoder_convs_fp32 uses
from unitok.precision import compare_codes


def _bfloat16_output(module, args, out):
    return out.to(torch.bfloat16)


def fast_model(path: str, parts: list[str], reference_state: dict) -> unitok.UniTok:
    """The bf16 fast path with ``parts`` of the patch embedding float32 (their original weights)."""
    model = unitok.UniTok.from_pretrained(path, dtype=torch.bfloat16).eval()
    embed = model.encoder.patch_embed
    for name in parts:
        module = embed.get_submodule(name).float()
        prefix = f'encoder.patch_embed.{name}.'
        module.load_state_dict({k[len(prefix):]: v for k, v in reference_state.items() if k.startswith(prefix)})
        module.register_forward_pre_hook(_float32_input)
        module.register_forward_hook(_bfloat16_output)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('model', help='trained model directory (e.g. the demo tokenizer)')
    p.add_argument('settings', nargs='*', help="'+'-joined submodules of encoder.patch_embed to keep float32")
    p.add_argument('--images', type=int, default=256)
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref = unitok.UniTok.from_pretrained(args.model).eval()
    source = open_source('builtin:emoji', split='val')
    transform = eval_transform(ref.config.image_size)
    n = min(args.images, len(source))
    images = torch.stack([transform(source.read(i)[0].convert('RGB')) for i in range(n)])
    state = ref.state_dict()
    print(f'{n} builtin:emoji val images at {ref.config.image_size} px through {args.model}')
    for parts in [[]] + [s.split('+') for s in args.settings]:
        model = fast_model(args.model, parts, state)
        total = None
        for i in range(0, n, 32):
            agree = compare_codes(ref, model, images[i:i + 32])
            total = agree if total is None else total.merge(agree)
        name = ' + '.join(parts) or 'none (the fast path)'
        print(f'  {name}: {total.agreement:.2%} of {total.decisions} codes equal, '
              f'{total.not_near_ties} disagreements that are not near ties', flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
