#!/usr/bin/env python3
"""Rebuild unitok's built-in image-text dataset (``builtin:emoji``) from npm packages.

    python scripts/build_builtin_dataset.py                  # runs `npm pack` itself
    python scripts/build_builtin_dataset.py --packages DIR   # DIR holds the two .tgz files

Sources (see unitok/data/builtin/emoji/LICENSE.md):
  emoji-datasource-google@16.0.0   Noto Emoji images (Apache-2.0), metadata by iamcal (MIT)
  emoji-datasource-twitter@16.0.0  Twemoji images (CC-BY-4.0), same metadata

Every emoji with an image in a style becomes one sample: its 64x64 PNG composited on white, a
caption built from its name, subcategory and category, and those labels. Skin-tone variants and the
'Component' category are left out. An emoji is in the validation split when crc32 of its code point
sequence is divisible by 10, in both styles, so validation emoji are never seen in training.
Images are packed into 16x16 atlases (lossless WebP) next to ``index.json``.
"""
import argparse
import json
import os
import subprocess
import tarfile
import tempfile
import zlib

from PIL import Image

PACKAGES = {'google': 'emoji-datasource-google@16.0.0', 'twitter': 'emoji-datasource-twitter@16.0.0'}
STYLE_NAMES = {'google': 'Noto', 'twitter': 'Twemoji'}
CELL, GRID = 64, 16
OUT = os.path.join(os.path.dirname(__file__), '..', 'unitok', 'data', 'builtin', 'emoji')


def tgz_name(spec):
    return spec.replace('@', '-') + '.tgz'        # what `npm pack NAME@VERSION` writes


def atlas_name(style, split, index):
    return f'{style}-{split}-{index:02d}.webp'


def fetch(packages_dir):
    for spec in PACKAGES.values():
        if not os.path.exists(os.path.join(packages_dir, tgz_name(spec))):
            subprocess.run(['npm', 'pack', spec], cwd=packages_dir, check=True, stdout=subprocess.DEVNULL)


def caption(e):
    sub = e['subcategory'].replace('-', ' ')
    return f"an emoji of {e['name'].lower()} ({sub}, {e['category'].lower()})"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--packages', help='directory with the npm .tgz files (fetched with npm pack if missing)')
    p.add_argument('--out', default=OUT)
    args = p.parse_args()
    if args.packages:
        build(args.packages, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix='unitok-emoji-') as packages:
            build(packages, args.out)


def build(packages, out):
    fetch(packages)
    os.makedirs(out, exist_ok=True)
    samples, atlases = [], {}
    for style, spec in PACKAGES.items():
        with tarfile.open(os.path.join(packages, tgz_name(spec))) as tar:
            meta = json.load(tar.extractfile('package/emoji.json'))
            meta = [e for e in meta if e[f'has_img_{style}'] and e['category'] != 'Component']
            meta.sort(key=lambda e: e['sort_order'])
            for e in meta:
                split = 'val' if zlib.crc32(e['unified'].encode()) % 10 == 0 else 'train'
                member = tar.extractfile(f'package/img/{style}/64/{e["image"]}')
                rgba = Image.open(member).convert('RGBA')
                if rgba.size != (CELL, CELL):
                    rgba = rgba.resize((CELL, CELL), Image.LANCZOS)
                white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, rgba).convert('RGB')
                cells = atlases.setdefault((style, split), [])
                cells.append(image)
                n = len(cells) - 1
                samples.append(dict(
                    style=STYLE_NAMES[style], split=split, atlas=atlas_name(style, split, n // (GRID * GRID)),
                    cell=n % (GRID * GRID), name=e['name'].lower(), unified=e['unified'],
                    category=e['category'], subcategory=e['subcategory'], caption=caption(e)))
    for (style, split), cells in atlases.items():
        for a in range(0, len(cells), GRID * GRID):
            sheet = Image.new('RGB', (GRID * CELL, GRID * CELL), (255, 255, 255))
            for i, im in enumerate(cells[a:a + GRID * GRID]):
                sheet.paste(im, ((i % GRID) * CELL, (i // GRID) * CELL))
            sheet.save(os.path.join(out, atlas_name(style, split, a // (GRID * GRID))),
                       lossless=True, quality=100, method=6)
    index = dict(name='emoji', cell=CELL, grid=GRID, sources=list(PACKAGES.values()), samples=samples)
    with open(os.path.join(out, 'index.json'), 'w') as f:
        json.dump(index, f, indent=0, ensure_ascii=False)
    counts = {s: sum(x['split'] == s for x in samples) for s in ('train', 'val')}
    print(f'{len(samples)} samples ({counts}) -> {out}')


if __name__ == '__main__':
    main()
