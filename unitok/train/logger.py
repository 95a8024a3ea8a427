"""Training logs: JSONL always, TensorBoard when installed, Weights & Biases on request, and a
progress bar with ETA. Only rank 0 writes."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from ..utils.io import atomic_write

log = logging.getLogger('unitok.train')


def keep_steps_up_to(path: str, step: int) -> None:
    """Drop the rows of the JSONL log ``path`` past ``step`` (logged after the checkpoint a resumed run
    starts from, and logged again by it) and any line cut by a kill, atomically: after any resume each
    step appears once."""
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get('step', 0) <= step:
            kept.append(line if line.endswith('\n') else line + '\n')
    if kept != lines:
        atomic_write(path, lambda f: f.writelines(kept), mode='w', what='metrics log')


class MetricsLogger:
    def __init__(self, directory: str, enabled: bool, total_steps: int, start_step: int = 0,
                 wandb_config: dict | None = None):
        self.enabled, self.total = enabled, total_steps
        self.jsonl = self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, 'metrics.jsonl')
        if start_step > 0:
            keep_steps_up_to(path, start_step)
        self.jsonl = open(path, 'a', encoding='utf-8')
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(directory, 'tensorboard'))
        except ImportError:
            pass
        if wandb_config is not None:
            try:
                import wandb
                self.wandb = wandb.init(project='unitok', dir=directory, config=wandb_config, resume='allow')
            except Exception as e:   # not installed, no network, no login
                log.warning('W&B disabled: %s: %s', type(e).__name__, e)
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total_steps, initial=start_step, desc='train', dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), smoothing=0.05)
        self.t0, self.s0 = time.time(), start_step

    def log(self, step: int, metrics: dict[str, float], kind: str = 'train') -> None:
        if not self.enabled:
            return
        row = {'step': step, 'kind': kind, 'time': round(time.time(), 3),
               **{k: (float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else str(v))
                  for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + '\n')
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(f'{kind}/{k}', v, step)
        if self.wandb is not None:
            self.wandb.log({f'{kind}/{k}': v for k, v in metrics.items()}, step=step)

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.n = step
            self.bar.set_postfix({k: f'{v:.3g}' for k, v in postfix.items()}, refresh=True)
        elif step % max(1, self.total // 20) == 0 or step == self.total:
            rate = (step - self.s0) / max(1e-9, time.time() - self.t0)
            eta = (self.total - step) / max(rate, 1e-9)
            terms = ' '.join(f'{k} {v:.3g}' for k, v in postfix.items())
            log.info('step %d/%d  %.2f it/s  eta %.1f min  %s', step, self.total, rate, eta / 60, terms)

    def image(self, step: int, tag: str, path: str) -> None:
        if self.enabled and self.tb is not None:
            import numpy as np
            from PIL import Image
            self.tb.add_image(tag, np.asarray(Image.open(path).convert('RGB')), step, dataformats='HWC')

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()
