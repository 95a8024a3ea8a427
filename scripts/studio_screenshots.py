#!/usr/bin/env python3
"""Take the README's four UniTok Studio screenshots from trained models.

    make demo                                   # once: demo_output/train/model + demo_output/generator/model
    python scripts/studio_screenshots.py        # docs/images/studio_{tokenize,subcodebooks,understand,generate}.png
    python scripts/studio_screenshots.py --tokenizer DIR --gen DIR [--mllm DIR] [--out DIR]

It serves the studio in this process on a free loopback port (``load_models`` + ``serve``, as the browser
tests do) and drives headless Chromium (Playwright, ``/usr/bin/chromium``, a fresh profile, a 1280 x 1000
viewport) through each tab with held-out emoji of the built-in dataset (``builtin:emoji``, split ``val``):

- Tokenize: a smiley uploaded and tokenized (reconstruction, PSNR/SSIM, code maps, codes file);
- Sub-codebooks: the smiley as A, a flag as B, the default sub-codebooks taken from B, mixed;
- Understand: zero-shot over the dataset's 9 category names, on the flag;
- Generate: the class-conditional generator, one class (``--gen-class``), guidance 4, 4 images, seed 0.

Each step waits for its outputs and fails on an error message in the page. Needs gradio and playwright
(``pip install -e '.[dev,studio]'``) and Chromium (``apt-get install chromium``).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

os.environ.setdefault('HF_HUB_OFFLINE', '1')        # the models are local: no hub calls
os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')

CHROMIUM = '/usr/bin/chromium'
ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
        '--disable-sync', '--no-first-run']
VIEWPORT = {'width': 1280, 'height': 1000}
TIMEOUT = 180_000                                 # ms per wait: a loaded 2-core machine
SMILEY = 'smiling face with heart-shaped eyes'    # held-out (val) emoji, by name; the Noto style
FLAG = 'japan flag'
STYLE = 'Noto'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def held_out_emoji(folder: str) -> tuple[dict[str, str], list[str]]:
    """The smiley and the flag of the validation split saved as PNGs (name -> path), and the 9 category names."""
    from unitok.data import open_source
    source = open_source('builtin:emoji', 'val')
    paths = {}
    for key, name in (('smiley', SMILEY), ('flag', FLAG)):
        i = next(i for i, s in enumerate(source.samples) if s['name'] == name and s['style'] == STYLE)
        paths[key] = os.path.join(folder, f'{key}.png')
        source.read(i)[0].save(paths[key])
    return paths, list(source.classnames)


# ---------------------------------------------------------------------------------------------- the page
def upload(page, selector: str, path: str) -> None:
    """Upload ``path`` into an image input and wait until its preview shows the new file."""
    img = page.locator(f'{selector} img')
    before = img.first.get_attribute('src') if img.count() else None
    page.locator(f'{selector} input[type=file]').set_input_files(path)
    page.wait_for_function('([sel, old]) => { const e = document.querySelector(sel + " img"); '
                           'return e && e.getAttribute("src") !== old; }', arg=[selector, before])


def wait_images(page, selector: str, count: int = 1) -> None:
    """Wait until ``count`` images under ``selector`` have loaded."""
    page.wait_for_function('([sel, n]) => { const im = [...document.querySelectorAll(sel + " img")]; '
                           'return im.length >= n && im.every(e => e.complete && e.naturalWidth > 0); }',
                           arg=[selector, count])


def set_number(page, selector: str, value) -> None:
    """Type ``value`` into a slider's or number box's number input and commit it."""
    box = page.locator(f'{selector} input[type=number]').first
    box.fill(str(value))
    box.press('Enter')
    box.press('Tab')


def no_errors(page) -> None:
    """Fail on any message (toast) in the page: the screenshots show outputs, not errors."""
    toasts = page.locator('.toast-body')
    if toasts.count():
        raise RuntimeError('the page shows a message: ' + ' | '.join(toasts.all_inner_texts()))


def shot(page, out: str, name: str) -> str:
    no_errors(page)
    page.mouse.move(0, 0)                          # no hover effects
    page.wait_for_timeout(500)                     # let the last images paint
    path = os.path.join(out, f'studio_{name}.png')
    page.screenshot(path=path, full_page=True)
    print(f'[studio-shots] {path} ({os.path.getsize(path) // 1024} KB)')
    return path


def tokenize(page, images: dict[str, str], K: int, out: str) -> None:
    page.get_by_role('tab', name='Tokenize').click()
    upload(page, '#tok-input', images['smiley'])
    page.click('#tok-run')
    page.wait_for_function('() => (document.querySelector("#tok-summary") || {}).innerText?.includes("PSNR")')
    wait_images(page, '#tok-recon')
    wait_images(page, '#tok-maps', K)                # a code map per sub-codebook
    page.locator('#tok-codes a').first.wait_for()
    shot(page, out, 'tokenize')


def subcodebooks(page, images: dict[str, str], K: int, out: str) -> None:
    page.get_by_role('tab', name='Sub-codebooks').click()
    upload(page, '#mix-a', images['smiley'])
    upload(page, '#mix-b', images['flag'])
    page.click('#mix-run')                          # the default: sub-codebooks 0 .. K/2-1 from B
    for selector in ('#mix-recon-a', '#mix-recon-b', '#mix-out'):
        wait_images(page, selector)
    wait_images(page, '#mix-drops', K)
    shot(page, out, 'subcodebooks')


def understand(page, images: dict[str, str], labels: list[str], out: str) -> None:
    page.get_by_role('tab', name='Understand').click()
    upload(page, '#und-input', images['flag'])
    page.fill('#und-labels textarea', ', '.join(labels))
    page.click('#und-run')
    page.wait_for_function('() => (document.querySelector("#und-top") || {}).innerText?.includes("%")')
    shot(page, out, 'understand')


def generate(page, cls: str, out: str, n: int = 4) -> None:
    page.get_by_role('tab', name='Generate').click()
    page.locator('#gen-class input').click()
    page.get_by_role('option', name=cls, exact=True).click()
    set_number(page, '#gen-guidance', 4)
    set_number(page, '#gen-n', n)
    page.fill('#gen-seed input', '0')
    page.locator('#gen-seed input').press('Tab')
    page.click('#gen-run')
    page.get_by_text(f'Done: {n} image(s)').wait_for()
    wait_images(page, '#gen-images', n)
    page.locator('#gen-codes a').first.wait_for()
    shot(page, out, 'generate')


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tokenizer', default=os.path.join('demo_output', 'train', 'model'))
    p.add_argument('--gen', default=os.path.join('demo_output', 'generator', 'model'))
    p.add_argument('--mllm', default=None, help='an MLLM directory (optional)')
    p.add_argument('--gen-class', default='flags', help="the generator's class to sample (default: flags)")
    p.add_argument('--out', default=os.path.join('docs', 'images'))
    args = p.parse_args(argv)
    for name in ('tokenizer', 'gen'):
        if not os.path.isfile(os.path.join(getattr(args, name), 'config.json')):
            sys.exit(f'no model at --{name} {getattr(args, name)} (run `make demo` first)')
    if not os.path.isfile(CHROMIUM):
        sys.exit(f'no Chromium at {CHROMIUM} (apt-get install chromium)')
    from playwright.sync_api import sync_playwright

    from unitok.apps.studio import StudioLimits, load_models, serve
    os.makedirs(args.out, exist_ok=True)
    models = load_models(args.tokenizer, args.gen, args.mllm, defaults=False)
    if args.gen_class not in models.classnames:
        sys.exit(f'--gen-class {args.gen_class!r} is not a class of the generator: {models.classnames}')
    with tempfile.TemporaryDirectory(prefix='unitok-shots-') as tmp:
        images, labels = held_out_emoji(tmp)
        app, url = serve(models, StudioLimits(), port=free_port(), block=False, workdir=os.path.join(tmp, 'work'))
        try:
            with sync_playwright() as pw:
                context = pw.chromium.launch_persistent_context(os.path.join(tmp, 'profile'), executable_path=CHROMIUM,
                                                                args=ARGS, headless=True, viewport=VIEWPORT)
                try:
                    page = context.new_page()
                    page.set_default_timeout(TIMEOUT)
                    page.goto(url)
                    page.wait_for_selector('#tok-run')
                    K = models.tokenizer.config.num_codebooks
                    tokenize(page, images, K, args.out)
                    subcodebooks(page, images, K, args.out)
                    understand(page, images, labels, args.out)
                    generate(page, args.gen_class, args.out)
                finally:
                    context.close()
        finally:
            app.close()


if __name__ == '__main__':
    main()
