"""Prompt formats (unitok.mllm.formats): the released MLLM's vicuna_v1 texts and the tokenizer they need."""
import pytest

from unitok.mllm import LLMError
from unitok.mllm.formats import VicunaV1


def test_vicuna_v1_texts():
    f = VicunaV1()
    assert f.understanding_text('Why?', False) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Why? ASSISTANT:")
    assert f.understanding_text('Why?', True).endswith(' USER: <image>\nWhy? ASSISTANT:')
    assert f.generation_text('a cat') == 'a cat Generate an image based on this description.\x00'
    assert f.generation_text(None) == '<unconditional>\x00'


def test_a_tokenizer_without_the_llama_byte_tokens_is_one_error():
    from unitok.mllm.tiny import tiny_tokenizer
    with pytest.raises(LLMError, match=r"does not end an image request with the byte token 3 \(<boi>"):
        VicunaV1().generation_ids(tiny_tokenizer(), 'a cat')


def test_pieces_after_the_image_drop_their_bos():
    class Tok:
        bos_token_id = 1

        def __call__(self, text):
            return {'input_ids': [1] + [len(w) + 10 for w in text.split(' ')]}
    ids, at = VicunaV1().understanding_ids(Tok(), 'ab', True)
    assert ids[0] == 1 and ids.count(1) == 1 and ids[at:] == [len('\nab') + 10, len('ASSISTANT:') + 10]
    ids, at = VicunaV1().understanding_ids(Tok(), 'ab', False)
    assert at is None and ids.count(1) == 1
