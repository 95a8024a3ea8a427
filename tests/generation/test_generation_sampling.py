"""generate(): cached == uncached, classifier-free guidance, filters, seeding, bad input, decoding."""
import math

import pytest
import torch

from unitok.generation import GeneratorConfig, GeneratorModel, filter_logits, generate, guidance_scales, sample_logits

from test_generation_model import SMALL, randomize, text_cond

GREEDY = dict(temperature=0.0)


pytestmark = pytest.mark.usefixtures('one_thread')


def small64(**overrides) -> GeneratorModel:
    """A random small generator in float64: exact equalities of codes do not hinge on rounding."""
    torch.manual_seed(0)
    return randomize(GeneratorModel(GeneratorConfig(**(SMALL | overrides)))).double().eval()


LABELS = torch.tensor([1, 4, 0])


@pytest.mark.parametrize('overrides', [{}, {'head': 'parallel'}, {'head_depth': 2, 'head_width': 16},
                                       {'prefix_rope': 'zero', 'class_tokens': 2}])
@pytest.mark.parametrize('cfg_scale', [1.0, 3.0])
def test_cached_equals_uncached_greedy(overrides, cfg_scale):
    model = small64(**overrides)
    cached = generate(model, LABELS, cfg_scale=cfg_scale, **GREEDY)
    uncached = generate(model, LABELS, cfg_scale=cfg_scale, use_cache=False, **GREEDY)
    assert cached.shape == (3, 4, 3, 4) and cached.dtype == torch.int64
    assert torch.equal(cached, uncached)
    assert len(torch.unique(cached)) > 8                                        # not a constant grid


def test_cached_equals_uncached_text_with_padding():
    model = small64(cond='text')
    features, mask = text_cond(model.config, batch=3, valid=(6, 2, 1))
    cond = (features.double(), mask)
    cached = generate(model, cond, cfg_scale=2.0, **GREEDY)
    assert torch.equal(cached, generate(model, cond, cfg_scale=2.0, use_cache=False, **GREEDY))
    noisy = features.double().clone()
    noisy[~mask] = 50.0                                                         # padding must not matter
    assert torch.equal(cached, generate(model, (noisy, mask), cfg_scale=2.0, **GREEDY))


def test_cached_equals_uncached_sampled_with_seed():
    model = small64()
    kw = dict(temperature=1.0, top_k=10, top_p=0.9, cfg_scale=1.5)
    a = generate(model, LABELS, generator=7, **kw)
    assert torch.equal(a, generate(model, LABELS, generator=7, use_cache=False, **kw))
    assert torch.equal(a, generate(model, LABELS, generator=torch.Generator().manual_seed(7), **kw))
    assert not torch.equal(a, generate(model, LABELS, generator=8, **kw))


def test_cfg_scale_one_equals_conditional_sampling():
    model = small64()
    plain = generate(model, LABELS, generator=3)
    forced = generate(model, LABELS, generator=3, batch_uncond=True)           # uncond branch run, scale 1
    assert torch.equal(plain, forced)
    assert torch.equal(generate(model, LABELS, cfg_scale=1.0, cfg_schedule='linear', generator=3), plain)
    assert not torch.equal(generate(model, LABELS, cfg_scale=4.0, generator=3), plain)


def test_cfg_mixes_conditional_and_unconditional_logits():
    model = small64()
    s = 2.5
    codes = generate(model, LABELS, cfg_scale=s, **GREEDY)
    # The first sub-code of the first position, from the teacher-forced logits of both branches.
    c = model(codes, LABELS)[:, 0, 0]                                           # (B, V)
    u = model(codes, LABELS, drop=torch.ones(3, dtype=torch.bool))[:, 0, 0]     # the null class
    assert torch.equal(codes[:, 0, 0, 0], (u + s * (c - u)).argmax(-1))
    assert not torch.equal((u + s * (c - u)).argmax(-1), c.argmax(-1))          # guidance changed something
    # Later sub-codes too: sub-code 1 given the sampled sub-code 0.
    seq = codes.flatten(2).transpose(1, 2)[:, 0]                                # (B, K) codes of position 0
    empty = seq.new_zeros(3, 0, 4)                                              # no earlier positions
    hidden_c = model.hidden_states(empty, LABELS)[:, 0]
    hidden_u = model.hidden_states(empty, model.null_condition(3))[:, 0]
    lc, lu = model.head.logits_upto(hidden_c, seq[:, :1])[:, 1], model.head.logits_upto(hidden_u, seq[:, :1])[:, 1]
    assert torch.equal(codes[:, 1, 0, 0], (lu + s * (lc - lu)).argmax(-1))


def test_guidance_schedules():
    assert guidance_scales(3.0, 4) == [3.0] * 4
    assert guidance_scales(3.0, 5, 'linear') == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert guidance_scales(3.0, 5, 'constant', interval=(1, 3)) == [1.0, 3.0, 3.0, 1.0, 1.0]
    assert guidance_scales(3.0, 1, 'linear') == [3.0]
    with pytest.raises(ValueError, match='cfg_schedule'):
        guidance_scales(3.0, 4, 'cosine')
    with pytest.raises(ValueError, match='cfg_interval'):
        guidance_scales(3.0, 4, interval=(3, 1))
    with pytest.raises(ValueError, match='cfg_scale'):
        guidance_scales(float('nan'), 4)


def test_interval_guidance_only_changes_positions_inside():
    model = small64()
    plain = generate(model, LABELS, **GREEDY).flatten(2)
    late = generate(model, LABELS, cfg_scale=4.0, cfg_interval=(6, 12), **GREEDY).flatten(2)
    assert torch.equal(plain[:, :, :6], late[:, :, :6]) and not torch.equal(plain[:, :, 6:], late[:, :, 6:])


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert not torch.isinf(filter_logits(logits)).any()
    shuffled = logits[:, [2, 0, 3, 1]]                                         # filters follow values, not order
    assert torch.isinf(filter_logits(shuffled, top_p=0.6)).tolist() == [[True, False, True, False]]
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits.expand(20000, -1), 1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.015)
    draws = sample_logits(logits.expand(20000, -1), 1.0, top_p=0.6, generator=g)
    assert set(draws.tolist()) == {0, 1}


def test_per_sub_codebook_settings():
    model = small64()
    greedy = generate(model, LABELS, **GREEDY)
    assert torch.equal(generate(model, LABELS, temperature=[0.0] * 4, generator=0), greedy)
    assert torch.equal(generate(model, LABELS, top_k=1, generator=0), greedy)
    assert torch.equal(generate(model, LABELS, top_p=1e-6, generator=0), greedy)
    mixed = generate(model, LABELS, temperature=[0.0, 2.0, 0.0, 2.0], generator=0)
    # Sub-code 0 of the first position is greedy in both; the sampled sub-codebooks differ somewhere.
    assert torch.equal(mixed[:, 0, 0, 0], greedy[:, 0, 0, 0])
    assert not torch.equal(mixed[:, 1::2], greedy[:, 1::2])
    with pytest.raises(ValueError, match='one per sub-codebook'):
        generate(model, LABELS, temperature=[1.0, 1.0])


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(grid=(4, 4)), ValueError, r'generator grid \(3, 4\)'),
    (dict(temperature=-1.0), ValueError, 'temperature'),
    (dict(top_k=-2), ValueError, 'top_k'),
    (dict(top_p=0.0), ValueError, 'top_p'),
    (dict(top_k=2.5), TypeError, 'top_k values must be ints'),
    (dict(cfg_scale=-1.0), ValueError, 'cfg_scale'),
    (dict(generator='seed'), TypeError, 'generator'),
])
def test_bad_sampling_arguments(kwargs, error, match):
    model = small64()
    with pytest.raises(error, match=match):
        generate(model, LABELS, **kwargs)


def test_bad_conditions():
    model = small64()
    with pytest.raises(ValueError, match=r'class labels must lie in \[0, 5\)'):
        generate(model, torch.tensor([0, 5]))                                   # a class that does not exist
    with pytest.raises(TypeError, match='class labels'):
        generate(model, [1, 2])


def test_generate_restores_training_mode_and_decodes(tiny_model):
    torch.manual_seed(0)
    model = GeneratorModel.from_preset('gen-tiny', num_classes=3).train()      # unitok-tiny's code grid
    codes = generate(model, torch.tensor([0, 2]), cfg_scale=2.0, top_k=50, generator=0)
    assert model.training
    assert codes.shape == (2, 8, 4, 4) and codes.dtype == torch.int64 and int(codes.max()) < 512
    images = tiny_model.decode(codes)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_sampling_under_bf16_autocast():
    torch.manual_seed(0)
    model = randomize(GeneratorModel(GeneratorConfig(**SMALL))).eval()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        codes = generate(model, LABELS, cfg_scale=2.0, generator=0)
    assert codes.shape == (3, 4, 3, 4) and int(codes.min()) >= 0 and int(codes.max()) < 32
    assert math.isfinite(float(codes.float().mean()))


def test_returned_codes_are_an_ordinary_tensor():
    model = small64()
    codes = generate(model, LABELS, **GREEDY)
    codes[0, 0, 0, 0] = 3                                                       # no inference-mode tensor
    assert not torch.is_inference(codes)


@pytest.mark.parametrize('use_cache', [True, False])
def test_callback_reports_each_position_without_changing_the_codes(use_cache):
    model = small64()
    kw = dict(temperature=1.0, top_k=10, cfg_scale=1.5, generator=5, use_cache=use_cache)
    seen = []
    codes = generate(model, LABELS, callback=lambda done, partial: seen.append((done, partial)), **kw)
    assert torch.equal(codes, generate(model, LABELS, **kw))                    # same seed, same codes
    h, w = model.config.grid
    assert [d for d, _ in seen] == list(range(1, h * w + 1))
    for done, partial in seen:
        assert partial.shape == codes.shape
        flat, final = partial.flatten(2), codes.flatten(2)                      # (B, K, L), raster order
        assert torch.equal(flat[..., :done], final[..., :done])
        assert (flat[..., done:] == -1).all()
    assert seen[0][1] is not seen[1][1]                                         # copies, not one live buffer
    with pytest.raises(TypeError, match='callback must be callable'):
        generate(model, LABELS, callback=3, **kw)
