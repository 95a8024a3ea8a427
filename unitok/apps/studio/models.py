"""The models one studio serves: loaded once, shared by every session; a missing part disables its tab.

With no paths, the studio takes what ``make demo`` (``demo_output/``) and ``unitok demo-mllm``
(``demo_mllm/``) wrote, when it is there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

DEMO_TOKENIZER = os.path.join('demo_output', 'train', 'model')
DEMO_GENERATOR = os.path.join('demo_output', 'generator', 'model')
DEMO_MLLM = os.path.join('demo_mllm', 'model')

NO_TOKENIZER = ('No tokenizer: run `make demo` (it writes demo_output/), or start the studio with '
                '`unitok studio --tokenizer DIR_OR_HUB_ID`.')
NO_GENERATOR = ('No generator: run `make demo` (its generation stage writes demo_output/generator/), or start the '
                'studio with `unitok studio --gen RUN/model`; `unitok demo-mllm` gives a text-to-image MLLM.')
NO_MLLM = ('No multimodal LLM: run `unitok demo-mllm` (it writes demo_mllm/), or start the studio with '
           '`unitok studio --mllm DIR`.')


@dataclass
class StudioModels:
    """The shared models; ``None`` where absent (``notes`` then says why, per part)."""
    tokenizer: object | None = None              # unitok.UniTok
    generator: object | None = None              # unitok.generation.GeneratorModel
    classnames: list[str] = field(default_factory=list)     # the generator's classes (class-conditional)
    mllm: object | None = None                   # unitok.UniTokMLLM
    notes: dict[str, str] = field(default_factory=dict)     # 'tokenizer' / 'generator' / 'mllm' -> sentence

    @property
    def text_generator(self) -> bool:
        return self.generator is not None and self.generator.config.cond == 'text'


def _default(path: str | None, demo_path: str) -> str | None:
    return path if path else (demo_path if os.path.isdir(demo_path) else None)


def load_models(tokenizer: str | None = None, gen: str | None = None, mllm: str | None = None,
                device: str = 'cpu', defaults: bool = True) -> StudioModels:
    """Load the parts named (paths or hub ids), else the demo outputs when ``defaults``. A part that is
    named but cannot be loaded raises (the command reports it); a part not found is noted."""
    from ...eval.loading import load_generator
    from ...model import UniTok
    found = StudioModels()
    if defaults:
        tokenizer, gen, mllm = (_default(tokenizer, DEMO_TOKENIZER), _default(gen, DEMO_GENERATOR),
                                _default(mllm, DEMO_MLLM))
    if mllm:
        from ...mllm import UniTokMLLM
        found.mllm = UniTokMLLM.from_pretrained(mllm, map_location=device).eval()
    if gen:                                 # its tokenizer: the one named, else the one it records (checked)
        found.generator, found.tokenizer, info = load_generator(gen, tokenizer or None, device)
        found.generator.eval()
        found.classnames = list(info.get('classnames') or [])
    elif tokenizer:
        found.tokenizer = UniTok.from_pretrained(tokenizer).to(device).eval()
    elif found.mllm is not None:
        found.tokenizer = found.mllm.image_tokenizer                # the MLLM's own tokenizer
    if found.tokenizer is None:
        found.notes['tokenizer'] = NO_TOKENIZER
    if found.generator is None and found.mllm is None:
        found.notes['generator'] = NO_GENERATOR
    if found.mllm is None:
        found.notes['mllm'] = NO_MLLM
    return found
