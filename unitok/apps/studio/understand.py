"""What the Understand tab computes: zero-shot top-5 with the tokenizer's CLIP head, and a streamed MLLM chat."""
from __future__ import annotations

from typing import Iterator

from PIL import Image

from .streaming import stream_call
from .tokens import model_input

TEMPLATES = ('a photo of a {}.', 'an emoji of a {}.', '{}')
TOP = 5


def zero_shot(tokenizer, image: Image.Image, labels: list[str]) -> dict[str, float]:
    """The top-5 labels with their probabilities (softmax over all labels of the scaled cosine similarity)."""
    classifier = tokenizer.zero_shot_classifier(labels, TEMPLATES)
    probs = tokenizer.classify(model_input(tokenizer, image), classifier).float().softmax(-1)[0]
    top = probs.topk(min(TOP, len(labels)))
    return {labels[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}


def chat(mllm, image: Image.Image | None, question: str, max_new_tokens: int) -> Iterator[str]:
    """The answer so far after each new piece of text (greedy, :meth:`UniTokMLLM.chat` with ``stream``);
    last, the answer as ``chat`` returns it (special tokens dropped, stripped)."""
    text = ''
    for kind, value in stream_call(lambda emit: mllm.chat(image, question, max_new_tokens=max_new_tokens,
                                                          stream=emit)):
        if kind == 'item':
            text += value
            yield text
        else:
            yield value

