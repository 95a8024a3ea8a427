"""The released UniTok MLLM (unitok.mllm.official) against the golden fixtures of the official code
(tests/fixtures/golden_mllm), as loaded from the official layout and after a save/load round trip."""
import logging
import shutil

import numpy as np
import pytest
import torch

from unitok.mllm import OfficialMLLM, UniTokMLLM
from unitok.mllm.official import codebook_digest, expand2square

from official_golden import build_checkpoint, golden

pytestmark = pytest.mark.usefixtures('one_thread')
META, ARR = golden()
CODES = torch.from_numpy(ARR['image_codes']).view(8, 16, 16)


@pytest.fixture(scope='module')
def official_dir(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp('unitok_mllm')))


@pytest.fixture(scope='module')
def loaded(official_dir):
    return UniTokMLLM.from_pretrained(official_dir, dtype=torch.float32)


@pytest.fixture(scope='module')
def roundtrip(loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp('saved') / 'mllm'
    loaded.save_pretrained(str(out), max_shard_size='20MB')
    return UniTokMLLM.from_pretrained(str(out), dtype=torch.float32)


@pytest.fixture(params=['loaded', 'roundtrip'])
def mllm(request):
    return request.getfixturevalue(request.param)


def _left_pad(rows):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_loads_as_the_library_class_in_the_asked_dtype(official_dir):
    m = UniTokMLLM.from_pretrained(official_dir)                     # bf16 by default
    assert isinstance(m, OfficialMLLM) and isinstance(m, UniTokMLLM)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.config.num_codebooks == 8 and m.config.codebook_size == 4096 and m.config.grid == (16, 16)
    assert m.embedder.projection.attn.causal and len(m.head.layers) == 3 and len(m.head.codebooks) == 7
    assert m.embedder.projector.norm.eps == 1e-6 and m.embedder.projection.norm1.eps == 1e-5


def test_understanding_logits(mllm):
    ex = mllm.understanding_example(CODES, META['question'])
    with torch.inference_mode():
        x = mllm.embed(ex['input_ids'][None], ex['image_mask'][None], ex['codes'][None])
        logits = mllm.text_logits(mllm.hidden_states(x, torch.ones_like(ex['input_ids'][None])))[0]
    got = logits[META['understanding']['positions']].numpy()
    np.testing.assert_allclose(got, ARR['understanding_logits'], atol=1e-4, rtol=0)


def test_teacher_forced_head_logits(mllm):
    logits = mllm.code_logits(META['prompts'][0], CODES)
    assert logits.shape == (256, 8, 4096)
    np.testing.assert_allclose(logits[:4].numpy(), ARR['head_logits'], atol=1e-4, rtol=0)


def test_guided_logits_at_scale_7(mllm):
    """The 8 sub-codes of the first two positions, cond/uncond guided as u + 7 (c - u), the official codes fed."""
    rows = [mllm.generation_prompt(p) for p in META['prompts']] + [mllm.generation_prompt(None)] * 2
    ids, mask = _left_pad(rows)
    codes = torch.from_numpy(ARR['cfg7_codes']).transpose(1, 2)             # (2, 16, 8)
    both = torch.cat([codes, codes])
    with torch.inference_mode():
        for pos in range(2):
            image = torch.zeros(4, ids.shape[1] + pos, dtype=torch.bool)
            image[:, ids.shape[1]:] = True
            grid = torch.zeros(4, image.shape[1], 8, dtype=torch.long)
            grid[:, ids.shape[1]:] = both[:, :pos]
            full_mask = torch.cat([mask, torch.ones(4, pos, dtype=torch.long)], 1)
            x = mllm.embed(torch.cat([ids, torch.zeros(4, pos, dtype=torch.long)], 1), image, grid, generated=True)
            h = mllm.hidden_states(x, full_mask, (full_mask.cumsum(-1) - 1).clamp_min(0))[:, -1]
            for k in range(8):
                c, u = mllm.head.logits_upto(h, both[:, pos, :k])[:, -1].chunk(2)
                np.testing.assert_allclose((u + 7 * (c - u)).numpy(), ARR['cfg7_logits'][:, pos * 8 + k],
                                           atol=1e-4, rtol=0)


@pytest.mark.parametrize('scale,key,prompts', [(7.0, 'cfg7', META['prompts']), (1.0, 'cfg1', META['prompts'][:1])])
def test_greedy_codes_of_the_cached_path(mllm, monkeypatch, scale, key, prompts):
    monkeypatch.setattr(mllm.config, 'grid', (1, 16))                # the first 16 positions
    codes = mllm.generate_image(prompts, cfg_scale=scale, temperature=0)
    assert np.array_equal(codes.flatten(2).numpy(), ARR[f'{key}_codes'])


def test_prompt_texts_and_ids(mllm):
    f = mllm.prompt_format
    assert f.understanding_text(META['question'], True) == META['understanding']['prompt']
    ids, at = f.understanding_ids(mllm.text_tokenizer, META['question'], True)
    official = META['understanding']['ids']
    assert at == official.index(-200) and ids == official[:at] + official[at + 1:]
    assert [f.generation_text(p) for p in META['prompts']] + [f.generation_text(None)] == META['cfg7']['texts'][:3]
    for row, mask, prompt in zip(META['cfg7']['ids'], META['cfg7']['mask'], META['prompts'] + [None, None]):
        assert mllm.generation_prompt(prompt) == [i for i, k in zip(row, mask) if k]
    assert mllm.generation_prompt('a cat')[-1] == 3                   # '\x00' is the byte token 3, <boi>
    ex = mllm.understanding_example(CODES, META['question'])
    assert ex['image_mask'].sum() == 256 and ex['input_ids'].tolist()[:at] == official[:at]
    assert torch.equal(ex['codes'][at:at + 256], CODES.flatten(1).t())


def test_feedback_modes_cached_equals_uncached_and_they_differ(loaded, monkeypatch):
    monkeypatch.setattr(loaded.config, 'grid', (1, 6))
    out = {}
    for mode in ('position', 'prefix'):
        monkeypatch.setattr(loaded, 'feedback', mode)
        cached = loaded.generate_image('a cat', cfg_scale=7.0, temperature=0)
        assert torch.equal(cached, loaded.generate_image('a cat', cfg_scale=7.0, temperature=0, use_cache=False))
        out[mode] = cached
    assert out['position'][..., 0].equal(out['prefix'][..., 0])       # position 0 is read alone in both
    assert not out['position'].equal(out['prefix'])
    with pytest.raises(ValueError, match='feedback must be one of'):
        OfficialMLLM(loaded.config, loaded.llm, loaded.text_tokenizer, loaded.embedder, loaded.head, feedback='all')


def test_prefix_feedback_is_the_training_input(loaded, monkeypatch):
    """'prefix': position t's input is its row of the whole generated image read at once (as in training)."""
    rows = CODES.flatten(1).t()[None, :5]                              # (1, 5, K)
    whole = loaded.embedder(rows)
    monkeypatch.setattr(loaded, 'feedback', 'prefix')
    assert torch.allclose(loaded.next_image_embeds(rows), whole[:, -1:], atol=1e-6)
    monkeypatch.setattr(loaded, 'feedback', 'position')
    assert torch.allclose(loaded.next_image_embeds(rows), loaded.embedder(rows[:, -1:]), atol=1e-6)
    assert not torch.allclose(loaded.next_image_embeds(rows), whole[:, -1:], atol=1e-3)


def test_round_trip_keeps_every_tensor(loaded, roundtrip, official_dir):
    a, b = loaded.state_dict(), roundtrip.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json
    import os
    with open(os.path.join(official_dir, 'model.safetensors.index.json')) as f:
        official_keys = set(json.load(f)['weight_map'])
    with open(os.path.join(roundtrip.source, 'model.safetensors.index.json')) as f:
        assert set(json.load(f)['weight_map']) == official_keys


class _Tokenizer(torch.nn.Module):
    def __init__(self, codebook):
        super().__init__()
        self.quantizer = torch.nn.Module()
        self.quantizer.codebook = torch.nn.Parameter(codebook)


def test_image_tokenizer_codebooks_are_compared_by_hash(loaded, caplog):
    same = _Tokenizer(loaded.embedder.codebooks.detach().clone().reshape(8 * 4096, 8))
    with caplog.at_level(logging.WARNING, logger='unitok.mllm.official'):
        loaded.set_image_tokenizer(same)
    assert not caplog.records
    other = loaded.embedder.codebooks.detach().clone()
    other[3, 7, 0] += 0.5
    with caplog.at_level(logging.WARNING, logger='unitok.mllm.official'):
        loaded.set_image_tokenizer(_Tokenizer(other))
    assert 'differ from the codebooks inside this MLLM' in caplog.text
    assert codebook_digest(other) in caplog.text or codebook_digest(other)[:12] in caplog.text


def test_expand2square_pads_with_the_official_colour():
    from PIL import Image
    img = Image.new('RGB', (6, 2), (255, 0, 0))
    sq = expand2square(img)
    assert sq.size == (6, 6)
    px = np.asarray(sq)
    assert (px[:2] == (122, 116, 104)).all() and (px[2:4] == (255, 0, 0)).all() and (px[4:] == (122, 116, 104)).all()
    tall = np.asarray(expand2square(Image.new('RGB', (1, 3), (0, 255, 0))))
    assert (tall[:, 1] == (0, 255, 0)).all() and (tall[:, 0] == (122, 116, 104)).all()


def test_hub_id_resolves_from_the_local_cache(official_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    repo = tmp_path / 'hub' / 'models--FoundationVision--unitok_mllm'
    shutil.copytree(official_dir, repo / 'snapshots' / ('a' * 40))
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('a' * 40)
    m = UniTokMLLM.from_pretrained('FoundationVision/unitok_mllm', dtype=torch.float32)
    assert isinstance(m, OfficialMLLM) and m.generation_prompt(None) == META['cfg7']['ids'][2][-6:]


def test_images_are_padded_square_then_resized_as_officially(loaded, tmp_path, monkeypatch):
    from types import SimpleNamespace
    from PIL import Image

    class Reader(torch.nn.Module):           # hands back the pixels the tokenizer would encode
        config, device = SimpleNamespace(image_size=256), torch.device('cpu')

        def encode(self, x):
            return x
    monkeypatch.setitem(loaded.__dict__, '_image_tokenizer', Reader())
    img = Image.new('RGB', (40, 20), (255, 255, 255))
    img.save(tmp_path / 'wide.png')
    x = loaded.encode_image(str(tmp_path / 'wide.png'))
    want = np.asarray(expand2square(img).resize((256, 256), Image.BILINEAR)).astype(np.float32) / 127.5 - 1
    assert x.shape == (3, 256, 256) and np.allclose(x.permute(1, 2, 0).numpy(), want, atol=1e-6)
    assert np.allclose(x[:, 0, 0].numpy(), np.array([122, 116, 104]) / 127.5 - 1, atol=1e-6)
