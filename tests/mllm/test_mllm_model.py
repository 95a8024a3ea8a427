"""The multimodal LLM on a tiny random Llama: cached == uncached generation (text and image codes),
one input path for image positions, the mixed-batch loss, save/load of the special tokens and
adapters, and one clear error for each bad input."""
import os

import pytest
import torch

pytest.importorskip('transformers')

import unitok  # noqa: E402
from unitok.checkpoint import CheckpointError  # noqa: E402
from unitok.mllm.data import collate  # noqa: E402
from unitok.mllm.generate import generate_text  # noqa: E402
from unitok.mllm.llm import LLMError  # noqa: E402
from unitok.mllm.model import UniTokMLLM  # noqa: E402
from unitok.mllm.tiny import tiny_llm  # noqa: E402
from pickle_payloads import RunsShell  # noqa: E402

HEAD = dict(head_width=32, head_heads=2, head_depth=1)


@pytest.fixture(scope='module')
def tokenizer():
    torch.manual_seed(0)
    tok = unitok.create_model('unitok-tiny')
    tok.init_weights()
    return tok.eval()


def _mllm(tokenizer, seed=0, **kw):
    torch.manual_seed(seed)
    m = UniTokMLLM.build(tokenizer, tiny_llm(), **{**HEAD, **kw})
    with torch.no_grad():                      # a head that is not uniform, so that greedy codes vary
        m.head.weight.normal_(std=0.5)
    return m


@pytest.fixture(scope='module')
def mllm(tokenizer):
    return _mllm(tokenizer)


def _codes(seed=0):
    return torch.randint(0, 512, (8, 4, 4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('cfg_scale', [1.0, 2.5])
def test_cached_image_generation_equals_uncached(mllm, cfg_scale):
    prompts = ['Draw an emoji of a cat.', 'Draw an emoji of the sun and the moon, a tree and a house.']
    a = mllm.generate_image(prompts, temperature=0, cfg_scale=cfg_scale)
    b = mllm.generate_image(prompts, temperature=0, cfg_scale=cfg_scale, use_cache=False)
    assert a.shape == (2, 8, 4, 4) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert len(a.unique()) > 4                  # not a constant grid
    s1 = mllm.generate_image(prompts, temperature=1.0, top_k=50, generator=3, cfg_scale=cfg_scale)
    s2 = mllm.generate_image(prompts, temperature=1.0, top_k=50, generator=3, cfg_scale=cfg_scale, use_cache=False)
    assert torch.equal(s1, s2)


def test_guidance_changes_the_codes(mllm):
    a = mllm.generate_image('Draw an emoji of a cat.', temperature=0, cfg_scale=1.0)
    b = mllm.generate_image('Draw an emoji of a cat.', temperature=0, cfg_scale=4.0)
    assert not torch.equal(a, b)


def test_cached_text_generation_equals_uncached(mllm, monkeypatch):
    monkeypatch.setattr(mllm, '_stop', set())
    example = mllm.understanding_example(_codes(), 'What is this emoji?')
    monkeypatch.setattr(mllm, '_end_of_turn', -1)           # never stop: compare all 12 tokens
    a = generate_text(mllm, example, max_new_tokens=12)
    b = generate_text(mllm, example, max_new_tokens=12, use_cache=False)
    assert len(a) == 12 and a == b
    pieces = []
    generate_text(mllm, example, max_new_tokens=12, stream=pieces.append)
    assert ''.join(pieces) == mllm.text_tokenizer.decode(a, skip_special_tokens=True)
    # the image is read: other codes, other next-token logits
    with torch.no_grad():
        first = [mllm.text_logits(mllm.hidden_states(mllm.embed(e['input_ids'][None], e['image_mask'][None],
                                                                e['codes'][None]))[:, -1])
                 for e in (example, mllm.understanding_example(_codes(1), 'What is this emoji?'))]
    assert (first[0] - first[1]).abs().max() > 1e-4


def test_projector_sees_the_same_inputs_in_training_and_inference(mllm):
    seen = []
    hook = mllm.projector.register_forward_hook(lambda mod, args, out: seen.append((args[0].clone(), out.clone())))
    try:
        codes = mllm.generate_image('Draw an emoji of a cat.', temperature=0)     # 15 fed-back positions
        inference = torch.cat([x for x, _ in seen]), torch.cat([y for _, y in seen])
        seen.clear()
        batch = collate([mllm.generation_example(codes[0], 'Draw an emoji of a cat.')])
        with torch.no_grad():
            mllm(batch)
        training = seen[0]
    finally:
        hook.remove()
    L = mllm.config.num_positions
    assert inference[0].shape[0] == L - 1 and training[0].shape[0] == L
    torch.testing.assert_close(training[0][:L - 1], inference[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(training[1][:L - 1], inference[1], rtol=0, atol=1e-6)


def test_teacher_forced_logits_match_the_sampled_steps(mllm):
    """The image loss is computed on what sampling sees: the forward's next-position logits are those
    of the cached step-by-step path (greedy codes are the argmax of the teacher-forced logits)."""
    codes = mllm.generate_image('Draw an emoji of a cat.', temperature=0)
    ex = mllm.generation_example(codes[0], 'Draw an emoji of a cat.')
    batch = collate([ex])
    with torch.no_grad():
        x = mllm.embed(batch['input_ids'], batch['image_mask'], batch['codes'])
        h = mllm.hidden_states(x, batch['attention_mask'])
        sel = batch['image_targets'][:, :-1]
        logits = mllm.head(h[:, :-1][sel], batch['codes'][:, 1:][sel])            # (L, K, V)
    assert torch.equal(logits.argmax(-1), codes[0].flatten(1).t())


def test_mixed_batch_loss_is_weighted_by_token_counts(mllm):
    u = mllm.understanding_example(_codes(), 'What is this emoji?', 'a grinning face')
    g = mllm.generation_example(_codes(1), 'Draw an emoji of a cat.')
    with torch.no_grad():
        lu, mu = mllm(collate([u]))
        lg, mg = mllm(collate([g]))
        lm, mm = mllm(collate([u, g]))
    nt = int((u['labels'] != -100).sum())
    ni = mllm.config.num_positions
    assert nt == len(mllm.text_tokenizer('a grinning face', add_special_tokens=False)['input_ids']) + 1
    assert float(lm) == pytest.approx((float(lu) * nt + float(lg) * ni) / (nt + ni), rel=1e-5)
    assert float(mm['text_loss']) == pytest.approx(float(lu), rel=1e-5)
    assert float(mm['image_loss']) == pytest.approx(float(lg), rel=1e-5)


def test_training_gradients_reach_only_the_trainable_parts(tokenizer):
    m = _mllm(tokenizer)
    m.freeze_llm()
    batch = collate([m.understanding_example(_codes(), 'What is this emoji?', 'a cat'),
                     m.generation_example(_codes(1), 'Draw an emoji of a cat.')])
    loss, _ = m(batch)
    loss.backward()
    for part in (m.projector, m.special_embed, m.head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters() if p.dim() > 1)
    assert all(p.grad is None for p in m.llm.parameters())


def test_special_tokens_and_weights_round_trip_through_save_and_load(mllm, tokenizer, tmp_path):
    from safetensors.torch import load_file
    mllm.save_pretrained(str(tmp_path / 'm'))
    saved = load_file(str(tmp_path / 'm' / 'mllm.safetensors'))
    assert not any(k.startswith('llm.') for k in saved)          # the LLM is referenced, not copied
    again = UniTokMLLM.from_pretrained(str(tmp_path / 'm'), llm=tiny_llm(), tokenizer=tokenizer)
    ids = {t: again.text_tokenizer.convert_tokens_to_ids(t) for t in ('<boi>', '<eoi>')}
    assert ids == mllm.config.image_token_ids == again.config.image_token_ids
    assert again.text_tokenizer('<boi><eoi>', add_special_tokens=False)['input_ids'] == list(ids.values())
    for k, v in mllm.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    prompt = 'Draw an emoji of a cat.'
    assert torch.equal(again.generate_image(prompt, temperature=0), mllm.generate_image(prompt, temperature=0))
    # a tokenizer in which the image tokens get other ids is refused
    llm, tok = tiny_llm()
    tok.add_tokens(['<extra>'], special_tokens=True)
    with pytest.raises(LLMError, match='tokenizer'):
        UniTokMLLM.from_pretrained(str(tmp_path / 'm'), llm=(llm, tok))
    # another LLM (other config) is refused
    with pytest.raises(LLMError, match='not the one'):
        UniTokMLLM.from_pretrained(str(tmp_path / 'm'), llm=tiny_llm(hidden=64))


def test_an_llm_with_the_same_config_and_other_weights_is_refused_or_warned_about(mllm, tokenizer, tmp_path, caplog):
    mllm.save_pretrained(str(tmp_path / 'm'))
    assert len(mllm.config.llm_ref['weights_sha256']) == 64
    with pytest.raises(LLMError, match=r"is not the one this MLLM was trained with: the LLM weights differ \(same "
                                       r'config and vocabulary, other values\); .* or --ignore-mismatch'):
        UniTokMLLM.from_pretrained(str(tmp_path / 'm'), llm=tiny_llm(seed=1))
    again = UniTokMLLM.from_pretrained(str(tmp_path / 'm'), llm=tiny_llm(seed=1), ignore_mismatch=True)
    assert 'the LLM weights differ' in caplog.text and 'used anyway (--ignore-mismatch)' in caplog.text
    assert again.config.llm_ref == mllm.config.llm_ref
    llm, tok = tiny_llm()
    assert UniTokMLLM.from_pretrained(str(tmp_path / 'm'), llm=(llm.to(torch.bfloat16), tok)) is not None  # dtype: same


def test_lora_adapters_are_saved_and_restored(tokenizer, tmp_path):
    m = _mllm(tokenizer, lora_rank=4)
    m.freeze_llm()
    with torch.no_grad():
        for n, p in m.llm.named_parameters():
            if 'lora_B' in n:
                p.normal_(std=0.1)
    keys = [k for k in m.state_dict() if k.startswith('llm.')]
    assert keys and all('lora_' in k for k in keys)
    assert sum(p.numel() for p in m.llm.parameters() if p.requires_grad) == sum(m.state_dict()[k].numel() for k in keys)
    m.save_pretrained(str(tmp_path / 'm'))
    again = UniTokMLLM.from_pretrained(str(tmp_path / 'm'), llm=tiny_llm(), tokenizer=tokenizer)
    prompt = 'Draw an emoji of a cat.'
    assert torch.equal(again.generate_image(prompt, temperature=0), m.generate_image(prompt, temperature=0))


def test_bad_inputs_get_one_clear_error(mllm, tokenizer):
    mllm.set_image_tokenizer(tokenizer)
    with pytest.raises(ValueError, match="context of 256"):
        mllm.generate_image('Draw an emoji of ' + 'a cat, ' * 200)
    with pytest.raises(ValueError, match="context of 256"):
        mllm.chat(_codes(), 'What is ' + 'this, ' * 200)
    with pytest.raises(ValueError, match='reads 64x64 images'):
        mllm.chat(torch.zeros(1, 3, 32, 32), 'What is this emoji?')
    with pytest.raises(ValueError, match=r'codes must have shape \(8, 4, 4\)'):
        mllm.chat(torch.zeros(8, 2, 2, dtype=torch.long), 'What is this emoji?')
    other = unitok.create_model('unitok-tiny', num_codebooks=4)
    with pytest.raises(CheckpointError, match='num_codebooks 8 in this MLLM, 4 in the tokenizer'):
        mllm.set_image_tokenizer(other)
    with pytest.raises(ValueError, match='max_new_tokens'):
        mllm.chat(_codes(), 'What is this emoji?', max_new_tokens=0)


@pytest.mark.parametrize('kwargs,error,match', [
    ({'top_p': 0}, ValueError, r'top_p must be in \(0, 1\]'),
    ({'top_p': 2}, ValueError, r'top_p must be in \(0, 1\]'),
    ({'top_k': -4}, ValueError, 'top_k must be >= 0'),
    ({'temperature': float('nan')}, ValueError, 'temperature must be finite'),
    ({'top_k': 2.5}, TypeError, 'top_k values must be ints'),
    ({'temperature': 'hot'}, TypeError, 'temperature values must be floats'),
])
def test_chat_and_drawing_check_the_sampling_arguments_as_generate_does(mllm, kwargs, error, match):
    with pytest.raises(error, match=match):
        mllm.chat(_codes(), 'What is this emoji?', **kwargs)
    with pytest.raises(error, match=match):
        mllm.generate_image('Draw an emoji of a cat.', **kwargs)


@pytest.mark.parametrize('prompt', [None, 5, [], ['a cat', 3]])
def test_questions_and_prompts_of_the_wrong_type_name_the_argument(mllm, prompt):
    with pytest.raises(TypeError, match='prompt must be a string or a list of strings'):
        mllm.generate_image(prompt)
    with pytest.raises(TypeError, match='question must be a string, got NoneType'):
        mllm.chat(_codes(), None)


def test_chat_reads_an_image_file(mllm, tokenizer, tmp_path):
    from PIL import Image
    mllm.set_image_tokenizer(tokenizer)
    Image.new('RGB', (100, 80), (200, 30, 30)).save(tmp_path / 'x.png')
    answer = mllm.chat(str(tmp_path / 'x.png'), 'What is this emoji?', max_new_tokens=4)
    codes = mllm.encode_image(str(tmp_path / 'x.png'))
    assert answer == mllm.chat(codes, 'What is this emoji?', max_new_tokens=4)
    assert codes.shape == (8, 4, 4)


def test_cached_and_uncached_paths_give_the_head_the_same_llm_states(mllm):
    """Stronger than equal argmaxes: the LLM state handed to the depth head at every image position
    is the same number with and without the KV cache (positions, masks and padding agree)."""
    seen = []
    hook = mllm.head.in_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    prompts = ['Draw an emoji of a cat.', 'Draw an emoji of the sun and the moon, a tree and a house.']
    try:
        mllm.generate_image(prompts, temperature=0, cfg_scale=2.0)
        cached = torch.stack(seen)
        seen.clear()
        mllm.generate_image(prompts, temperature=0, cfg_scale=2.0, use_cache=False)
        K = mllm.config.num_codebooks
        uncached = torch.stack(seen[::K])                  # the uncached head recomputes K steps per position
    finally:
        hook.remove()
    assert cached.shape == (mllm.config.num_positions, 4, mllm.config.llm_dim)
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-5)


def test_an_llm_folder_with_a_pickled_pytorch_model_bin_is_the_one_line_refusal(tmp_path):
    from unitok.mllm.llm import load_llm
    marker = tmp_path / 'pwned'
    llm, tok = tiny_llm()
    llm.save_pretrained(str(tmp_path / 'llm'))
    tok.save_pretrained(str(tmp_path / 'llm'))
    os.remove(tmp_path / 'llm' / 'model.safetensors')
    torch.save({**llm.state_dict(), 'payload': RunsShell(marker)}, tmp_path / 'llm' / 'pytorch_model.bin')
    with pytest.raises(LLMError, match=r"refused to load '.*pytorch_model.bin': the file is unsafe: unpickling it "
                                       r'would import and call os.system.*Nothing from the file was executed'):
        load_llm(str(tmp_path / 'llm'))
    assert not marker.exists()


def test_an_mllm_json_whose_llm_width_differs_is_one_line(mllm, tokenizer, tmp_path):
    import json
    mllm.save_pretrained(str(tmp_path / 'm'))
    config = json.loads((tmp_path / 'm' / 'mllm.json').read_text())
    (tmp_path / 'm' / 'mllm.json').write_text(json.dumps({**config, 'llm_dim': 64}))
    with pytest.raises(LLMError, match=r'the saved MLLM says llm_dim 64, the LLM has width 32'):
        UniTokMLLM.from_pretrained(str(tmp_path / 'm'), llm=tiny_llm(), tokenizer=tokenizer)


@pytest.mark.parametrize('use_cache', [True, False])
def test_image_generation_callback_reports_each_position(mllm, use_cache):
    kw = dict(temperature=1.0, top_k=50, generator=4, cfg_scale=2.0, use_cache=use_cache)
    seen = []
    codes = mllm.generate_image('Draw an emoji of a cat.', n=2, callback=lambda d, p: seen.append((d, p)), **kw)
    assert torch.equal(codes, mllm.generate_image('Draw an emoji of a cat.', n=2, **kw))
    assert [d for d, _ in seen] == list(range(1, mllm.config.num_positions + 1))
    for done, partial in seen:
        flat = partial.flatten(2)
        assert torch.equal(flat[..., :done], codes.flatten(2)[..., :done]) and (flat[..., done:] == -1).all()
