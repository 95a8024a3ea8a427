"""Evaluation: metric maths in :mod:`.metrics`; pipelines for the tokenizer (:mod:`.tokenizer`), the
generator (:mod:`.generation`) and the MLLM (:mod:`.mllm`); one report renderer (:mod:`.report`)."""
from .subsets import subset_indices
from .metrics import CodebookStats, FrechetDistance, inception_score, kernel_inception_distance
from .report import compare, write_report
from .tokenizer import ALL_METRICS, DEFAULT_METRICS, TRAINING_METRICS, EvalConfig, EvalResult, evaluate

__all__ = ['evaluate', 'EvalConfig', 'EvalResult', 'ALL_METRICS', 'DEFAULT_METRICS', 'TRAINING_METRICS',
           'subset_indices', 'FrechetDistance', 'CodebookStats', 'kernel_inception_distance', 'inception_score',
           'write_report', 'compare', 'run_evaluation']


def run_evaluation(model_path: str, data: str, out_dir: str, cfg: EvalConfig | None = None, split: str = 'val',
                   name: str | None = None, progress: bool = False) -> dict:
    """Load a model, evaluate it on ``data`` (a data spec), write the report; returns report.json's content
    (on every rank; only rank 0 writes)."""
    import os
    import platform

    import torch

    from ..data import open_source
    from ..model import UniTok
    from ..utils import distributed as D
    cfg = cfg or EvalConfig()
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if torch.cuda.is_available() else 'cpu'
    model = UniTok.from_pretrained(model_path).to(device)
    source = open_source(data, split, resampled=False)
    result = evaluate(model, source, cfg, progress=progress)
    meta = {
        'name': name or _model_name(model_path), 'model': model_path, 'data': data,
        'split': split, 'config': model.config.to_dict(),
        'protocol': {'resize': cfg.resize, 'image_size': cfg.image_size or model.config.image_size,
                     'interpolation': 'bicubic, antialias', 'extractors': list(cfg.extractors),
                     'reconstruction': 'clamped to [-1, 1]; features from uint8 images',
                     'metrics': list(cfg.metrics), 'subset': result.subset},
        'processes': D.rank_and_world()[1],
        'versions': {'torch': torch.__version__, 'python': platform.python_version()},
    }
    if D.rank_and_world()[0] == 0:
        return write_report(out_dir, result, meta)
    return {**result.metrics, 'per_codebook': result.per_codebook, 'meta': meta}


def _model_name(path: str) -> str:
    """A readable name: the run directory for ``runs/NAME/model``, else the last path component."""
    import os
    parts = os.path.normpath(path).split(os.sep)
    return parts[-2] if parts[-1] == 'model' and len(parts) > 1 else parts[-1]
