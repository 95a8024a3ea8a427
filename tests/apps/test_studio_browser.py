"""UniTok Studio in a real browser (Playwright driving Debian's Chromium): what the page shows and lets
one download equals the library's own calls on the same files; bad input gets a message, then the app
keeps serving. A screenshot of each tab goes to the test's output folder."""
import io
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from unitok.apps.studio import tokens, understand
from unitok.generation import generate
from unitok.images import to_tensor, to_uint8

pytestmark = pytest.mark.studio

CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
        '--disable-sync', '--no-first-run']
TIMEOUT = 60_000          # ms: a loaded 2-core machine


@pytest.fixture(scope='module')
def page(studio):
    sync_api = pytest.importorskip('playwright.sync_api', reason='the browser test needs playwright')
    if not os.path.isfile(CHROMIUM):
        pytest.skip('no Chromium at /usr/bin/chromium (.ci/run installs it with apt-get)')
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=ARGS, headless=True,
                                                       viewport={'width': 1280, 'height': 1000})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        page.goto(studio['url'])
        page.wait_for_selector('#tok-run')
        yield page
        context.close()


def fetch(page, selector: str) -> bytes:
    """The bytes of the file an ``<img src>`` or ``<a href>`` of the page points to, through the browser."""
    el = page.locator(selector).first
    url = el.get_attribute('src') or el.get_attribute('href')
    response = page.request.get(url)
    assert response.ok, url
    return response.body()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def npz_codes(data: bytes, tmp_path) -> torch.Tensor:
    path = tmp_path / 'downloaded.npz'
    path.write_bytes(data)
    with np.load(path, allow_pickle=False) as z:
        return torch.from_numpy(z['codes'].astype(np.int64))


def upload(page, selector: str, path: str) -> None:
    """Upload ``path`` into an image input and wait until its preview shows the new file."""
    img = page.locator(f'{selector} img')
    before = img.first.get_attribute('src') if img.count() else None
    page.locator(f'{selector} input[type=file]').set_input_files(path)
    page.wait_for_function('([sel, old]) => { const e = document.querySelector(sel + " img"); '
                           'return e && e.getAttribute("src") !== old; }', arg=[selector, before])


def run_and_wait(page, button: str, output: str) -> None:
    """Click ``button`` and wait until ``output``'s element changes (a new src / href / text)."""
    el = page.locator(output).first
    before = (el.get_attribute('src') or el.get_attribute('href')) if page.locator(output).count() else None
    page.click(button)
    page.wait_for_function('([sel, old]) => { const e = document.querySelector(sel); '
                           'return e && (e.getAttribute("src") || e.getAttribute("href")) !== old; }',
                           arg=[output, before])


def shot(page, tmp_path, name: str) -> None:
    for button in page.locator('button.toast-close').all():                 # close old messages first
        button.click()
    page.locator('.toast-body').first.wait_for(state='detached')
    out = tmp_path / 'screenshots'
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / f'studio_{name}.png'), full_page=True)
    assert (out / f'studio_{name}.png').stat().st_size > 10_000


def test_tokenize_tab_shows_the_library_codes_and_recovers_from_a_non_image(page, studio, tmp_path):
    tok, images = studio['models'].tokenizer, studio['images']
    upload(page, '#tok-input', images['a.png'])
    run_and_wait(page, '#tok-run', '#tok-recon img')
    page.locator('#tok-codes a').first.wait_for()
    expected = tok.encode(to_tensor(images['a.png'], size=tok.config.image_size))
    assert torch.equal(npz_codes(fetch(page, '#tok-codes a'), tmp_path), expected)
    np.testing.assert_array_equal(pixels(fetch(page, '#tok-recon img')), to_uint8(tok.decode(expected))[0])
    assert '4 x 4 tokens x 8 sub-codes' in page.locator('#tok-summary').inner_text()
    assert page.locator('#tok-maps img').count() == 8                          # a code map per sub-codebook
    shot(page, tmp_path, 'tokenize')

    upload(page, '#tok-input', images['not_image.png'])
    page.click('#tok-run')
    page.get_by_text('is not an image file PIL can read').first.wait_for()    # the message, in the page
    upload(page, '#tok-input', images['b.png'])                               # and the app keeps serving
    run_and_wait(page, '#tok-run', '#tok-codes a')
    expected_b = tok.encode(to_tensor(images['b.png'], size=tok.config.image_size))
    assert torch.equal(npz_codes(fetch(page, '#tok-codes a'), tmp_path), expected_b)


def test_subcodebook_mix_equals_the_library_decode_of_the_mixed_codes(page, studio, tmp_path):
    tok, images = studio['models'].tokenizer, studio['images']
    page.get_by_role('tab', name='Sub-codebooks').click()
    upload(page, '#mix-a', images['a.png'])
    upload(page, '#mix-b', images['b.png'])
    page.locator('#mix-from-b').get_by_label('7').check()                      # 0-3 by default, plus 7
    run_and_wait(page, '#mix-run', '#mix-out img')
    size = tok.config.image_size
    a, b = (tok.encode(to_tensor(images[n], size=size)) for n in ('a.png', 'b.png'))
    mixed = tokens.mix_codes(a, b, [0, 1, 2, 3, 7])
    np.testing.assert_array_equal(pixels(fetch(page, '#mix-out img')), to_uint8(tok.decode(mixed))[0])
    assert page.locator('#mix-drops img').count() == 8
    shot(page, tmp_path, 'subcodebooks')


def test_understand_tab_shows_the_zero_shot_top5(page, studio, tmp_path):
    tok, images = studio['models'].tokenizer, studio['images']
    page.get_by_role('tab', name='Understand').click()
    upload(page, '#und-input', images['a.png'])
    page.fill('#und-labels textarea', 'cat, dog, tree, car, apple, sun')
    page.click('#und-run')
    labels = ['cat', 'dog', 'tree', 'car', 'apple', 'sun']
    classifier = tok.zero_shot_classifier(labels, understand.TEMPLATES)        # the library, not the app's helper
    probs = tok.classify(to_tensor(images['a.png'], size=tok.config.image_size), classifier).softmax(-1)[0]
    best = labels[int(probs.argmax())]
    page.locator('#und-top').get_by_text(f'{round(100 * float(probs.max()))}%').first.wait_for()
    shown = page.locator('#und-top').inner_text().replace('Top 5', '', 1).split()     # without the block's label
    assert shown[0] == best                                                   # the top label heads the list
    assert sum(label in shown for label in labels) == 5                       # the top 5 of 6
    shot(page, tmp_path, 'understand')


def test_generate_tab_codes_equal_the_library_call_with_the_seed(page, studio, tmp_path):
    models = studio['models']
    page.get_by_role('tab', name='Generate').click()
    page.fill('#gen-seed input', '5')
    page.locator('#gen-seed input').press('Tab')
    page.click('#gen-run')
    page.get_by_text('Done: 4 image(s)').wait_for()
    expected = generate(models.generator, torch.zeros(4, dtype=torch.long), cfg_scale=1.0, temperature=1.0,
                        top_k=0, top_p=1.0, generator=5)
    assert torch.equal(npz_codes(fetch(page, '#gen-codes a'), tmp_path), expected)
    assert page.locator('#gen-images img').count() == 4
    shot(page, tmp_path, 'generate')
