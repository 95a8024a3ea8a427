"""Scores of free-text answers against the truth: exact match and word-multiset F1 (SQuAD-style),
after normalisation."""
from __future__ import annotations

import re
from collections import Counter


def normalize_answer(text: str) -> str:
    """Lower case, every run of characters other than letters and digits -> one space, stripped."""
    return ' '.join(re.sub(r'[\W_]+', ' ', text.lower()).split())


def token_f1(prediction: str, truth: str) -> float:
    """F1 of the word multisets of the normalised strings (1 when both are empty)."""
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not p or not t:
        return float(p == t)
    common = sum((Counter(p) & Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(truth))
