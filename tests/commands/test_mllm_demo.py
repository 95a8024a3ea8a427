"""`unitok demo-mllm` end to end (tiny random Llama, a few steps, the first emoji only; 4-5 minutes a run
on a loaded 2-core machine, most of it the held-out evaluation, so marked slow): the summary, the page,
the model directory, and reruns that reuse or continue instead of starting over. The default tokenizer
path and the argument checks are fast."""
import json
import os
import signal

import pytest

pytest.importorskip('transformers')

from unitok.commands import main  # noqa: E402

# The first 24 emoji of each split; 8 held-out ones evaluated (2 categories there, 4 each).
ARGS = ['--llm', 'tiny-random', '--steps', '3', '--batch-size', '2', '--limit', '24', '--eval-items', '8', '--fp32']


def _summary(out):
    return json.loads((out / 'demo_summary.json').read_text())


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    import torch

    import unitok
    torch.manual_seed(0)
    tok = unitok.create_model('unitok-tiny', num_codebooks=8, codebook_size=512, code_dim=4)
    tok.init_weights()
    path = tmp_path_factory.mktemp('demo_tok') / 'tokenizer'
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope='module')
def demo(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp('demo_mllm') / 'demo'
    assert main(['demo-mllm', '--out', str(out), '--tokenizer', str(tokenizer), *ARGS]) == 0
    return out


@pytest.mark.slow
def test_demo_writes_summary_page_and_a_loadable_model(demo):
    import unitok
    s = _summary(demo)
    assert set(s['stages']) == {'codes_train', 'codes_val', 'mllm', 'evaluate'}
    assert all(r['finished'] and r['seconds'] > 0 and r['runs'] == 1 for r in s['stages'].values())
    assert s['stages']['mllm']['steps'] == 3
    assert s['stages']['codes_train']['images'] == 24 and s['stages']['codes_val']['images'] == 24
    assert s['total_minutes'] == pytest.approx(sum(r['seconds'] for r in s['stages'].values()) / 60)
    assert 100 < s['peak_rss_mib'] < 64 * 1024 and s['reused'] == []
    assert s['chance'] == pytest.approx(1 / 9) and s['items'] == 8
    for k in ('llm_zero_shot_top1', 'control_swapped_top1', 'control_noise_top1', 'tokenizer_zero_shot_top1',
              'name_exact_match', 'name_token_f1'):
        assert 0 <= s[k] <= 1, k
    assert s['t2i'] and all(0 <= t['t2i_consistency'] <= 1 for t in s['t2i'])

    page = (demo / 'index.html').read_text()
    assert page.count('<img class="emoji"') == 8 + 6 * 3       # 8 questions; 6 prompts x (2 drawings + the real one)
    assert 'What is this emoji?' in page and 'Which category is this emoji in?' in page
    assert 'llm_zero_shot_top1' in page and 'control_noise_top1' in page and 'Draw an emoji of' in page
    assert '$' not in page.split('<style>')[0]                 # every template field filled

    model = unitok.UniTokMLLM.from_pretrained(str(demo / 'model'))
    from unitok.codes import CodeDataset
    first = CodeDataset(str(demo / 'codes' / 'val'), view=0)[0]['codes']
    answer = model.chat(first, 'What is this emoji?', max_new_tokens=16)
    assert isinstance(answer, str)
    import html
    assert f'{html.escape(answer)}<br><span class="hint">true:' in page      # the page shows the model's answers


@pytest.mark.slow
def test_a_second_run_reuses_every_finished_stage(demo, tokenizer):
    before = _summary(demo)
    assert main(['demo-mllm', '--out', str(demo), '--tokenizer', str(tokenizer), *ARGS]) == 0
    s = _summary(demo)
    assert s['reused'] == ['codes_train', 'codes_val', 'mllm']
    for name in ('codes_train', 'codes_val', 'mllm'):
        assert s['stages'][name] == before['stages'][name], name
    assert s['stages']['evaluate']['runs'] == 2


@pytest.mark.slow
def test_an_interrupted_training_continues_from_its_checkpoint(tmp_path, monkeypatch, tokenizer):
    from unitok.train.tasks.mllm import MLLMTask
    loss = MLLMTask.loss

    def signalled(self, phase, batch, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, phase, batch, step)
    out = tmp_path / 'demo'
    args = ['demo-mllm', '--out', str(out), '--tokenizer', str(tokenizer), *ARGS]
    monkeypatch.setattr(MLLMTask, 'loss', signalled)
    assert main(args) == 143
    stages = json.loads((out / 'stages.json').read_text())
    assert stages['mllm']['finished'] is False and stages['mllm']['steps'] == 2
    assert not (out / 'model').exists() and not (out / 'demo_summary.json').exists()
    monkeypatch.setattr(MLLMTask, 'loss', loss)
    assert main(args) == 0
    s = _summary(out)
    assert s['stages']['mllm']['runs'] == 2 and s['stages']['mllm']['finished'] and s['mllm_steps'] == 3
    assert 'tokenizer' not in s['stages'] and s['reused'] == ['codes_train', 'codes_val']
    log = [json.loads(line) for line in (out / 'mllm' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in log if r['kind'] == 'train'] == [1, 2, 3]     # steps 1-2, then 3: none twice


def test_without_tokenizer_it_trains_one_with_the_recipe_and_resumes_it(tmp_path, monkeypatch):
    """The default path hands the tokenizer recipe to the trainer, and ``resume='latest'`` once its run
    has a checkpoint (fast: the trainer is replaced by a recorder that stops like an interrupted run)."""
    import unitok.train.loop
    from unitok.train.state import Checkpointer
    calls = []

    class Recorder:
        def __init__(self, cfg, *args, **kwargs):
            self.cfg = cfg
            self.checkpointer = Checkpointer(os.path.join(cfg.out, 'checkpoints'))

        def fit(self, resume=None):
            calls.append((self.cfg, resume))
            return {'exit': 'signal SIGTERM', 'step': 1}
    monkeypatch.setattr(unitok.train.loop, 'Trainer', Recorder)
    out = tmp_path / 'demo'
    assert main(['demo-mllm', '--out', str(out)]) == 143
    ckpt = out / 'tokenizer' / 'checkpoints' / 'step_00000001.pt'
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b'')
    assert main(['demo-mllm', '--out', str(out)]) == 143
    (cfg, first), (_, second) = calls
    assert (first, second) == (None, 'latest')
    assert cfg.preset == 'unitok-tiny' and cfg.steps == 500 and cfg.out == str(out / 'tokenizer')
    m = cfg.model
    assert (m['image_size'], m['num_codebooks'], m['codebook_size'], m['code_dim']) == (64, 8, 512, 4)
    assert cfg.data.train == 'builtin:emoji' and cfg.loss.perceptual == 'none' and cfg.loss.discriminator == 'none'
    stages = json.loads((out / 'stages.json').read_text())
    assert stages['tokenizer']['finished'] is False and stages['tokenizer']['runs'] == 2


def test_bad_arguments_fail_with_one_clear_error(tmp_path, capsys):
    assert main(['demo-mllm', '--out', str(tmp_path / 'd'), '--steps', '0']) == 2
    assert '--steps must be >= 1' in capsys.readouterr().err
    assert main(['demo-mllm', '--out', str(tmp_path / 'd'), '--tokenizer', str(tmp_path)]) == 2
    assert 'not a UniTok model directory' in capsys.readouterr().err


def test_later_stages_arguments_are_checked_before_the_first_stage(tmp_path, capsys, monkeypatch):
    """--lr nan and an LLM that is not there fail at once, not after the export and the LLM's loading."""
    from unitok.commands import demo_mllm
    monkeypatch.setattr(demo_mllm, '_trained', lambda *a, **k: pytest.fail('a stage ran before the check'))
    monkeypatch.setattr(demo_mllm, '_export', lambda *a, **k: pytest.fail('the export ran before the check'))
    assert main(['demo-mllm', '--out', str(tmp_path / 'd'), '--lr', 'nan']) == 2
    assert 'optim.lr must be a positive finite number, got nan (from --lr' in capsys.readouterr().err
    assert main(['demo-mllm', '--out', str(tmp_path / 'd'), '--llm', str(tmp_path / 'no-llm')]) == 2
    assert f"no LLM directory at {str(tmp_path / 'no-llm')!r}" in capsys.readouterr().err
    assert not (tmp_path / 'd').exists()
