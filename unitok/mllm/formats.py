"""Prompt formats: how a multimodal LLM's requests become text and token ids (the prompt-format hook).

A :class:`PromptFormat` writes an understanding request (a question, with or without an image) and an
image-generation request (a prompt, or ``None`` for the null prompt of guidance) as token ids, and says
where the image positions go. :class:`VicunaV1` is the released UniTok MLLM's format (``eval/liquid``):

* understanding: the vicuna_v1 conversation ``SYSTEM USER: <image>\\nQUESTION ASSISTANT:``, each piece
  around ``<image>`` tokenized on its own and the image's L positions spliced in (no ``<boi>``/``<eoi>``
  around them, as the official evaluation feeds them);
* generation: ``PROMPT Generate an image based on this description.\\x00`` and ``<unconditional>\\x00``
  for the null prompt; under the Llama tokenizer the trailing ``\\x00`` is the byte token 3, ``<boi>``.

For training it also writes an answer's target ids (the answer, then ``</s>``, vicuna_v1's closing separator)
and the text before a generated image as the official training tokenizes it (``PROMPT Generate an image based
on this description.`` or ``<unconditional>``, with BOS, no ``<boi>``: the trainer appends the byte tokens).
"""
from __future__ import annotations

from .llm import LLMError

IMAGE_MARKER = '<image>'


class PromptFormat:
    """The interface; subclasses set the texts. Ids come from the LLM's own tokenizer."""

    def understanding_text(self, question: str, image: bool) -> str:
        raise NotImplementedError

    def generation_text(self, prompt: str | None) -> str:
        raise NotImplementedError

    def understanding_ids(self, tokenizer, question: str, image: bool) -> tuple[list[int], int | None]:
        """Token ids of the request without the image positions, and the index they go in (None: no image)."""
        raise NotImplementedError

    def generation_ids(self, tokenizer, prompt: str | None) -> list[int]:
        """Token ids of an image request, ending with the id that opens the image."""
        raise NotImplementedError

    def answer_ids(self, tokenizer, answer: str) -> list[int]:
        """Target ids of an answer that closes the assistant's turn (for training)."""
        raise NotImplementedError

    def generation_training_ids(self, tokenizer, prompt: str | None) -> list[int]:
        """Token ids of the text before a training image (for training)."""
        raise NotImplementedError


class VicunaV1(PromptFormat):
    """The released UniTok MLLM's prompts (see the module docstring)."""

    system = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    roles = ('USER', 'ASSISTANT')
    generation_suffix = ' Generate an image based on this description.'
    null_prompt = '<unconditional>'
    boi_text, boi_id, eoi_id = '\x00', 3, 4

    def understanding_text(self, question: str, image: bool) -> str:
        user = f'{IMAGE_MARKER}\n{question}' if image else question
        return f'{self.system} {self.roles[0]}: {user} {self.roles[1]}:'

    def generation_text(self, prompt: str | None) -> str:
        return (self.null_prompt if prompt is None else prompt + self.generation_suffix) + self.boi_text

    def understanding_ids(self, tokenizer, question: str, image: bool) -> tuple[list[int], int | None]:
        pieces = [tokenizer(p)['input_ids'] for p in self.understanding_text(question, image).split(IMAGE_MARKER)]
        # Every piece is tokenized with its BOS; when the first one starts with BOS the later ones drop
        # their first id (as the official tokenizer_image_token does).
        skip = 1 if pieces[0][:1] == [tokenizer.bos_token_id] else 0
        ids = list(pieces[0])
        at = None
        for p in pieces[1:]:
            at = len(ids)
            ids += p[skip:]
        return ids, at

    def generation_ids(self, tokenizer, prompt: str | None) -> list[int]:
        ids = tokenizer(self.generation_text(prompt))['input_ids']
        if ids[-1:] != [self.boi_id]:
            raise LLMError(f'the LLM tokenizer does not end an image request with the byte token {self.boi_id} '
                           f'(<boi>, the text {self.boi_text!r}); got {ids[-3:]}: not the Llama tokenizer of the '
                           'release')
        return ids

    def answer_ids(self, tokenizer, answer: str) -> list[int]:
        # 'ASSISTANT: ANSWER</s>' of the official conversation: the answer's own pieces (the tokenizer's
        # leading-space marker stands for the space after the colon), then EOS.
        return tokenizer(answer, add_special_tokens=False)['input_ids'] + [int(tokenizer.eos_token_id)]

    def generation_training_ids(self, tokenizer, prompt: str | None) -> list[int]:
        return tokenizer(self.null_prompt if prompt is None else prompt + self.generation_suffix)['input_ids']
