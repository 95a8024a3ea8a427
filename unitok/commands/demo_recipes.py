"""The recipes of ``unitok demo``: tokenizer, generator and sampling settings, by name.

``fast`` (the default) trains ``unitok-tiny-p8``: 64 px emoji as they are, 8 px patches, so 8x8
tokens per image at a quarter of the pixels of ``legacy``, which up-samples them to 128 px for the same
grid with ``unitok-tiny``'s 16 px patches. Its CLIP weight is 0.1, because on this budget the contrastive
term takes the small encoder's capacity from reconstruction. ``benchmarks/demo_sweep.py`` runs the levers
and docs/RESULTS.md section 11 holds what they measured.
"""
from __future__ import annotations

from dataclasses import dataclass

# The losses that pay off within minutes on two cores (no perceptual or adversarial term).
_TOKENIZER_LOSSES = ('loss.perceptual=none', 'loss.discriminator=none', 'data.num_workers=1')
_GENERATOR_DATA = ('log_every=25', 'image_every=0', 'data.num_workers=0')


@dataclass(frozen=True)
class DemoRecipe:
    """One demo recipe: the tokenizer's preset, steps and ``TrainConfig`` overrides, the class-conditional
    generator's preset, steps and ``GenTrainConfig`` overrides, and how its samples are drawn."""
    preset: str
    steps: int
    overrides: tuple[str, ...]
    gen_preset: str
    gen_steps: int
    gen_overrides: tuple[str, ...]
    guidance: float = 1.0               # classifier-free guidance scale of the samples
    temperature: float = 1.0
    top_k: int = 0                      # 0: no top-k
    samples_per_class: int = 8          # rows of the grid (and the samples the consistency is measured on)
    judged_per_class: int = 8           # samples per class the zero-shot consistency is measured on

    def tokenizer_overrides(self) -> list[str]:
        return [*_TOKENIZER_LOSSES, *self.overrides]

    def generator_overrides(self) -> list[str]:
        return [*_GENERATOR_DATA, *self.gen_overrides]


RECIPES: dict[str, DemoRecipe] = {
    'fast': DemoRecipe(
        preset='unitok-tiny-p8', steps=1000,
        overrides=('optim.lr=1e-3', 'optim.warmup=0.02', 'data.batch_size=32', 'loss.clip=0.1'),
        gen_preset='gen-tiny', gen_steps=500, gen_overrides=('data.batch_size=32', 'optim.lr=1e-3'),
        guidance=4.0, temperature=0.8, judged_per_class=16),
    # The first recipe of issue 27 (CLIP weight 0.5, 900 + 600 steps, guidance 3), kept for comparison.
    'fast-clip0.5': DemoRecipe(
        preset='unitok-tiny-p8', steps=900,
        overrides=('optim.lr=1e-3', 'optim.warmup=0.02', 'data.batch_size=32', 'loss.clip=0.5'),
        gen_preset='gen-tiny', gen_steps=600, gen_overrides=('data.batch_size=32', 'optim.lr=1e-3'),
        guidance=3.0, judged_per_class=16),
    # The recipe before issue 27: 128 px (the 64 px emoji up-sampled), guidance-free samples.
    'legacy': DemoRecipe(
        preset='unitok-tiny', steps=500,
        overrides=('model.image_size=128', 'optim.lr=1e-3', 'optim.warmup=0.02', 'data.batch_size=32'),
        gen_preset='gen-tiny', gen_steps=300, gen_overrides=('data.batch_size=32', 'optim.lr=1e-3'),
        guidance=1.0),
}
DEFAULT_RECIPE = 'fast'
