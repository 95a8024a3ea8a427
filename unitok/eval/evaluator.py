"""The tokenizer evaluation's former module name (the ``unitok eval`` command imports it from here)."""
from .tokenizer import ALL_METRICS, DEFAULT_METRICS, TRAINING_METRICS, EvalConfig, EvalResult, evaluate  # noqa: F401
from .subsets import subset_indices  # noqa: F401
