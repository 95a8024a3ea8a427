import json
import os

import pytest

from unitok import PRESETS, ConfigError, UniTokConfig

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'golden')


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_presets_are_valid_and_round_trip_json(name, tmp_path):
    cfg = UniTokConfig.from_preset(name)
    path = tmp_path / 'c.json'
    cfg.to_json(str(path))
    assert UniTokConfig.from_json(str(path)) == cfg
    assert UniTokConfig.from_json(cfg.to_json()) == cfg


def test_released_preset_matches_paper():
    cfg = PRESETS['unitok-large']
    assert (cfg.encoder, cfg.image_size, cfg.num_codebooks, cfg.codebook_size, cfg.code_dim) == \
        ('vitamin_large', 256, 8, 4096, 8)
    assert (cfg.projection, cfg.num_query, cfg.text_width, cfg.text_heads, cfg.text_layers, cfg.embed_dim) == \
        ('attn', 0, 768, 12, 12, 768)
    assert cfg.vocab_size == 32768 and cfg.latent_dim == 64 and cfg.grid_size == 16


@pytest.mark.parametrize('name,expected', [
    ('base128', dict(encoder='vitamin_base', image_size=128, num_codebooks=4, codebook_size=8192, code_dim=16)),
    ('large', dict(encoder='vitamin_large', image_size=256, num_codebooks=8, codebook_size=4096, code_dim=8)),
])
def test_official_args_converter(name, expected):
    with open(os.path.join(FIXTURES, name, 'official_args.json')) as f:
        args = json.load(f)
    cfg = UniTokConfig.from_official_args(args)
    for k, v in expected.items():
        assert getattr(cfg, k) == v
    back = cfg.to_official_args()
    for k in ('model', 'img_size', 'vocab_size', 'vocab_width', 'num_codebooks', 'quant_proj', 'embed_dim'):
        assert back[k] == args[k]


@pytest.mark.parametrize('overrides,message', [
    (dict(image_size=100), 'multiple of 16'),
    (dict(encoder='vitamin_huge'), 'unknown encoder'),
    (dict(projection='conv'), 'projection must be'),
    (dict(num_codebooks=0), 'positive integer'),
    (dict(code_dim=48, num_codebooks=3), 'divide one another'),
    (dict(decoder_conv_depths=(0, 2)), 'decoder_conv_depths'),
    (dict(text_width=100, text_heads=3), 'divisible by text_heads'),
])
def test_invalid_values_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        UniTokConfig.from_preset('unitok-large', **overrides)


def test_unknown_fields_are_named():
    with pytest.raises(ConfigError, match='codebok_size'):
        UniTokConfig.from_dict({'codebok_size': 3})
    with pytest.raises(ConfigError, match='unknown preset'):
        UniTokConfig.from_preset('unitok-huge')


def test_official_args_with_indivisible_vocab():
    with pytest.raises(ConfigError, match='divisible by num_codebooks'):
        UniTokConfig.from_official_args({'vocab_size': 1000, 'num_codebooks': 3})


def test_patch_size_8_halves_the_token_side_and_travels_only_when_not_16():
    cfg = UniTokConfig.from_preset('unitok-tiny-p8')
    assert (cfg.image_size, cfg.patch_size, cfg.grid_size) == (64, 8, 8)
    assert UniTokConfig.from_preset('unitok-tiny').grid_size == 4
    assert cfg.to_dict()['patch_size'] == 8 and 'patch_size' not in PRESETS['unitok-tiny'].to_dict()
    assert cfg.to_official_args()['unitok_patch_size'] == 8
    assert UniTokConfig.from_official_args(cfg.to_official_args()) == cfg
    assert 'unitok_patch_size' not in PRESETS['unitok-tiny'].to_official_args()
    with pytest.raises(ConfigError, match='patch_size must be one of'):
        UniTokConfig.from_preset('unitok-tiny', patch_size=4)
