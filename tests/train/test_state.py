"""Training checkpoints: a failed write (a full disk) is one error naming the file, and the previous
checkpoint is kept."""
import errno
import os

import pytest
import torch

from test_loop import ToyTask, toy
from unitok.checkpoint import CheckpointError
from unitok.train import Trainer
from unitok.train import state as state_module
from unitok.utils.io import OutputError
from pickle_payloads import RunsShell


def _disk_full_at(monkeypatch, step, error):
    save = torch.save

    def failing(obj, path, *a, **kw):
        if obj['step'] == step:
            with open(path, 'wb') as f:
                f.write(b'half a checkpoint')
            raise error
        return save(obj, path, *a, **kw)
    monkeypatch.setattr(state_module.torch, 'save', failing)


def test_a_full_disk_while_checkpointing_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    task = ToyTask(toy(tmp_path, steps=6, ckpt_every=2, keep_last=1))
    _disk_full_at(monkeypatch, 4, OSError(errno.ENOSPC, 'No space left on device'))
    with pytest.raises(OutputError) as e:
        Trainer(task.cfg, task).fit()
    path = str(tmp_path / 'run' / 'checkpoints' / 'step_00000004.pt')
    assert str(e.value) == f'cannot write training checkpoint {path!r}: the disk is full (no space left on device)'
    assert os.listdir(tmp_path / 'run' / 'checkpoints') == ['step_00000002.pt']      # kept, no temporary file
    assert torch.load(tmp_path / 'run' / 'checkpoints' / 'step_00000002.pt', weights_only=True)['step'] == 2


def test_torch_saves_causeless_write_error_is_explained_by_a_probe(tmp_path, monkeypatch):
    """torch.save reports a full disk as 'inline_container.cc ... unexpected pos': the probe finds the cause."""
    task = ToyTask(toy(tmp_path, steps=4, ckpt_every=2))
    _disk_full_at(monkeypatch, 2, RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598'))

    def probe(path):
        raise OutputError(errno.ENOSPC, f'cannot write output file {path!r}: the disk is full')
    monkeypatch.setattr(state_module, 'check_writable_file', probe)
    with pytest.raises(OutputError, match=r"cannot write training checkpoint '.*step_00000002.pt': the disk is full"):
        Trainer(task.cfg, task).fit()
    assert os.listdir(tmp_path / 'run' / 'checkpoints') == []


def test_resume_from_a_pickle_that_would_run_code_is_the_one_line_refusal(tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'format': 'unitok-training-checkpoint', 'payload': RunsShell(marker)}, tmp_path / 'evil.pt')
    task = ToyTask(toy(tmp_path, steps=1))
    with pytest.raises(CheckpointError, match=r"refused to load '.*evil.pt': the file is unsafe: unpickling it would "
                                              r'import and call os.system.*Nothing from the file was executed'):
        Trainer(task.cfg, task).fit(resume=str(tmp_path / 'evil.pt'))
    assert not marker.exists()
