"""What a :class:`~unitok.mllm.UniTokMLLM` reads: images as codes, and the token sequences it trains on
and samples from.

``understanding: [user: <boi> img*L <eoi> \\n question] [assistant: answer <end-of-turn>]`` (text
target: the answer); ``generation: [user: prompt] [assistant: <boi> img*L]`` (image targets: the L
positions). Each example is a dict of ``input_ids``, ``image_mask``, ``codes (T, K)``, ``labels`` and
``image_targets``, as :func:`unitok.mllm.data.collate` batches them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .data import IGNORE
from .llm import IMAGE_TOKENS, LLMError, chat_prompt


def end_of_turn(tokenizer) -> int:
    """The id that ends an answer: the chat template's end-of-turn token, else EOS."""
    vocab = tokenizer.get_vocab()
    for t in ('<|im_end|>', '<|eot_id|>', '<|end|>'):
        if t in vocab:
            return int(vocab[t])
    if tokenizer.eos_token_id is None:
        raise LLMError('the LLM tokenizer has no end-of-turn or EOS token to end answers with')
    return int(tokenizer.eos_token_id)


def codes_as_rows(config, codes: torch.Tensor) -> torch.Tensor:
    """Codes of one image ``(K, h, w)`` or ``(1, K, h, w)`` -> ``(L, K)`` int64, with clear errors."""
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f'codes must be an integer tensor (K, h, w), got {type(codes).__name__}'
                        f'{" " + str(codes.dtype) if isinstance(codes, torch.Tensor) else ""}')
    if codes.dim() == 4 and codes.shape[0] == 1:
        codes = codes[0]
    want = (config.num_codebooks, *config.grid)
    if tuple(codes.shape) != want:
        raise ValueError(f'codes must have shape {want} (K sub-codebooks, grid {config.grid[0]}x{config.grid[1]}), '
                         f'got {tuple(codes.shape)}')
    if int(codes.min()) < 0 or int(codes.max()) >= config.codebook_size:
        raise ValueError(f'codes must lie in [0, {config.codebook_size}), got [{int(codes.min())}, '
                         f'{int(codes.max())}]')
    return codes.long().flatten(1).t().contiguous()                               # (L, K)


def text_ids(model, text: str) -> list[int]:
    return model.text_tokenizer(text, add_special_tokens=False)['input_ids']


def check_length(model, n: int, what: str = 'the sequence') -> None:
    if n > model.max_length:
        raise ValueError(f'{what} has {n} tokens, more than the LLM\'s context of {model.max_length} '
                         f'(an image takes {model.config.num_positions} positions): shorten the prompt')


def understanding_sequence(model, codes: torch.Tensor, question: str, answer: str | None = None) -> dict:
    """The sequence of one question about an image (and its answer as the text target)."""
    c = model.config
    boi, eoi = (c.image_token_ids[t] for t in IMAGE_TOKENS)
    L = c.num_positions
    prompt = text_ids(model, chat_prompt(model.text_tokenizer, f'{IMAGE_TOKENS[0]}{IMAGE_TOKENS[1]}\n{question}'))
    at = prompt.index(boi)
    if prompt[at + 1] != eoi:
        raise LLMError('the chat template split the image tokens apart')
    ids = prompt[:at + 1] + [0] * L + prompt[at + 1:]
    image = [False] * (at + 1) + [True] * L + [False] * (len(prompt) - at - 1)
    grid = torch.zeros(len(ids), c.num_codebooks, dtype=torch.long)
    grid[at + 1:at + 1 + L] = codes_as_rows(c, codes)
    labels = [IGNORE] * len(ids)
    if answer is not None:
        target = text_ids(model, answer) + [model._end_of_turn]
        labels = labels[:-1] + [target[0]] + target[1:] + [IGNORE]
        ids = ids + target
        image += [False] * len(target)
        grid = torch.cat([grid, grid.new_zeros(len(target), grid.shape[1])])
    check_length(model, len(ids))
    return dict(input_ids=torch.tensor(ids), image_mask=torch.tensor(image), codes=grid,
                labels=torch.tensor(labels), image_targets=torch.zeros(len(ids), dtype=torch.bool))


def text_sequence(model, question: str) -> dict:
    """The sequence of a question without an image."""
    ids = text_ids(model, chat_prompt(model.text_tokenizer, question))
    return dict(input_ids=torch.tensor(ids), image_mask=torch.zeros(len(ids), dtype=torch.bool),
                codes=torch.zeros(len(ids), model.config.num_codebooks, dtype=torch.long))


def generation_prefix(model, prompt: str | None) -> list[int]:
    """Token ids of a text-to-image request, ending with ``<boi>``; ``None`` -> the null prompt."""
    boi = model.config.image_token_ids[IMAGE_TOKENS[0]]
    return text_ids(model, chat_prompt(model.text_tokenizer, prompt or '')) + [boi]


def generation_sequence(model, codes: torch.Tensor, prompt: str | None) -> dict:
    """The sequence of one text-to-image example (``prompt=None``: the null prompt of guidance)."""
    L = model.config.num_positions
    pre = generation_prefix(model, prompt)
    ids = pre + [0] * L
    check_length(model, len(ids))
    grid = torch.zeros(len(ids), model.config.num_codebooks, dtype=torch.long)
    grid[len(pre):] = codes_as_rows(model.config, codes)
    image = torch.zeros(len(ids), dtype=torch.bool)
    image[len(pre):] = True
    targets = torch.zeros(len(ids), dtype=torch.bool)
    targets[len(pre) - 1:len(ids) - 1] = True
    return dict(input_ids=torch.tensor(ids), image_mask=image, codes=grid,
                labels=torch.full((len(ids),), IGNORE), image_targets=targets)


def image_codes(model, image) -> torch.Tensor:
    """A path, PIL image or ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in [-1, 1] -> codes ``(K, h, w)``
    through the model's UniTok tokenizer."""
    from ..images import to_tensor
    tok = model.image_tokenizer
    size = tok.config.image_size
    if isinstance(image, torch.Tensor):
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise ValueError(f'image must be a tensor (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}')
        if tuple(x.shape[-2:]) != (size, size):
            grid = model.config.grid
            raise ValueError(f'image is {x.shape[-2]}x{x.shape[-1]}; this MLLM reads {size}x{size} images '
                             f'(grid {grid[0]}x{grid[1]}): resize it, or pass a path/PIL image to resize automatically')
    else:
        x = to_tensor(image, size=size)
    return tok.encode(x.to(tok.device))[0]


def chat_sequence(model, image, question: str, max_new_tokens: int) -> dict:
    """The sequence of a question about ``image`` (None: no image; int codes ``(K, h, w)``; else what
    :func:`image_codes` reads), checked to leave room for ``max_new_tokens``."""
    if not isinstance(question, str):
        raise TypeError(f'question must be a string, got {type(question).__name__}')
    if image is None:
        example = model.text_example(question)
    else:
        codes = image if isinstance(image, torch.Tensor) and not image.dtype.is_floating_point \
            else model.encode_image(image)
        example = model.understanding_example(codes, question)
    check_length(model, len(example['input_ids']) + max_new_tokens, 'the question plus max_new_tokens')
    return example


def image_request_rows(model, prompt: str | Sequence[str], n: int) -> list[list[int]]:
    """The token ids of ``n`` image requests per prompt (each ending with ``<boi>``)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f'prompt must be a string or a list of strings, got {prompt!r}')
    if not isinstance(n, int) or n < 1:
        raise ValueError(f'n must be an int >= 1, got {n!r}')
    rows = [model.generation_prompt(p) for p in prompts for _ in range(n)]
    for r in rows:
        check_length(model, len(r) + model.config.num_positions, 'the prompt plus the image')
    return rows
