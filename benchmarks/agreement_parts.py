"""Which parts of the encoder's conv stages decide the bf16 fast path's code agreement (diagnostic).

    python benchmarks/agreement_parts.py demo_output/train/model backbone.stem backbone.stem+backbone.stages
    python benchmarks/agreement_parts.py demo_output/train/model backbone --weights rounded

For each setting (``+``-joined submodule names of ``encoder.patch_embed``), the model is loaded in bf16
(the fast path), the listed submodules get back their float32 weights and run in float32 (input cast
up, output cast back to bf16; the default of ``--weights``), and the codes of held-out builtin:emoji
images are compared with the float32 model's by :func:`unitok.precision.compare_codes`. The first row
is the fast path as it loads (bf16; since 2026-12-07 with the first conv float32). This is how
``fp32_encoder_convs=True`` (all of the patch embedding) and the float32 first conv were chosen; see
docs/RESULTS.md.

``--weights`` says what the listed parts compute with: ``original`` (float32 compute, the float32
weights; the default), ``rounded`` (float32 compute, the bf16-rounded weights the fast path holds: what
the rounding of the weights alone costs) or ``split`` (bf16 compute as in the fast path, and every bf16
Conv2d / Linear in them adds a second bf16 call with the residual ``bf16(w - bf16(w))`` of its weight:
weights exact to about 16 bits, outputs still bf16).
"""
import argparse
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import unitok
from unitok.data import open_source
from unitok.data.transforms import eval_transform
from unitok.precision import float32_input as _float32_input   # the hook keep_encoder_convs_fp32 uses
from unitok.precision import compare_codes


def _bfloat16_output(module, args, out):
    return out.to(torch.bfloat16)


def _add_residual(residual: torch.Tensor, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook: the output plus the same layer applied with the weight's rounding residual (no bias)."""
    if isinstance(module, nn.Conv2d):            # its own padding, stride, dilation and groups
        return out + module._conv_forward(args[0], residual, None)
    return out + F.linear(args[0], residual)


def fast_model(path: str, parts: list[str], reference_state: dict, weights: str = 'original') -> unitok.UniTok:
    """The bf16 fast path with ``parts`` of the patch embedding run as ``weights`` says (module docstring)."""
    model = unitok.UniTok.from_pretrained(path, dtype=torch.bfloat16).eval()
    embed = model.encoder.patch_embed
    for name in parts:
        module = embed.get_submodule(name)
        prefix = f'encoder.patch_embed.{name}.'
        if weights == 'split':
            for sub, layer in module.named_modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight.dtype == torch.bfloat16:
                    w = reference_state[f'{prefix}{sub}.weight' if sub else f'{prefix}weight']
                    layer.register_forward_hook(partial(_add_residual, (w - w.bfloat16().float()).bfloat16()))
            continue
        module.float()
        if weights == 'original':
            module.load_state_dict({k[len(prefix):]: v for k, v in reference_state.items() if k.startswith(prefix)})
        module.register_forward_pre_hook(_float32_input)
        module.register_forward_hook(_bfloat16_output)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('model', help='trained model directory (e.g. the demo tokenizer)')
    p.add_argument('settings', nargs='*', help="'+'-joined submodules of encoder.patch_embed (run as --weights says)")
    p.add_argument('--weights', choices=('original', 'rounded', 'split'), default='original',
                   help='what the listed parts compute with (see the module docstring)')
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
    print(f'{n} builtin:emoji val images at {ref.config.image_size} px through {args.model}; '
          f'listed parts: {args.weights} weights')
    for parts in [[]] + [s.split('+') for s in args.settings]:
        model = fast_model(args.model, parts, state, args.weights)
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
