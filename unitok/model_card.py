"""The model card (``README.md``) that :meth:`UniTok.save_pretrained <unitok.UniTok.save_pretrained>`
writes: Hub metadata, a summary of the configuration and an example that loads the model."""
from __future__ import annotations

from .pretrained import CARD_MARKER

DISTRIBUTION_NAME = 'unitok-vision'   # the pip name; the import name and the command are `unitok`
TAGS = ['unitok', 'image-tokenizer', 'vector-quantization', 'multi-codebook-quantization', 'clip']


def unitok_model_card(model, repo_id: str) -> str:
    """The card of a :class:`~unitok.UniTok` published as ``repo_id``."""
    from huggingface_hub import ModelCardData

    c = model.config
    meta = ModelCardData(library_name='unitok', tags=TAGS)
    grid = c.grid_size
    tokens = f'{grid} x {grid} grid' + (f' + {c.num_query} query tokens' if c.num_query else '')
    params = model.parameter_counts()
    rows = [
        ('encoder', f'`{c.encoder}` (ViTamin, downsampling {c.patch_size}x), {c.projection} projection'),
        ('image size', f'{c.image_size} px for training; any multiple of 16 at inference'),
        ('codes', f'{c.num_codebooks} sub-codebooks x {c.codebook_size} codes of {c.code_dim} dims '
                  f'(latent width {c.latent_dim})'),
        ('tokens per image', f'{tokens}, each a tuple of {c.num_codebooks} codes'),
        ('image/text embedding', f'{c.embed_dim} dims (text tower: {c.text_layers} layers, width {c.text_width})'),
        ('parameters', f"{params['total'] / 1e6:.1f} M (encoder {params['encoder'] / 1e6:.1f} M, "
                       f"decoder {params['decoder'] / 1e6:.1f} M, text {params['text_encoder'] / 1e6:.1f} M)"),
    ]
    table = '\n'.join(f'| {k} | {v} |' for k, v in rows)
    code_shape = f'(1, {c.num_codebooks}, ' + (f'{c.num_query + grid * grid})' if c.num_query else f'{grid}, {grid})')
    size = c.image_size
    lines = [(f'x = to_tensor([\'photo.jpg\'], size={size})', f'(1, 3, {size}, {size}) in [-1, 1]'),
             ('codes = model.encode(x)', f'{code_shape} int64'),
             ('images = model.decode(codes)', f'(1, 3, {size}, {size}) in [-1, 1]')]
    width = max(len(code) for code, _ in lines) + 3
    example = '\n'.join(f'{code:<{width}}# {comment}' for code, comment in lines)
    return f'''---
{meta.to_yaml()}
---
{CARD_MARKER}

# {repo_id}

A [UniTok](https://arxiv.org/abs/2502.20321) discrete image tokenizer. Its codes serve both image
generation and understanding: multi-codebook quantization of ViTamin features, a pixel decoder,
and a CLIP-aligned text tower.

| | |
|---|---|
{table}

`config.json` is the full `UniTokConfig` and `model.safetensors` holds the weights.

## Use

```bash
pip install {DISTRIBUTION_NAME}
```

```python
from unitok import UniTok
from unitok.images import to_tensor

model = UniTok.from_pretrained({repo_id!r})
{example}
```
'''
