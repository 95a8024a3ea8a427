"""The quick-start demo wiring: train, evaluate, tokenise, report (a few steps only)."""
import json
import os

import pytest

from unitok.cli import main


@pytest.mark.slow
def test_demo_end_to_end_in_a_few_steps(tmp_path, capsys):
    assert main(['demo', '--out', str(tmp_path / 'demo'), '--steps', '2']) == 0
    out = capsys.readouterr().out
    assert 'report.html' in out
    summary = json.loads((tmp_path / 'demo' / 'demo_summary.json').read_text())
    assert summary['steps'] == 2 and 'psnr' in summary and 'zero_shot_top1' in summary
    report = json.loads((tmp_path / 'demo' / 'report' / 'report.json').read_text())
    assert report['samples'] == 380 and report['zero_shot_classes'] == 9
    samples = os.listdir(tmp_path / 'demo' / 'samples')
    assert 'codes.npz' in samples and len([s for s in samples if s.endswith('.png')]) == 12
    # a second run continues the finished training instead of starting over
    assert main(['demo', '--out', str(tmp_path / 'demo'), '--steps', '2']) == 0


def test_builtin_caption_variants_only_for_training():
    from unitok.data import open_source
    train, val = open_source('builtin:emoji', 'train'), open_source('builtin:emoji', 'val')
    _, captions, _ = train.read(0)
    assert isinstance(captions, list) and captions[0] == train.captions[0] and len(set(captions)) > 3
    _, caption, label = val.read(0)
    assert isinstance(caption, str) and 0 <= label < len(val.classnames) == 9


def test_demo_continues_an_interrupted_training_instead_of_starting_over(tmp_path, monkeypatch):
    """The demo hands ``resume='latest'`` to the trainer when its run has a checkpoint (fast: the
    trainer is replaced by a recorder that stops like an interrupted run)."""
    import unitok.train
    from unitok.train.state import Checkpointer
    calls = []

    class Recorder:
        def __init__(self, cfg, *args, **kwargs):
            self.cfg = cfg
            self.checkpointer = Checkpointer(os.path.join(cfg.out, 'checkpoints'))

        def fit(self, resume=None):
            calls.append(resume)
            return {'exit': 'signal SIGTERM'}
    monkeypatch.setattr(unitok.train, 'Trainer', Recorder)
    out = tmp_path / 'demo'
    assert main(['demo', '--out', str(out), '--steps', '2']) == 143
    ckpt = out / 'train' / 'checkpoints' / 'step_00000001.pt'
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b'')
    assert main(['demo', '--out', str(out), '--steps', '2']) == 143
    assert calls == [None, 'latest']
