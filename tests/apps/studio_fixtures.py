"""A small random tokenizer and class-conditional generator saved to disk, and a studio served on a free
loopback port over them (what the browser and load tests drive)."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import torch
from PIL import Image

CLASSES = ['smiley', 'cat', 'tree']


def saved_generator(root, tokenizer) -> str:
    """A seeded random ``gen-tiny`` over ``tokenizer``'s codes (8 x 512, 4 x 4), saved as a run's model
    directory with the ``generation.json`` that names its classes and tokenizer."""
    from unitok.codes.format import tokenizer_identity
    from unitok.generation import GeneratorModel
    torch.manual_seed(1)
    gen = GeneratorModel.from_preset('gen-tiny', num_classes=len(CLASSES))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                           # the default init zeroes the output matrices: random instead
        for p in gen.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = str(root / 'generator')
    gen.save_pretrained(path)
    info = {'classnames': CLASSES, 'tokenizer': str(root / 'tokenizer'), 'codes_tokenizer': tokenizer_identity(tokenizer)}
    with open(os.path.join(path, 'generation.json'), 'w') as f:
        json.dump(info, f)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def write_images(folder) -> dict[str, str]:
    """Test images: two 8-bit RGB pictures, a CMYK JPEG, a 16-bit PNG, a 12000 x 12000 PNG, a non-image."""
    g = np.random.default_rng(0)
    paths = {}
    yy, xx = np.mgrid[0:96, 0:96]
    a = np.stack([xx * 2.6, yy * 2.6, (xx + yy) * 1.3], -1).astype(np.uint8)
    b = g.integers(0, 255, (80, 80, 3), dtype=np.uint8)
    for name, arr in (('a.png', a), ('b.png', b)):
        paths[name] = str(folder / name)
        Image.fromarray(arr).save(paths[name])
    paths['cmyk.jpg'] = str(folder / 'cmyk.jpg')
    Image.fromarray(a).convert('CMYK').save(paths['cmyk.jpg'], quality=95)
    paths['16bit.png'] = str(folder / '16bit.png')
    Image.fromarray((yy * 600).astype(np.uint16)).save(paths['16bit.png'])
    paths['huge.png'] = str(folder / 'huge.png')
    Image.new('L', (12000, 12000), 200).save(paths['huge.png'])
    paths['not_image.png'] = str(folder / 'not_image.png')
    with open(paths['not_image.png'], 'w') as f:
        f.write('this is plain text, not a picture\n' * 20)
    return paths
