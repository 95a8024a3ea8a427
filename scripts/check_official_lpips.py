"""Check that ``LPIPSPerceptual`` reads the official ``lpips_with_vgg.pth`` layout and gives the official distance.

Builds the official ``utils/lpips.py`` LPIPS of a clone of github.com/FoundationVision/UniTok with random
weights, saves its state dict as the release does (without the buffers registered after loading), loads
that file with the official class (strict) and with ours, and prints both distances on the same images.

    python scripts/check_official_lpips.py --official /path/to/UniTok
"""
import argparse
import os
import sys
import tempfile
import warnings

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--official', required=True, help='a clone of FoundationVision/UniTok (its utils/lpips.py)')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    warnings.filterwarnings('ignore', category=UserWarning)      # torchvision's pretrained= deprecation
    sys.path.insert(0, os.path.join(args.official, 'utils'))
    import lpips as official          # the clone's utils/lpips.py (shadows the PyPI package inside this script)
    sys.path.pop(0)
    del sys.modules['lpips']          # our LPIPSPerceptual imports the PyPI package
    from unitok.losses.perceptual import LPIPSPerceptual

    torch.manual_seed(args.seed)
    trunk = official.Vgg16()
    heads = torch.nn.ModuleList([official.NetLinLayer(c) for c in (64, 128, 256, 512, 512)])
    state = {f'net.{k}': v.uniform_(-0.1, 0.1) for k, v in trunk.state_dict().items()}
    state.update({f'lins.{k}': v.uniform_(0, 0.1) for k, v in heads.state_dict().items()})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'lpips_with_vgg.pth')
        torch.save(state, path)
        theirs, ours = official.LPIPS(path), LPIPSPerceptual(path)
        g = torch.Generator().manual_seed(args.seed)
        x, y = (torch.rand(4, 3, 64, 64, generator=g) * 2 - 1 for _ in range(2))
        with torch.no_grad():
            a, b = float(theirs(x, y)), float(ours(x, y))
    print(f'{len(state)} tensors; official LPIPS {a:.10f}, ours {b:.10f}, |difference| {abs(a - b):.2e}')
    return 0 if abs(a - b) <= 1e-6 * max(1.0, abs(a)) else 1


if __name__ == '__main__':
    sys.exit(main())
