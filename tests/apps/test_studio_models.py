"""Which models the studio serves: the demo outputs by default, a missing part noted with the command that
makes it (its tab shows that sentence), and the `unitok studio` command's arguments."""
import os
import shutil

import pytest

gr = pytest.importorskip('gradio', reason='the studio needs gradio')

from unitok.apps.studio import StudioLimits, load_models  # noqa: E402
from unitok.apps.studio.models import (DEMO_GENERATOR, DEMO_TOKENIZER, NO_GENERATOR, NO_MLLM,  # noqa: E402
                                       NO_TOKENIZER, StudioModels)
from unitok.apps.studio.ui import _describe, build_app  # noqa: E402


def page_texts(app) -> str:
    return '\n'.join(str(getattr(b, 'value', '')) for b in app.blocks.values())


def test_nothing_found_disables_every_tab_with_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models = load_models()
    assert models.tokenizer is None and models.generator is None and models.mllm is None
    assert models.notes == {'tokenizer': NO_TOKENIZER, 'generator': NO_GENERATOR, 'mllm': NO_MLLM}
    text = page_texts(build_app(models, StudioLimits(), str(tmp_path / 'work')))
    assert text.count('`make demo`') >= 4 and '`unitok demo-mllm`' in text


def test_the_demo_outputs_are_used_by_default(studio_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(studio_dir['tokenizer'], DEMO_TOKENIZER)
    models = load_models()
    assert models.tokenizer is not None and models.generator is None
    assert set(models.notes) == {'generator', 'mllm'}
    text = page_texts(build_app(models, StudioLimits(), str(tmp_path / 'work')))
    assert NO_GENERATOR in text and NO_MLLM in text and NO_TOKENIZER not in text
    shutil.copytree(studio_dir['gen'], DEMO_GENERATOR)
    models = load_models()
    assert models.classnames == ['smiley', 'cat', 'tree'] and set(models.notes) == {'mllm'}
    assert load_models(defaults=False).tokenizer is None
    assert os.path.isdir(DEMO_TOKENIZER)


def test_the_header_counts_tokens_with_the_tokenizers_patch_size():
    from types import SimpleNamespace

    from unitok.config import UniTokConfig
    for patch, grid in ((16, 4), (8, 8)):                  # the demo's tokenizer has 8 px patches: 8 x 8 tokens
        config = UniTokConfig(encoder='vitamin_tiny', image_size=64, patch_size=patch)
        header = _describe(StudioModels(tokenizer=SimpleNamespace(config=config)))
        assert f'{grid} x {grid} tokens at 64 px' in header


def test_studio_command_arguments_and_missing_gradio(monkeypatch, capsys):
    from unitok.commands import build_parser, main
    args = build_parser().parse_args(['studio'])
    assert (args.host, args.port, args.share, args.queue_size) == ('127.0.0.1', 7860, False, 16)
    import builtins
    real_import = builtins.__import__

    def no_gradio(name, *a, **kw):
        if name == 'gradio':
            raise ImportError('no gradio')
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, '__import__', no_gradio)
    assert main(['studio', '--no-defaults']) == 2
    assert 'pip install "unitok-vision[studio]"' in capsys.readouterr().err
