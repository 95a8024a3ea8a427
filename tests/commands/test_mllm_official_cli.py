"""`unitok chat --mllm` and `unitok generate --mllm` with the released MLLM's layout (the tiny official
checkpoint of tests/fixtures/golden_mllm) and a UniTok tokenizer of the released code space."""
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip('transformers')

import unitok  # noqa: E402
from unitok.commands import main as cli  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'mllm'))
from official_golden import build_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp('released')
    torch.manual_seed(0)
    tok = unitok.create_model('unitok-tiny', image_size=256, num_codebooks=8, codebook_size=4096, code_dim=8).eval()
    tok.save_pretrained(str(root / 'tokenizer'))
    return build_checkpoint(str(root / 'unitok_mllm')), str(root / 'tokenizer')


def test_chat_with_the_released_layout(released, tmp_path, capsys):
    from PIL import Image
    folder, tokenizer = released
    Image.new('RGB', (300, 200), (10, 200, 30)).save(tmp_path / 'x.png')
    capsys.readouterr()
    assert cli(['chat', '--mllm', folder, '--tokenizer', tokenizer, '--image', str(tmp_path / 'x.png'),
                '--max-new-tokens', '4', 'What is in this image?']) == 0
    out = capsys.readouterr().out
    model = unitok.UniTokMLLM.from_pretrained(folder, tokenizer=tokenizer)
    assert out.rstrip('\n').endswith(model.chat(str(tmp_path / 'x.png'), 'What is in this image?', max_new_tokens=4))
    assert cli(['chat', '--mllm', folder, '--max-new-tokens', '3', 'Why?']) == 0
    assert capsys.readouterr().out.rstrip('\n').endswith(model.chat(None, 'Why?', max_new_tokens=3))


def test_generate_with_the_released_layout(released, tmp_path):
    folder, tokenizer = released
    out = tmp_path / 'img.png'
    assert cli(['generate', '--mllm', folder, '--tokenizer', tokenizer, '--prompt', 'a cat', '--n', '1', '--cfg', '1',
                '--temperature', '0', '--out', str(out)]) == 0
    codes = np.load(tmp_path / 'img.npz')['codes']
    assert out.exists() and codes.shape == (1, 8, 16, 16)
    model = unitok.UniTokMLLM.from_pretrained(folder)
    assert np.array_equal(model.generate_image('a cat', temperature=0).numpy(), codes)
