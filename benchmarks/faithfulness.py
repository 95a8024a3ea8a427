"""How far our outputs are from the official implementation's, per output, on the golden fixtures.

    python benchmarks/faithfulness.py                 # base128 and large (large needs ~6 GB RAM)
    python benchmarks/faithfulness.py --cases base128

``tests/test_golden.py`` asserts tolerances; this prints the measured distances behind them: the
fraction of codes equal to the official ones and the largest absolute difference of each output.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
import golden  # noqa: E402
import unitok  # noqa: E402


def distances(name):
    ckpt = golden.official_checkpoint(name)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'official.pth')
        torch.save(ckpt, path)
        del ckpt
        model = unitok.load_official_checkpoint(path).eval()
    fx = golden.arrays(name)
    img, text = torch.from_numpy(fx['inputs']['img']), torch.from_numpy(fx['inputs']['text'])
    out, inter = fx['outputs'], fx['intermediates']

    def diff(ours, ref):
        return float(np.abs(ours.detach().float().numpy() - ref).max())
    rows = {}
    with torch.no_grad():
        codes = model.encode(img)
        rows['codes equal (fraction)'] = float((codes.reshape(*codes.shape[:2], -1).numpy()
                                                == out['img_to_idx']).mean())
        latents, _ = model.encode_latents(img)
        rows['latent before quantization'] = diff(latents, inter['quant_proj_out'])
        ref_codes = torch.from_numpy(inter['idx'])
        side = int(round(ref_codes.shape[-1] ** 0.5))
        rows['decode(official codes)'] = diff(model.decode(ref_codes.view(*ref_codes.shape[:2], side, side)),
                                              np.clip(inter['decoder_out_unclamped'], -1, 1))
        rows['reconstruct(image)'] = diff(model.reconstruct(img), np.clip(out['forward.img_rec'], -1, 1))
        rows['encode_image, normalized'] = diff(model.encode_image(img), out['encode_image_norm'])
        rows['encode_image, raw'] = diff(model.encode_image(img, normalize=False), out['encode_image_raw'])
        rows['encode_text, normalized'] = diff(model.encode_text(text), out['encode_text_norm'])
        rows['encode_text, raw'] = diff(model.encode_text(text, normalize=False), out['encode_text_raw'])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--cases', nargs='+', default=['base128', 'large'])
    args = p.parse_args(argv)
    for name in args.cases:
        t = time.time()
        rows = distances(name)
        print(f'{name} ({time.time() - t:.0f} s)')
        for key, value in rows.items():
            print(f'  {key:28s} {value:.3g}' if 'fraction' not in key else f'  {key:28s} {value:.4f}')


if __name__ == '__main__':
    main()
