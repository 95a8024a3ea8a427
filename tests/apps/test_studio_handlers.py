"""The studio's handlers without a browser: bad input becomes a page message (gr.Error), generation
reports rows with partial decodes and ends with the library's codes, the MLLM chat streams."""
import math

import pytest
import torch

gr = pytest.importorskip('gradio', reason='the studio needs gradio')

from unitok.apps.studio import StudioLimits, load_models  # noqa: E402
from unitok.apps.studio import draw  # noqa: E402
from unitok.apps.studio.handlers import Handlers  # noqa: E402
from unitok.generation import generate  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')
KW = dict(guidance=1.5, temperature=1.0, top_k=20, top_p=0.9, seed=3)


@pytest.fixture(scope='module')
def handlers(studio_dir, tmp_path_factory):
    models = load_models(studio_dir['tokenizer'], studio_dir['gen'], defaults=False)
    return Handlers(models, StudioLimits(max_images=4), str(tmp_path_factory.mktemp('work')))


def test_draw_reports_rows_then_the_library_codes(handlers):
    models = handlers.models
    req = draw.DrawRequest(source='generator', label=2, prompt=None, n=2, guidance=1.5, temperature=1.0, top_k=20,
                           top_p=0.9, seed=3)
    steps = list(draw.draw(models, req))
    assert [(rows, total) for rows, total, _, _ in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    expected = generate(models.generator, torch.full((2,), 2), cfg_scale=1.5, temperature=1.0, top_k=20, top_p=0.9,
                        generator=3)
    assert torch.equal(steps[-1][3], expected) and all(c is None for *_, c in steps[:-1])
    assert torch.equal(steps[-1][2], models.tokenizer.decode(expected).clamp(-1, 1))
    rows, _, partial, _ = steps[1]                                             # 2 of 4 token rows: 32 of 64 px
    assert (partial[..., 32:, :] == draw.GREY).all() and not (partial[..., :32, :] == draw.GREY).all()


@pytest.mark.parametrize('change, match', [
    (dict(guidance=math.nan), 'Guidance must be a finite number'),
    (dict(guidance=math.inf), 'Guidance must be a finite number'),
    (dict(n=5), r'number of images must lie in \[1, 4\]'),
    (dict(seed=-1), 'seed must lie in'),
    (dict(top_p=0), 'Top-p must lie in'),
    (dict(label=3), 'Pick a class'),
    (dict(source='mllm'), 'No multimodal LLM'),
    (dict(source='../../etc/passwd'), 'No model of that name'),
])
def test_bad_generation_requests_become_page_messages(handlers, change, match):
    args = dict(source='generator', label=0, prompt='', n=2, **KW) | change
    with pytest.raises(gr.Error, match=match):
        list(handlers.generate(**args))


def test_generate_handler_yields_progress_then_the_codes_file(handlers):
    steps = list(handlers.generate('generator', 1, '', 2, **KW))
    assert [s[2].split(' ')[0] for s in steps[:-1]] == ['1', '2', '3'] and steps[-1][2].startswith('Done: 2 image(s)')
    import numpy as np
    with np.load(steps[-1][1]) as z:
        expected = generate(handlers.models.generator, torch.ones(2, dtype=torch.long), cfg_scale=1.5,
                            temperature=1.0, top_k=20, top_p=0.9, generator=3)
        assert torch.equal(torch.from_numpy(z['codes'].astype('int64')), expected)


def test_bad_uploads_and_texts_become_page_messages(handlers, studio_dir):
    images = studio_dir['images']
    for call, match in ((lambda: handlers.reconstruct(images['not_image.png']), 'is not an image file'),
                        (lambda: handlers.reconstruct(images['huge.png']), '144 megapixels'),
                        (lambda: handlers.reconstruct(None), 'No image'),
                        (lambda: handlers.classify(images['a.png'], ''), 'label list is empty'),
                        (lambda: handlers.classify(images['a.png'], 'x' * 100_000), '100,000 characters'),
                        (lambda: handlers.mix(images['a.png'], images['b.png'], ['9']), r'lie in \[0, 7\]'),
                        (lambda: handlers.decode_file(images['a.png']), 'not a codes file')):
        with pytest.raises(gr.Error, match=match):
            call()
    recon, summary, maps, codes = handlers.reconstruct(images['cmyk.jpg'])     # CMYK and 16-bit PNG are read
    assert 'PSNR' in summary and len(maps) == 8
    assert 'PSNR' in handlers.reconstruct(images['16bit.png'])[1]


def test_mllm_chat_streams_and_draws_with_the_library_codes(studio_dir, tmp_path):
    pytest.importorskip('transformers')
    from unitok.apps.studio.models import StudioModels
    from unitok.mllm import UniTokMLLM
    from unitok.mllm.tiny import tiny_llm
    import unitok
    tok = unitok.UniTok.from_pretrained(studio_dir['tokenizer']).eval()
    torch.manual_seed(0)
    mllm = UniTokMLLM.build(tok, tiny_llm(), head_width=32, head_heads=2, head_depth=1).eval()
    h = Handlers(StudioModels(tokenizer=tok, mllm=mllm), StudioLimits(max_new_tokens=12), str(tmp_path))
    answers = list(h.chat(studio_dir['images']['a.png'], 'What is this emoji?'))
    from PIL import Image
    expected = mllm.chat(Image.open(studio_dir['images']['a.png']).convert('RGB'), 'What is this emoji?',
                         max_new_tokens=12)
    streamed = answers[:-1]
    assert len(streamed) == 12 and all(b.startswith(a) and b != a for a, b in zip(streamed, streamed[1:]))
    assert answers[-1] == expected                                            # last: what chat() returns
    with pytest.raises(gr.Error, match='question is empty'):
        list(h.chat(None, '  '))
    steps = list(h.generate('mllm', None, 'Draw an emoji of a cat.', 2, **KW))
    import numpy as np
    with np.load(steps[-1][1]) as z:
        codes = torch.from_numpy(z['codes'].astype('int64'))
    assert torch.equal(codes, mllm.generate_image('Draw an emoji of a cat.', n=2, cfg_scale=1.5, temperature=1.0,
                                                  top_k=20, top_p=0.9, generator=3))
    assert len(steps) == 4


def test_request_folders_older_than_the_age_cap_are_removed(studio_dir, tmp_path):
    import os
    models = load_models(studio_dir['tokenizer'], None, defaults=False)
    h = Handlers(models, StudioLimits(output_max_age_s=600), str(tmp_path))
    old, recent = tmp_path / 'old', tmp_path / 'recent'
    for folder, age in ((old, 3600), (recent, 60)):
        folder.mkdir()
        (folder / 'codes.npz').write_bytes(b'x')
        os.utime(folder, (folder.stat().st_atime - age, folder.stat().st_mtime - age))
    new = h._output_path('codes.npz')
    assert not old.exists() and recent.exists() and os.path.isdir(os.path.dirname(new))
