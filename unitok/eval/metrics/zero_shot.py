"""Understanding metrics: zero-shot classification (top-1/top-5) and image-text retrieval recall@k."""
from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the k highest logits, for each k (labels < 0 ignored)."""
    valid = labels >= 0
    logits, labels = logits[valid], labels[valid]
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, :k].any(-1).sum()) for k in ks}


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, captions: list[str],
                     ks=(1, 5, 10), chunk: int = 4096) -> dict[str, float]:
    """Recall@k for image->text and text->image over a set of pairs.

    Identical captions count as the same text (two images of one emoji share a caption): an image is
    retrieved correctly when any of its top-k texts has its caption; texts are de-duplicated and a
    text is retrieved correctly when any of its top-k images carries it.
    """
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    owner = torch.tensor([index[c] for c in captions])                      # image i -> text id
    first: dict[str, int] = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    texts = text_features[[first[c] for c in unique]]                       # (T, E)
    images, texts = image_features.double(), texts.double()
    k_max = max(ks)
    # In chunks: the full (N, T) similarity matrix of a large evaluation set does not fit in memory.
    i2t = torch.cat([(images[s:s + chunk] @ texts.T).topk(min(k_max, texts.shape[0]), dim=1).indices
                     for s in range(0, images.shape[0], chunk)])           # (N, k)
    t2i = torch.cat([(texts[s:s + chunk] @ images.T).topk(min(k_max, images.shape[0]), dim=1).indices
                     for s in range(0, texts.shape[0], chunk)])           # (T, k)
    out = {}
    for k in ks:
        out[f'image_to_text_recall@{k}'] = float((i2t[:, :k] == owner[:, None]).any(1).double().mean())
        out[f'text_to_image_recall@{k}'] = float((owner[t2i[:, :k]] == torch.arange(len(unique))[:, None])
                                                 .any(1).double().mean())
        out[f'recall@{k}'] = (out[f'image_to_text_recall@{k}'] + out[f'text_to_image_recall@{k}']) / 2
    return out
