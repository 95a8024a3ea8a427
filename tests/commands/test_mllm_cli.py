"""`unitok train-mllm`, `unitok chat --mllm ... --image` and `unitok generate --mllm` end to end with the
tiny random Llama (llm='tiny-random'), and one clear error for bad command lines."""
import numpy as np
import pytest

pytest.importorskip('transformers')

import unitok  # noqa: E402
from unitok.commands import main as cli  # noqa: E402
from unitok.codes import ExportConfig, export_codes  # noqa: E402
from train_helpers import saved_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('mllm_cli')
    tok = saved_tiny_tokenizer(root)
    export_codes(tok, ExportConfig(data='builtin:emoji', split='train', limit=16), str(root / 'codes'))
    assert cli(['train-mllm', '--codes', str(root / 'codes'), '--tokenizer', str(root / 'tokenizer'), '--llm',
                'tiny-random', '--out', str(root / 'run'), '--steps', '2', '--batch-size', '2', 'precision=fp32',
                'eval_every=0', 'image_every=0', 'model.head_width=32', 'model.head_heads=2',
                'model.head_depth=1']) == 0
    return root


def test_chat_streams_an_answer_about_an_image(trained, tmp_path, capsys):
    from PIL import Image
    Image.new('RGB', (64, 64), (10, 200, 30)).save(tmp_path / 'x.png')
    capsys.readouterr()
    assert cli(['chat', '--mllm', str(trained / 'run' / 'model'), '--image', str(tmp_path / 'x.png'),
                '--max-new-tokens', '5', 'What is in this image?']) == 0
    out = capsys.readouterr().out
    model = unitok.UniTokMLLM.from_pretrained(str(trained / 'run' / 'model'))
    assert out.rstrip('\n').endswith(model.chat(str(tmp_path / 'x.png'), 'What is in this image?',
                                                max_new_tokens=5))
    assert cli(['chat', '--mllm', str(trained / 'run' / 'model'), '--image', str(tmp_path / 'missing.png'),
                'What is in this image?']) == 2


def test_generate_mllm_writes_an_image_and_codes(trained, tmp_path):
    out = tmp_path / 'img.png'
    assert cli(['generate', '--mllm', str(trained / 'run' / 'model'), '--prompt', 'Draw an emoji of a red apple.',
                '--n', '2', '--seed', '1', '--cfg', '2', '--out', str(out)]) == 0
    codes = np.load(tmp_path / 'img.npz')['codes']
    assert out.exists() and codes.shape == (2, 8, 4, 4) and codes.max() < 512
    model = unitok.UniTokMLLM.from_pretrained(str(trained / 'run' / 'model'))
    again = model.generate_image('Draw an emoji of a red apple.', n=2, cfg_scale=2.0, generator=1)
    assert np.array_equal(again.numpy(), codes)
    # one clear error each: no prompt, --gen and --mllm together
    assert cli(['generate', '--mllm', str(trained / 'run' / 'model'), '--out', str(tmp_path / 'y.png')]) == 2
    with pytest.raises(SystemExit):
        cli(['generate', '--mllm', 'a', '--gen', 'b', '--out', str(tmp_path / 'z.png')])


def test_generate_mllm_with_a_huge_n_is_refused_with_the_memory_it_would_need(trained, tmp_path, capsys):
    capsys.readouterr()
    assert cli(['generate', '--mllm', str(trained / 'run' / 'model'), '--prompt', 'Draw an emoji of a red apple.',
                '--n', '100000000', '--out', str(tmp_path / 'img.png')]) == 2
    err = capsys.readouterr().err
    assert 'error: --n: 100000000 samples would need about' in err and 'ask for at most' in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
