"""The studio's page: four tabs over one shared set of models, gradio's queue bounded.

A tab whose model is missing shows the sentence that names the command that makes it.
"""
from __future__ import annotations

import os

import gradio as gr

from .handlers import Handlers
from .limits import StudioLimits
from .models import StudioModels

QUEUE = 'model'           # one concurrency slot shared by every model call: requests queue, none run side by side
EXAMPLES = 4              # built-in emoji offered as examples
DEFAULT_LABELS = 'smiling face, cat, dog, red apple, car, tree, heart, sun, house'
# Tokenizer-sized images (64 px for the tiny models) drawn large with crisp pixels.
CSS = ('.unitok-map img { image-rendering: pixelated; } '
       '.unitok-pixels img { width: 100% !important; height: 100% !important; object-fit: contain; '
       'image-rendering: pixelated; }')


def _path_unread(image: gr.Image):
    """Make ``image`` hand the handler the uploaded file's path in gradio's cache without decoding it: the
    studio reads it under its own caps and says so itself when the file is no image. (An instance
    override: a gr.Image subclass would make gradio write a .pyi stub beside this module.)"""
    decode = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or '').startswith('data:'):
            return payload.path
        return decode(payload)
    image.preprocess = preprocess
    return image


def _image_input(label: str, elem_id: str) -> gr.Image:
    return _path_unread(gr.Image(label=label, type='filepath', sources=['upload', 'clipboard'], elem_id=elem_id,
                                 height=260, elem_classes='unitok-pixels'))


def _image_output(label: str, elem_id: str) -> gr.Image:
    return gr.Image(label=label, format='png', interactive=False, elem_id=elem_id, height=260,
                    elem_classes='unitok-pixels')


def example_images(workdir: str, count: int = EXAMPLES) -> list[str]:
    """A few held-out built-in emoji written as PNG files (the examples of the image inputs)."""
    from ...data import open_source
    source = open_source('builtin:emoji', 'val')
    folder = os.path.join(workdir, 'examples')
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(0, len(source), max(1, len(source) // count))[:count]:
        path = os.path.join(folder, f'emoji_{i:03d}.png')
        source.read(i)[0].save(path)
        paths.append(path)
    return paths


def _note(models: StudioModels, part: str) -> bool:
    """Show the sentence of a missing part; True when the part is missing."""
    if part in models.notes:
        gr.Markdown(models.notes[part], elem_classes='unitok-missing')
        return True
    return False


def tokenize_tab(h: Handlers, examples: list[str]) -> None:
    if _note(h.models, 'tokenizer'):
        return
    gr.Markdown('Encode an image to codes and decode them back: the reconstruction, its quality, the K code '
                'maps (one per sub-codebook; a colour per code index) and the codes as a file.')
    with gr.Row():
        image = _image_input('Image (upload, paste or pick an example)', 'tok-input')
        recon = _image_output('Reconstruction: decode(encode(image))', 'tok-recon')
    gr.Examples(examples, inputs=image, label='Built-in emoji')
    run = gr.Button('Tokenize', variant='primary', elem_id='tok-run')
    summary = gr.Markdown(elem_id='tok-summary')
    maps = gr.Gallery(label='Code maps', columns=8, height=220, format='png', elem_id='tok-maps',
                      elem_classes='unitok-map')
    codes = gr.File(label='Codes (.npz, as `unitok encode` writes; `unitok decode` reads it)', elem_id='tok-codes')
    run.click(h.reconstruct, image, [recon, summary, maps, codes], api_name='reconstruct', concurrency_id=QUEUE)
    with gr.Accordion('Decode a codes file', open=False):
        upload = gr.File(label='Codes file (.npz)', file_types=['.npz', '.npy'], elem_id='dec-input')
        decoded = gr.Gallery(label='Decoded', columns=4, height=200, format='png', elem_id='dec-out')
        gr.Button('Decode', elem_id='dec-run').click(h.decode_file, upload, decoded, api_name='decode',
                                                     concurrency_id=QUEUE)


def subcodebook_tab(h: Handlers, examples: list[str]) -> None:
    if _note(h.models, 'tokenizer'):
        return
    K = h.models.tokenizer.config.num_codebooks
    gr.Markdown(f'Each token is {K} sub-codes, one from each sub-codebook. Take some sub-codebooks from image B '
                'and the rest from A and decode the mix; below, A with one sub-codebook dropped (its codes all '
                'replaced by its most frequent code) shows what that sub-codebook carries.')
    with gr.Row():
        a = _image_input('Image A', 'mix-a')
        b = _image_input('Image B', 'mix-b')
    gr.Examples([[examples[0], examples[-1]]], inputs=[a, b], label='Built-in emoji')
    from_b = gr.CheckboxGroup([str(k) for k in range(K)], value=[str(k) for k in range(K // 2)],
                              label='Sub-codebooks taken from B', elem_id='mix-from-b')
    run = gr.Button('Mix', variant='primary', elem_id='mix-run')
    with gr.Row():
        recon_a = _image_output('A, reconstructed', 'mix-recon-a')
        recon_b = _image_output('B, reconstructed', 'mix-recon-b')
        mixed = _image_output('The mix', 'mix-out')
    drops = gr.Gallery(label='A with sub-codebook k dropped (drop k)', columns=8, height=220, format='png', elem_id='mix-drops',
                       elem_classes='unitok-map')
    run.click(h.mix, [a, b, from_b], [recon_a, recon_b, mixed, drops], api_name='mix', concurrency_id=QUEUE)


def understand_tab(h: Handlers, examples: list[str]) -> None:
    if _note(h.models, 'tokenizer'):
        return
    gr.Markdown("Zero-shot classification with the tokenizer's own CLIP head: type the labels, see the top 5. "
                'With a multimodal LLM, ask about the image; the answer streams in token by token.')
    labels = ', '.join(h.models.classnames) or DEFAULT_LABELS
    with gr.Row():
        image = _image_input('Image', 'und-input')
        with gr.Column():
            text = gr.Textbox(labels, label='Labels (comma-separated)', lines=2, elem_id='und-labels')
            top = gr.Label(label='Top 5', num_top_classes=5, elem_id='und-top')
    gr.Examples(examples, inputs=image, label='Built-in emoji')
    gr.Button('Classify', variant='primary', elem_id='und-run').click(
        h.classify, [image, text], top, api_name='classify', concurrency_id=QUEUE)
    if _note(h.models, 'mllm'):
        return
    question = gr.Textbox('What is in this image?', label='Question', elem_id='chat-question')
    answer = gr.Textbox(label='Answer (streamed)', lines=3, elem_id='chat-answer')
    gr.Button('Ask', elem_id='chat-run').click(h.chat, [image, question], answer, api_name='chat',
                                               concurrency_id=QUEUE)


def generate_tab(h: Handlers) -> None:
    m = h.models
    if m.generator is None and m.mllm is None:
        _note(m, 'generator')
        return
    gr.Markdown('Sample codes row by row and decode them; the image fills in as rows are sampled. The same seed '
                'gives the same codes as the library call (`unitok.generation.generate`).')
    sources = (['generator'] if m.generator is not None else []) + (['mllm'] if m.mllm is not None else [])
    source = gr.Radio(sources, value=sources[0], label='Model', elem_id='gen-source')
    with gr.Row():
        names = _class_names(m)
        label = gr.Dropdown([(name, i) for i, name in enumerate(names)], value=0 if names else None,
                            label='Class (class-conditional generator)', elem_id='gen-class')
        prompt = gr.Textbox('Draw an emoji of a red apple.', label='Text prompt (text generator or MLLM)',
                            elem_id='gen-prompt')
    with gr.Row():
        guidance = gr.Slider(0, 10, value=1.0, step=0.1, label='Guidance', elem_id='gen-guidance')
        temperature = gr.Slider(0, 2, value=1.0, step=0.05, label='Temperature', elem_id='gen-temperature')
        top_k = gr.Slider(0, _codebook_size(m), value=0, step=1, label='Top-k (0: off)', elem_id='gen-top-k')
        top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label='Top-p (1: off)', elem_id='gen-top-p')
    with gr.Row():
        seed = gr.Number(0, precision=0, label='Seed', elem_id='gen-seed')
        n = gr.Slider(1, h.limits.max_images, value=min(4, h.limits.max_images), step=1, label='Images',
                      elem_id='gen-n')
    run = gr.Button('Generate', variant='primary', elem_id='gen-run')
    status = gr.Markdown(elem_id='gen-status')
    images = gr.Gallery(label='Samples', columns=4, height=260, format='png', elem_id='gen-images',
                        elem_classes='unitok-map')
    codes = gr.File(label='Codes (.npz)', elem_id='gen-codes')
    run.click(h.generate, [source, label, prompt, n, guidance, temperature, top_k, top_p, seed],
              [images, codes, status], api_name='generate', concurrency_id=QUEUE)


def _class_names(m: StudioModels) -> list[str]:
    if m.generator is None or m.text_generator:
        return []
    return m.classnames or [str(i) for i in range(m.generator.config.num_classes)]


def _codebook_size(m: StudioModels) -> int:
    return (m.generator or m.mllm).config.codebook_size


def _describe(m: StudioModels) -> str:
    parts = []
    if m.tokenizer is not None:
        c = m.tokenizer.config
        g = c.grid_size
        parts.append(f'tokenizer: {c.num_codebooks} sub-codebooks x {c.codebook_size} codes, {g} x {g} tokens at '
                     f'{c.image_size} px')
    if m.generator is not None:
        parts.append(f'generator: {"text" if m.text_generator else f"{len(_class_names(m))} classes"}')
    if m.mllm is not None:
        parts.append('multimodal LLM')
    return '# UniTok Studio\n' + ('; '.join(parts) if parts else 'no model loaded') + '.'


def build_app(models: StudioModels, limits: StudioLimits, workdir: str) -> gr.Blocks:
    """The studio's ``gr.Blocks``, its queue bounded by ``limits.queue_size``."""
    h = Handlers(models, limits, workdir)
    examples = example_images(workdir)
    with gr.Blocks(title='UniTok Studio', analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(_describe(models), elem_id='studio-header')
        with gr.Tab('Tokenize', id='tokenize'):
            tokenize_tab(h, examples)
        with gr.Tab('Sub-codebooks', id='subcodebooks'):
            subcodebook_tab(h, examples)
        with gr.Tab('Understand', id='understand'):
            understand_tab(h, examples)
        with gr.Tab('Generate', id='generate'):
            generate_tab(h)
    app.queue(max_size=limits.queue_size, default_concurrency_limit=1)
    return app
