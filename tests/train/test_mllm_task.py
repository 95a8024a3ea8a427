"""The MLLM trained through the one loop on exported emoji codes with a tiny random Llama: it learns
both tasks, resumes exactly after SIGTERM, exports a model that loads, and refuses bad configs."""
import json
import os

import pytest
import torch

pytest.importorskip('transformers')

from train_helpers import (kill_9_then_resume, load_params, logged_rows, max_param_diff, run_unitok,  # noqa: E402
                           saved_tiny_tokenizer, uninterrupted_and_resumed)
from unitok.checkpoint import CheckpointError  # noqa: E402
from unitok.config import ConfigError  # noqa: E402
from unitok.codes import ExportConfig, export_codes  # noqa: E402
from unitok.mllm.model import UniTokMLLM  # noqa: E402
from unitok.train import Trainer  # noqa: E402
from unitok.train.tasks.mllm import MLLMTrainConfig, item_name  # noqa: E402


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp('mllm')
    tok = saved_tiny_tokenizer(root)
    export_codes(tok, ExportConfig(data='builtin:emoji', split='train', limit=48, augment=('flip',)), str(root / 'train'))
    export_codes(tok, ExportConfig(data='builtin:emoji', split='val', limit=16), str(root / 'val'))
    return root


def _cfg(root, out, steps=6, **kw):
    base = dict(out=str(out), steps=steps, precision='fp32', log_every=1, eval_every=0, image_every=0, ckpt_every=0,
                keep_last=10, tokenizer=str(root / 'tokenizer'), llm='tiny-random')
    cfg = MLLMTrainConfig(**{**base, **kw})
    return cfg.override([f'data.train={root / "train"}', f'data.val={root / "val"}', 'data.batch_size=4',
                         'optim.lr=3e-3', 'optim.warmup=0', 'model.head_width=32', 'model.head_heads=2',
                         'model.head_depth=1'])


def test_item_names_come_from_the_captions():
    assert item_name(['an emoji of grinning face (face smiling, smileys & emotion)', 'x']) == 'grinning face'
    assert item_name(['a red apple']) == 'a red apple'


def test_mllm_learns_both_tasks_and_exports_a_model_that_loads(exported, tmp_path):
    summary = Trainer(_cfg(exported, tmp_path / 'run', steps=16, eval_every=16, image_every=16)).fit()
    assert summary['exit'] == 'finished'
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    train = [r for r in rows if r['kind'] == 'train']
    assert train[0]['image_loss'] == pytest.approx(torch.log(torch.tensor(512.)).item(), rel=0.02)   # zero head
    assert train[-1]['image_loss'] < train[0]['image_loss'] - 0.5
    assert 0 < train[-1]['text_loss'] < 7       # a frozen random LLM: the text side learns in stage 2 (below)
    val = [r for r in rows if r['kind'] == 'val'][-1]
    assert val['samples'] == 16 and val['text_loss'] > 0 and val['image_loss'] > 0
    assert os.listdir(tmp_path / 'run' / 'images')
    model = UniTokMLLM.from_pretrained(str(tmp_path / 'run' / 'model'), llm='tiny-random')
    assert model.config.tokenizer_ref['path'] == str(exported / 'tokenizer')
    codes = model.generate_image('Draw an emoji of a cat.', temperature=0)
    assert codes.shape == (1, 8, 4, 4)
    trained = summary['val']
    assert trained['text_loss'] == pytest.approx(val['text_loss'])


def test_mllm_resume_after_sigterm_is_exact(exported, tmp_path, monkeypatch):
    ref, again = uninterrupted_and_resumed(lambda out: _cfg(exported, out, steps=5), tmp_path, monkeypatch)
    a, b = ref.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and not any(k.startswith('llm.') for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_mllm_resume_after_kill_9_is_exact(exported, tmp_path):
    args = ['train-mllm', '--codes', str(exported / 'train'), '--val-codes', str(exported / 'val'), '--tokenizer',
            str(exported / 'tokenizer'), '--llm', 'tiny-random', '--steps', '30', '--batch-size', '4',
            'precision=fp32', 'ckpt_every=2', 'keep_last=100', 'log_every=1', 'eval_every=0', 'image_every=0',
            'data.num_workers=1', 'threads=1', 'model.head_width=32', 'model.head_heads=2', 'model.head_depth=1']
    run_unitok([*args, '--out', str(tmp_path / 'ref')])
    kill_9_then_resume(args, tmp_path / 'cut', 'step_00000002.pt')
    a = load_params(str(tmp_path / 'ref' / 'checkpoints' / 'step_00000030.pt'))
    b = load_params(str(tmp_path / 'cut' / 'checkpoints' / 'step_00000030.pt'))
    assert a and not any(k.startswith('model.llm.') for k in a)       # the frozen LLM is not checkpointed
    assert max_param_diff(a, b) == 0
    assert logged_rows(tmp_path / 'cut') == logged_rows(tmp_path / 'ref')      # each step once, the same values


def test_stage_two_trains_lora_adapters_from_a_stage_one_model(exported, tmp_path):
    Trainer(_cfg(exported, tmp_path / 's1', steps=2)).fit()
    s2 = Trainer(_cfg(exported, tmp_path / 's2', steps=12, stage=2, lora_rank=8, init=str(tmp_path / 's1' / 'model'))
                 .override(['optim.lr=1e-2']))
    before = {k: v.clone() for k, v in s2.model.state_dict().items()}
    s1 = UniTokMLLM.from_pretrained(str(tmp_path / 's1' / 'model'), llm='tiny-random')
    assert torch.equal(before['projector.fc1.weight'], s1.state_dict()['projector.fc1.weight'])
    s2.fit()
    after = s2.model.state_dict()
    lora = [k for k in after if 'lora_B' in k]
    assert lora and all(not torch.equal(after[k], before[k]) for k in lora)   # adapters trained (B starts at 0)
    assert all(not p.requires_grad for n, p in s2.model.llm.named_parameters() if 'lora_' not in n)
    train = [json.loads(line) for line in open(tmp_path / 's2' / 'metrics.jsonl')]
    assert train[-1]['text_loss'] < train[0]['text_loss'] - 0.05   # LoRA lets the text side learn


def test_bad_configs_get_one_clear_error(exported, tmp_path):
    with pytest.raises(ConfigError, match='tokenizer'):
        MLLMTrainConfig(out=str(tmp_path / 'a'), data={'train': str(exported / 'train')}).validate()
    with pytest.raises(ConfigError, match='tasks'):
        _cfg(exported, tmp_path / 'b', tasks=('caption',)).validate()
    Trainer(_cfg(exported, tmp_path / 'c', steps=2)).fit()
    with pytest.raises(CheckpointError, match='model'):
        Trainer(_cfg(exported, tmp_path / 'c', steps=4).override(['model.head_width=64'])).fit(resume='latest')


def test_codes_whose_captions_are_file_names_are_refused(exported, tmp_path):
    """A folder exported without captions.jsonl gets its file stems ('0', '10') as captions: not trained on."""
    from PIL import Image
    from unitok import UniTok
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in (0, 10, 11):
        Image.new('RGB', (64, 64), (20 * i, 0, 0)).save(folder / f'{i}.png')
    tok = UniTok.from_pretrained(str(exported / 'tokenizer'))
    export_codes(tok, ExportConfig(data=f'folder:{folder}'), str(tmp_path / 'codes'))
    cfg = _cfg(exported, tmp_path / 'run', category_question='').override([f'data.train={tmp_path / "codes"}',
                                                                          'data.val='])
    with pytest.raises(ConfigError, match=r"codes' have no captions \(each item's caption is empty or its file name"):
        Trainer(cfg)
    assert not (tmp_path / 'run').exists()
