"""The generator trained through the one loop on exported codes: learning, held-out NLL, exact resume
after SIGTERM, export, `unitok generate`, and clear errors for codes that do not fit."""
import json

import numpy as np
import pytest
import torch

import unitok
from unitok.cli import main as cli
from train_helpers import (kill_9_then_resume, load_params, logged_rows, max_param_diff, run_unitok,
                           saved_tiny_tokenizer, uninterrupted_and_resumed)
from unitok.config import ConfigError
from unitok.generation import GeneratorModel
from unitok.codes import ExportConfig, export_codes
from unitok.train import Trainer
from unitok.train.tasks.generator import GeneratorTask, GenTrainConfig


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp('gen')
    tok = saved_tiny_tokenizer(root)
    export_codes(tok, ExportConfig(data='builtin:emoji', split='train', limit=96, augment=('flip',)),
                 str(root / 'train'))
    export_codes(tok, ExportConfig(data='builtin:emoji', split='val', limit=32), str(root / 'val'))
    return root


def _cfg(root, out, steps=12, **kw):
    base = dict(out=str(out), steps=steps, precision='fp32', log_every=1, eval_every=0, image_every=0, ckpt_every=0,
                keep_last=10, tokenizer=str(root / 'tokenizer'))
    cfg = GenTrainConfig(**{**base, **kw})
    return cfg.override([f'data.train={root / "train"}', f'data.val={root / "val"}', 'data.batch_size=8',
                         'optim.lr=3e-3', 'optim.warmup=0', 'model.dim=64', 'model.num_heads=2', 'model.depth=2'])


def test_generator_learns_on_exported_codes_and_reports_held_out_nll(exported, tmp_path):
    cfg = _cfg(exported, tmp_path / 'run', steps=30, eval_every=30)
    summary = Trainer(cfg).fit()
    assert summary['exit'] == 'finished'
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    train = [r for r in rows if r['kind'] == 'train']
    val = [r for r in rows if r['kind'] == 'val']
    K, V = 8, 512
    assert train[0]['loss'] == pytest.approx(np.log(V), rel=0.02)        # zero-initialised heads: uniform
    assert train[-1]['loss'] < train[0]['loss'] - 0.3
    assert {f'nll_{k}' for k in range(K)} <= set(val[-1]) and val[-1]['samples'] == 32
    assert val[-1]['nll'] < np.log(V)
    model = GeneratorModel.from_pretrained(str(tmp_path / 'run' / 'model'))
    info = json.load(open(tmp_path / 'run' / 'model' / 'generation.json'))
    assert model.config.num_classes == len(info['classnames']) == 9
    assert (model.config.num_codebooks, model.config.codebook_size) == (K, V)


def test_generator_resume_after_sigterm_is_exact(exported, tmp_path, monkeypatch):
    ref, again = uninterrupted_and_resumed(lambda out: _cfg(exported, out, steps=6), tmp_path, monkeypatch)
    for (name, a), b in zip(ref.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_generator_resume_after_kill_9_is_exact(exported, tmp_path):
    args = ['train-gen', '--codes', str(exported / 'train'), '--val-codes', str(exported / 'val'), '--tokenizer',
            str(exported / 'tokenizer'), '--preset', 'gen-tiny', '--steps', '40', '--batch-size', '8',
            'precision=fp32', 'ckpt_every=2', 'keep_last=100', 'log_every=1', 'eval_every=0', 'image_every=0',
            'data.num_workers=1', 'threads=1', 'model.dim=64', 'model.num_heads=2', 'model.depth=2', 'optim.lr=3e-3']
    run_unitok([*args, '--out', str(tmp_path / 'ref')])
    kill_9_then_resume(args, tmp_path / 'cut', 'step_00000002.pt')
    a = load_params(str(tmp_path / 'ref' / 'checkpoints' / 'step_00000040.pt'))
    b = load_params(str(tmp_path / 'cut' / 'checkpoints' / 'step_00000040.pt'))
    assert max_param_diff(a, b) == 0
    assert logged_rows(tmp_path / 'cut') == logged_rows(tmp_path / 'ref')      # each step once, the same values


def test_generate_command_writes_a_grid_and_the_codes(exported, tmp_path, capsys):
    Trainer(_cfg(exported, tmp_path / 'run', steps=2)).fit()
    out = tmp_path / 'grid.png'
    assert cli(['generate', '--gen', str(tmp_path / 'run' / 'model'), '--class', 'animals & nature', '--n', '3',
                '--cfg', '1.5', '--seed', '0', '--out', str(out)]) == 0
    codes = np.load(tmp_path / 'grid.npz', allow_pickle=False)
    assert codes['codes'].shape == (3, 8, 4, 4) and codes['codes'].max() < 512
    assert out.exists()
    # the same seed gives the same codes; the decoded grid is what the tokenizer makes of them
    assert cli(['generate', '--gen', str(tmp_path / 'run' / 'model'), '--class', 'animals & nature', '--n', '3',
                '--cfg', '1.5', '--seed', '0', '--out', str(tmp_path / 'again.png')]) == 0
    assert np.array_equal(np.load(tmp_path / 'again.npz')['codes'], codes['codes'])
    # an unknown class lists the valid ones
    assert cli(['generate', '--gen', str(tmp_path / 'run' / 'model'), '--class', 'dinosaurs',
                '--out', str(tmp_path / 'x.png')]) == 2

    # a huge --n: refused before sampling, with the memory it would need
    capsys.readouterr()
    assert cli(['generate', '--gen', str(tmp_path / 'run' / 'model'), '--n', '100000000', '--out',
                str(tmp_path / 'huge.png')]) == 2
    assert 'samples would need about' in capsys.readouterr().err and not (tmp_path / 'huge.npz').exists()


def test_generated_codes_carry_the_tokenizer_identity(exported, tmp_path, capsys):
    """`unitok decode` takes them with their tokenizer and refuses them with another of the same shape;
    a codes file without an identity is decoded with a warning naming the check skipped."""
    Trainer(_cfg(exported, tmp_path / 'run', steps=1)).fit()
    assert cli(['generate', '--gen', str(tmp_path / 'run' / 'model'), '--class', 'animals & nature', '--n', '2',
                '--seed', '0', '--out', str(tmp_path / 'grid.png')]) == 0
    identity = json.loads(str(np.load(tmp_path / 'grid.npz')['tokenizer']))
    tok = unitok.UniTok.from_pretrained(str(exported / 'tokenizer'))
    assert identity == {**unitok.codes.tokenizer_identity(tok), 'grid': [4, 4], 'image_size': 64}
    decode = ['decode', str(tmp_path / 'grid.npz'), '--out-dir', str(tmp_path / 'dec'), '--device', 'cpu']
    assert cli([*decode, '--model', str(exported / 'tokenizer')]) == 0
    torch.manual_seed(1)
    other = unitok.create_model('unitok-tiny')
    other.init_weights()
    other.save_pretrained(str(tmp_path / 'tok2'))
    capsys.readouterr()
    assert cli([*decode[:3], str(tmp_path / 'dec2'), '--model', str(tmp_path / 'tok2'), '--device', 'cpu']) == 2
    assert 'other codebooks' in capsys.readouterr().err and not (tmp_path / 'dec2').exists()
    bare = dict(np.load(tmp_path / 'grid.npz'))
    del bare['tokenizer']
    np.savez(tmp_path / 'bare.npz', **bare)
    with pytest.warns(UserWarning, match=r"bare.npz' records no tokenizer identity: the check that its codes come "
                                         'from this tokenizer is skipped'):
        assert cli(['decode', str(tmp_path / 'bare.npz'), '--out-dir', str(tmp_path / 'dec3'), '--model',
                    str(tmp_path / 'tok2'), '--device', 'cpu']) == 0


def test_generate_checks_its_outputs_first_and_gives_n_per_class(exported, tmp_path):
    Trainer(_cfg(exported, tmp_path / 'run', steps=1)).fit()
    gen = ['generate', '--gen', str(tmp_path / 'run' / 'model'), '--seed', '0']
    # without --class: --n samples of every class (the help's "samples per class"), a row each
    assert cli([*gen, '--n', '2', '--out', str(tmp_path / 'all.png')]) == 0
    labels = np.load(tmp_path / 'all.npz')['labels']
    classes = sorted(set(labels.tolist()))
    assert len(classes) > 1 and labels.tolist() == [c for c in classes for _ in range(2)]
    # --out naming the codes file or no image format: refused before any work, nothing written
    for bad in ('x.npz', 'x.txt'):
        assert cli([*gen, '--class', 'animals & nature', '--n', '1', '--out', str(tmp_path / bad)]) == 2
    assert not any((tmp_path / n).exists() for n in ('x.npz', 'x.png', 'x.txt'))
    # a directory where the codes would go: refused before the image is written
    (tmp_path / 'y.npz').mkdir()
    assert cli([*gen, '--class', 'animals & nature', '--n', '1', '--out', str(tmp_path / 'y.png')]) != 0
    assert not (tmp_path / 'y.png').exists()
    # the suffix names the format written
    assert cli([*gen, '--class', 'animals & nature', '--n', '1', '--out', str(tmp_path / 'g.jpg')]) == 0
    assert (tmp_path / 'g.jpg').read_bytes()[:3] == b'\xff\xd8\xff' and (tmp_path / 'g.npz').exists()


def test_a_generator_without_its_generation_json_gets_no_message_loop(exported, tmp_path, capsys):
    Trainer(_cfg(exported, tmp_path / 'run', steps=1)).fit()
    model = tmp_path / 'run' / 'model'
    info = json.loads((model / 'generation.json').read_text())
    (model / 'generation.json').unlink()
    gen = ['generate', '--gen', str(model), '--tokenizer', info['tokenizer'], '--n', '1', '--seed', '0']
    assert cli([*gen, '--class', 'animals & nature', '--out', str(tmp_path / 'a.png')]) == 2
    err = capsys.readouterr().err
    assert 'pass --class with class indices 0..' in err and 'text-conditional' not in err
    assert cli([*gen, '--prompt', 'a cat', '--out', str(tmp_path / 'b.png')]) == 2
    assert 'class-conditional: use --class' in capsys.readouterr().err
    with pytest.warns(UserWarning, match='records no identity of the tokenizer of the codes: the check .* is skipped'):
        assert cli([*gen, '--class', '1', '--out', str(tmp_path / 'c.png')]) == 0
    assert np.load(tmp_path / 'c.npz')['labels'].tolist() == [1]


def test_a_prompt_longer_than_the_text_tower_reads_is_refused(exported, tmp_path, capsys):
    cfg = _cfg(exported, tmp_path / 'run', steps=1)
    Trainer(cfg.override(['model.cond=text'])).fit()
    gen = ['generate', '--gen', str(tmp_path / 'run' / 'model'), '--n', '1', '--seed', '0']
    assert cli([*gen, '--prompt', 'a red apple', '--out', str(tmp_path / 'ok.png')]) == 0
    assert cli([*gen, '--prompt', 'a red apple, ' * 2000, '--out', str(tmp_path / 'long.png')]) == 2
    err = capsys.readouterr().err
    assert 'is 8002 text tokens; the text tower reads at most 32' in err          # unitok-tiny's context
    assert not (tmp_path / 'long.png').exists() and not (tmp_path / 'long.npz').exists()


def test_codes_that_do_not_fit_get_one_clear_error(exported, tmp_path):
    with pytest.raises(ConfigError, match='contradict the exported codes'):
        GeneratorTask(_cfg(exported, tmp_path / 'a').override(['model.codebook_size=1024']))
    other = unitok.create_model('unitok-tiny', codebook_size=256)
    other.save_pretrained(str(tmp_path / 'other'))
    with pytest.raises(Exception, match='another tokenizer'):
        GeneratorTask(_cfg(exported, tmp_path / 'b').override([f'tokenizer={tmp_path / "other"}']))
    with pytest.raises(ConfigError, match='codes'):
        GenTrainConfig(out=str(tmp_path / 'c')).validate()
