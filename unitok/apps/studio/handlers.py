"""The studio's request handlers: check the page's input, call the shared models, return what the page shows.

Every handler runs under ``torch.inference_mode``; a refused input or a library ``ValueError`` /
``TypeError`` becomes a ``gr.Error`` (a message in the page) and the app keeps serving.
"""
from __future__ import annotations

import functools
import os
import shutil
import time
import uuid

import gradio as gr
import torch

from ...images import ImageReadError, to_pil
from .draw import DrawRequest, decoder, draw
from .tokens import code_maps, decode_codes_file, drop_codebook, mix_codes, model_input, save_codes, summary, tokenize
from .understand import chat, zero_shot
from .limits import StudioInputError, StudioLimits, check_labels, check_number, check_text, read_image
from .models import StudioModels

USER_ERRORS = (StudioInputError, ImageReadError, ValueError, TypeError)
SEED_MAX = 2**31 - 1


def _message(e: Exception) -> str:
    return str(e) if isinstance(e, StudioInputError) else f'{type(e).__name__}: {e}'


def checked(fn):
    """A handler whose bad input becomes a message in the page (``gr.Error``), under inference mode."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            with torch.inference_mode():
                return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise gr.Error(_message(e), print_exception=False) from None
    return run


def checked_stream(fn):
    """:func:`checked` for a generator handler (each step under inference mode)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            with torch.inference_mode():
                yield from fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise gr.Error(_message(e), print_exception=False) from None
    return run


class Handlers:
    """The handlers of one app, over its shared models; outputs are written under ``workdir``."""

    def __init__(self, models: StudioModels, limits: StudioLimits, workdir: str):
        self.models, self.limits, self.workdir = models, limits, workdir
        self._pruned_at = 0.0

    def _output_path(self, name: str) -> str:
        self._prune_outputs()
        folder = os.path.join(self.workdir, uuid.uuid4().hex)       # one folder per request: no clashes
        os.makedirs(folder)
        return os.path.join(folder, name)

    def _prune_outputs(self) -> None:
        """Remove request folders older than ``limits.output_max_age_s`` (gradio has copied their files into its
        own cache long before), at most once a minute, so a long-running server does not fill its disk."""
        now = time.time()
        if now - self._pruned_at < 60:
            return
        self._pruned_at = now
        for entry in os.scandir(self.workdir):
            if entry.is_dir(follow_symlinks=False) and now - entry.stat().st_mtime > self.limits.output_max_age_s:
                shutil.rmtree(entry.path, ignore_errors=True)

    def _pngs(self, images, stem: str) -> list[str]:
        """PNG files of ``images`` (PIL) in a new request folder. Paths, not PIL images, go to gradio: it
        copies files into its cache atomically, whereas it rewrites a PIL image's cached file in place,
        which a concurrent download of the same picture can catch half-written."""
        folder = os.path.dirname(self._output_path(''))
        paths = [os.path.join(folder, f'{stem}_{i}.png') for i in range(len(images))]
        for path, im in zip(paths, images):
            im.save(path, format='PNG')
        return paths

    def _tokenizer(self):
        if self.models.tokenizer is None:
            raise StudioInputError(self.models.notes['tokenizer'])
        return self.models.tokenizer

    # ------------------------------------------------------------------ Tokenize
    @checked
    def reconstruct(self, path):
        tok = self._tokenizer()
        t = tokenize(tok, read_image(path, self.limits))
        V = tok.config.codebook_size
        maps = [(im, f'sub-codebook {k}') for k, im in enumerate(self._pngs(code_maps(t.codes[0], V), 'map'))]
        codes_path = self._output_path('codes.npz')
        save_codes(codes_path, tok, t.codes, ['upload'])
        return self._pngs(to_pil(t.reconstruction), 'reconstruction')[0], summary(t, V), maps, codes_path

    @checked
    def decode_file(self, path):
        if not path:
            raise StudioInputError('No codes file: upload the .npz that `unitok encode` or this page wrote.')
        if os.path.getsize(path) > self.limits.max_upload_bytes:
            raise StudioInputError(f'The codes file is over the {self.limits.max_upload_mb:g} MB limit.')
        images, names = decode_codes_file(path, self._tokenizer())
        return list(zip(self._pngs(to_pil(images), 'decoded'), names))

    # ------------------------------------------------------------------ Sub-codebooks
    @checked
    def mix(self, path_a, path_b, from_b):
        tok = self._tokenizer()
        K = tok.config.num_codebooks
        try:
            chosen = sorted({int(k) for k in from_b or []})
        except (TypeError, ValueError):
            raise StudioInputError('Sub-codebooks are chosen by their index.') from None
        if any(not 0 <= k < K for k in chosen):
            raise StudioInputError(f'Sub-codebook indices lie in [0, {K - 1}].')
        codes_a = tok.encode(model_input(tok, read_image(path_a, self.limits, 'image A')))
        codes_b = tok.encode(model_input(tok, read_image(path_b, self.limits, 'image B')))
        mixed = mix_codes(codes_a, codes_b, chosen)
        drops = torch.cat([drop_codebook(codes_a, k) for k in range(K)])
        # Each decoded on its own: a batch of another size may round differently from the library call.
        a, b, m = self._pngs([to_pil(tok.decode(c).clamp(-1, 1))[0] for c in (codes_a, codes_b, mixed)], 'mix')
        dropped = self._pngs(to_pil(tok.decode(drops).clamp(-1, 1)), 'drop')
        gallery = [(im, f'drop {k}') for k, im in enumerate(dropped)]
        return a, b, m, gallery

    # ------------------------------------------------------------------ Understand
    @checked
    def classify(self, path, labels):
        tok = self._tokenizer()
        labels = check_labels(labels, self.limits)
        return zero_shot(tok, read_image(path, self.limits), labels)

    @checked_stream
    def chat(self, path, question):
        if self.models.mllm is None:
            raise StudioInputError(self.models.notes['mllm'])
        question = check_text(question, self.limits, 'the question')
        image = read_image(path, self.limits) if path else None
        yield from chat(self.models.mllm, image, question, self.limits.max_new_tokens)

    # ------------------------------------------------------------------ Generate
    def request(self, source, label, prompt, n, guidance, temperature, top_k, top_p, seed) -> DrawRequest:
        """A checked :class:`DrawRequest` from the page's values."""
        if source == 'mllm' and self.models.mllm is None:
            raise StudioInputError(self.models.notes['mllm'])
        if source not in ('generator', 'mllm') or (source == 'generator' and self.models.generator is None):
            raise StudioInputError(self.models.notes.get('generator') or 'No model of that name is loaded.')
        text = source == 'mllm' or self.models.text_generator
        classes = len(self.models.classnames) or (self.models.generator.config.num_classes if
                                                  self.models.generator is not None else 0)
        if not text and (label is None or isinstance(label, bool) or not isinstance(label, int)
                         or not 0 <= label < classes):
            raise StudioInputError('Pick a class from the list.')
        V = (self.models.mllm if source == 'mllm' else self.models.generator).config.codebook_size
        return DrawRequest(
            source=source, label=None if text else label,
            prompt=check_text(prompt, self.limits) if text else None,
            n=check_number(n, 'The number of images', 1, self.limits.max_images, integer=True),
            guidance=check_number(guidance, 'Guidance', 0, 50),
            temperature=check_number(temperature, 'Temperature', 0, 10),
            top_k=check_number(top_k, 'Top-k', 0, V, integer=True),
            top_p=check_number(top_p, 'Top-p', 1e-6, 1),
            seed=check_number(seed, 'The seed', 0, SEED_MAX, integer=True))

    @checked_stream
    def generate(self, source, label, prompt, n, guidance, temperature, top_k, top_p, seed,
                 progress=gr.Progress()):
        req = self.request(source, label, prompt, n, guidance, temperature, top_k, top_p, seed)
        progress((0, 1), desc='sampling rows of codes')
        for rows, total, images, codes in draw(self.models, req):
            progress((rows, total), desc='rows of codes sampled', unit='rows')
            gallery = [(im, f'sample {i}') for i, im in enumerate(self._pngs(to_pil(images), 'sample'))]
            if codes is None:
                yield gallery, None, f'{rows} / {total} rows of codes sampled ...'
            else:
                path = self._output_path('codes.npz')
                save_codes(path, decoder(self.models, req), codes, [f'sample_{i}' for i in range(req.n)])
                yield gallery, path, f'Done: {req.n} image(s), codes {tuple(codes.shape)}, seed {req.seed}.'
