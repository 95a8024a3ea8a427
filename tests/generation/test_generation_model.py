"""GeneratorModel: presets, training objective, depth head, conditions, input checks, save/load."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from head_checks import stepped_and_changed
from unitok.checkpoint import CheckpointError
from unitok.generation import (
    GENERATOR_PRESETS, DepthHead, GeneratorConfig, GeneratorConfigError, GeneratorModel, text_condition,
)
from unitok.generation.config import ffn_hidden_dim
from unitok.generation.layers import RMSNorm, apply_rotary, rope_2d

SMALL = dict(num_codebooks=4, codebook_size=32, grid=(3, 4), dim=32, depth=2, num_heads=2, num_classes=5,
             text_dim=24, text_len=6, dropout=0.0, token_dropout=0.0)


pytestmark = pytest.mark.usefixtures('one_thread')


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Random weights everywhere (the default init zeroes the output matrices: every logit equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def small(seed: int = 0, **overrides) -> GeneratorModel:
    torch.manual_seed(seed)
    return randomize(GeneratorModel(GeneratorConfig(**(SMALL | overrides))), seed).eval()


def random_codes(cfg: GeneratorConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.codebook_size, (batch, cfg.num_codebooks, *cfg.grid), generator=g)


def text_cond(cfg: GeneratorConfig, batch: int = 2, valid=(6, 3), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    mask = torch.arange(cfg.text_len)[None] < torch.tensor(valid)[:, None]
    return features, mask


# ---------------------------------------------------------------------- presets
def expected_parameters(c: GeneratorConfig) -> int:
    """Parameter count from the architecture, written out independently of the model code."""
    K, V, D = c.num_codebooks, c.codebook_size, c.dim
    block = lambda d, f: 4 * d * d + 3 * d * f + 2 * d             # qkv + proj, SwiGLU, two norms
    cond = (c.num_classes + 1) * c.class_tokens * D if c.cond == 'class' else c.text_dim * D + D * D + c.text_len * c.text_dim
    backbone = K * V * D + c.depth * block(D, ffn_hidden_dim(D, c.mlp_ratio, c.ffn_multiple_of)) + D
    W = c.head_width or D
    head = (K - 1) * V * W + K * W + c.head_depth * block(W, ffn_hidden_dim(W, c.mlp_ratio, c.ffn_multiple_of)) \
        + W + K * V * W + K * V + (0 if W == D else D * W)
    if c.head == 'parallel':
        head = K * V * D + K * V
    return cond + backbone + head


@pytest.mark.parametrize('name', sorted(GENERATOR_PRESETS))
def test_preset_parameter_counts(name):
    cfg = GENERATOR_PRESETS[name]
    with torch.device('meta'):
        model = GeneratorModel(cfg)
    total = model.parameter_counts()['total']
    assert total == expected_parameters(cfg)
    print(f'{name}: {total / 1e6:.1f}M parameters')
    # Backbone blocks of the LlamaGen sizes: 12 * 7.08M (B) ... 48 * 28.3M (XXL); ffn widths as LlamaGen.
    ffn = {'gen-tiny': 512, 'gen-B': 2048, 'gen-L': 2816, 'gen-XL': 3584, 'gen-XXL': 4096}[name]
    assert cfg.ffn_dim == ffn
    assert model.parameter_counts()['blocks'] == cfg.depth * (4 * cfg.dim ** 2 + 3 * cfg.dim * ffn + 2 * cfg.dim)


def test_preset_sizes_match_llamagen():
    sizes = {n: (c.dim, c.depth, c.num_heads) for n, c in GENERATOR_PRESETS.items() if n != 'gen-tiny'}
    assert sizes == {'gen-B': (768, 12, 12), 'gen-L': (1024, 24, 16), 'gen-XL': (1280, 36, 20),
                     'gen-XXL': (1536, 48, 24)}
    with torch.device('meta'):
        tiny = GeneratorModel.from_preset('gen-tiny')
    assert 1e6 < tiny.parameter_counts()['total'] < 1e7


def test_config_validation_and_json():
    cfg = GeneratorConfig(**SMALL)
    assert GeneratorConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(GeneratorConfigError, match='num_heads'):
        GeneratorConfig(dim=30, num_heads=3)                     # head dim 10: not a multiple of 4
    with pytest.raises(GeneratorConfigError, match="head must be one of"):
        GeneratorConfig(head='tree')
    with pytest.raises(GeneratorConfigError, match='unknown GeneratorConfig field'):
        GeneratorConfig.from_dict({'width': 3})
    with pytest.raises(GeneratorConfigError, match='grid'):
        GeneratorConfig(grid=(0, 4))
    with pytest.raises(GeneratorConfigError, match='unknown generator preset'):
        GeneratorConfig.from_preset('gen-huge')


# ---------------------------------------------------------------------- layers
def test_rope_2d_rotates_rows_and_columns_separately():
    cos, sin = rope_2d(torch.tensor([0, 2]), torch.tensor([3, 0]), head_dim=8, base=100.0)
    # 4 pairs: pairs 0-1 rotate with the row (freqs 1, 0.1), pairs 2-3 with the column.
    want = torch.tensor([[0, 0, 3, 0.3], [2, 0.2, 0, 0]], dtype=torch.float64)
    assert torch.allclose(cos.double(), want.cos(), atol=1e-6) and torch.allclose(sin.double(), want.sin(), atol=1e-6)
    # Pair (x0, x1) turns by +angle: (cos, sin) for the unit vector (1, 0), (-sin, cos) for (0, 1).
    unit = torch.zeros(1, 1, 2, 8)
    unit[..., 0], unit[..., 3] = 1.0, 1.0
    turned = apply_rotary(unit, cos, sin)[0, 0, 1]                              # token at row 2: angle 2
    assert torch.allclose(turned[:4], torch.tensor([math.cos(2), math.sin(2), -math.sin(0.2), math.cos(0.2)]),
                          atol=1e-6)
    x = torch.randn(1, 1, 2, 8)
    y = apply_rotary(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)            # rotations keep the norm
    # Relative positions: <R(p) q, R(p) k> does not depend on p.
    q, k = torch.randn(8), torch.randn(8)
    def dot(r, c):
        cs = rope_2d(torch.tensor([r]), torch.tensor([c]), 8)
        return (apply_rotary(q.view(1, 1, 1, 8), *cs) * apply_rotary(k.view(1, 1, 1, 8), *cs)).sum()
    assert torch.allclose(dot(0, 0), dot(5, 7), atol=1e-5)


@pytest.mark.parametrize('mode, cos_value', [('identity', 1.0), ('zero', 0.0)])
def test_prefix_rope_tables(mode, cos_value):
    model = small(prefix_rope=mode, class_tokens=2)
    cos, sin = model.rope_tables(5)                                             # 2 prefix tokens + 5 codes
    assert cos.shape == (7, 8) and torch.all(cos[:2] == cos_value) and torch.all(sin[:2] == 0)
    want = rope_2d(torch.tensor([0, 0, 0, 0, 1]), torch.tensor([0, 1, 2, 3, 0]), 16)   # grid (3, 4), raster
    assert torch.allclose(cos[2:], want[0]) and torch.allclose(sin[2:], want[1])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_rms_norm_values(dtype):
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8).to(dtype)
    xf = x.float()
    want = xf / (xf.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * torch.arange(1.0, 9.0)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6                             # bf16: normalised in fp32, stored bf16
    assert torch.allclose(norm(x).float(), want, rtol=tol, atol=tol)


# ---------------------------------------------------------------------- training objective
def test_loss_at_init_is_log_codebook_size():
    torch.manual_seed(0)
    model = GeneratorModel(GeneratorConfig(**SMALL))                            # zero output matrices
    codes = random_codes(model.config)
    loss, metrics = model.loss(codes, torch.tensor([0, 4]))
    assert torch.allclose(loss, torch.tensor(math.log(32.0)), atol=1e-5)
    assert sorted(metrics) == sorted(['loss', 'accuracy'] + [f'nll_{k}' for k in range(4)])
    assert all(not v.requires_grad for v in metrics.values())


def test_loss_is_cross_entropy_over_all_sub_codes():
    model = small()
    codes, labels = random_codes(model.config), torch.tensor([1, 3])
    loss, metrics = model.loss(codes, labels)
    logits = model(codes, labels)                                               # (B, L, K, V)
    seq = codes.flatten(2).transpose(1, 2)                                      # (B, L, K)
    per_k = [F.cross_entropy(logits[:, :, k].reshape(-1, 32), seq[:, :, k].reshape(-1)) for k in range(4)]
    assert torch.allclose(loss, torch.stack(per_k).mean(), atol=1e-5)
    for k in range(4):
        assert torch.allclose(metrics[f'nll_{k}'], per_k[k], atol=1e-5)
    assert torch.allclose(metrics['accuracy'], (logits.argmax(-1) == seq).float().mean())


def test_backward_reaches_every_parameter():
    model = small(cond_dropout=0.5).train()
    torch.manual_seed(3)                                                        # some labels dropped, some kept
    loss, _ = model.loss(random_codes(model.config, batch=8), torch.arange(8) % 5)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bf16_autocast_training_step():
    model = small()
    codes, labels = random_codes(model.config), torch.tensor([1, 3])
    ref, _ = model.loss(codes, labels)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, metrics = model.loss(codes, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()
    loss.backward()


def test_backbone_is_causal_over_positions():
    model = small()
    codes, labels = random_codes(model.config), torch.tensor([1, 3])
    changed = codes.clone()
    changed[:, :, 1, 1] = (changed[:, :, 1, 1] + 1) % 32                       # position i = 1*4 + 1 = 5
    a, b = model(codes, labels), model(changed, labels)
    assert torch.equal(a[:, :5], b[:, :5])                                      # earlier positions unaffected
    assert torch.equal(a[:, 5, 0], b[:, 5, 0])                                  # sub-code 0 of position 5 too
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_depth_head_teacher_forced_equals_step_by_step():
    model = small()
    head: DepthHead = model.head
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 32, generator=g)
    codes = torch.randint(0, 32, (5, 4), generator=g)
    forced, stepped, changed = stepped_and_changed(head, h, codes, 32)         # (N, K, V) each
    assert torch.allclose(forced, stepped, atol=1e-5)
    # Step k depends on sub-codes < k only.
    assert torch.equal(changed[:, :2], forced[:, :2]) and not torch.allclose(changed[:, 2:], forced[:, 2:])


def test_depth_head_with_its_own_width():
    model = small(head_width=16, head_num_heads=2, head_depth=2)
    assert isinstance(model.head.in_proj, torch.nn.Linear)
    loss, _ = model.loss(random_codes(model.config), torch.tensor([1, 3]))
    assert torch.isfinite(loss)


def test_parallel_head_sub_codes_independent():
    model = small(head='parallel')
    codes, labels = random_codes(model.config), torch.tensor([1, 3])
    other = codes.clone()
    other[:, 0, -1, -1] = (other[:, 0, -1, -1] + 1) % 32                       # sub-code 0 of the last position
    assert torch.equal(model(codes, labels), model(other, labels))              # nothing reads the last codes
    other = codes.clone()
    other[:, 0, 0, 0] = (other[:, 0, 0, 0] + 1) % 32
    a, b = model(codes, labels), model(other, labels)
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.allclose(a[:, 1:], b[:, 1:])


# ---------------------------------------------------------------------- conditions
def test_condition_dropout_uses_the_null_class():
    model = small()
    codes = random_codes(model.config)
    dropped = model(codes, torch.tensor([1, 3]), drop=torch.tensor([True, False]))
    null = model.forward(codes, torch.tensor([1, 3]), drop=torch.tensor([True, True]))
    kept = model(codes, torch.tensor([1, 3]))
    assert torch.equal(dropped[0], null[0]) and torch.equal(dropped[1], kept[1])
    prefix, _ = model.condition_prefix(torch.tensor([1, 3]), torch.tensor([True, False]))
    table = model.cond_embed.table.weight
    assert torch.equal(prefix[:, 0], torch.stack([table[5], table[3]]))        # row num_classes = null class
    assert not torch.allclose(dropped[0], kept[0])


def test_text_prefix_padding_is_ignored():
    model = small(cond='text')
    codes = random_codes(model.config)
    features, mask = text_cond(model.config)
    a = model(codes, (features, mask))
    noisy = features.clone()
    noisy[~mask] = 100.0                                                        # change only padded positions
    b = model(codes, (noisy, mask))
    assert torch.allclose(a, b, atol=1e-5)
    c = model(codes, (noisy, None))                                             # no mask: padding is read
    assert not torch.allclose(a, c, atol=1e-3)


def test_text_condition_from_unitok_text_tower(tiny_model):
    features, mask = text_condition(tiny_model, ['a cat', 'a red car on a road'])
    assert features.shape == (2, 32, 128) and features.dtype == torch.float32
    assert mask.sum(1).tolist() == [4, 8]                                       # SOT + words + EOT
    ids = tiny_model.tokenize(['a cat'])
    assert int(ids[0, 3]) == int(ids.max()) and int(ids[0, 4]) == 0             # EOT at 3, padding after
    pooled = tiny_model.encode_text(['a cat'], normalize=False)
    assert torch.allclose(features[0, 3] @ tiny_model.text_encoder.text_projection, pooled[0], atol=1e-5)
    model = GeneratorModel.from_preset('gen-tiny', cond='text')
    loss, _ = model.loss(random_codes(model.config), (features, mask))
    assert torch.isfinite(loss)


def test_init_code_embeddings_from_code_vectors(tiny_model):
    model = GeneratorModel.from_preset('gen-tiny')
    vectors = tiny_model.quantizer.normalized_codebooks()                       # (8, 512, 4)
    vectors[2, 7] = vectors[2, 9]
    model.init_code_embeddings(vectors)
    table = model.code_embed.weight.view(8, 512, -1)
    assert torch.equal(table[2, 7], table[2, 9]) and not torch.equal(table[2, 7], table[2, 8])
    assert abs(table.std().item() - 0.02) < 1e-4
    # A linear image of the d = 4 dim code vectors: each sub-codebook table has rank 4.
    assert int(torch.linalg.matrix_rank(table[2].detach().double(), rtol=1e-5)) == 4
    with pytest.raises(ValueError, match=r'\(8, 512, d\)'):
        model.init_code_embeddings(vectors[:4])


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize('codes, error, match', [
    (torch.zeros(2, 8, 3, 4, dtype=torch.long), ValueError, 'sub-codebooks'),   # another tokenizer's K
    (torch.full((2, 4, 3, 4), 32), ValueError, r'lie in \[0, 32\)'),
    (torch.full((2, 4, 3, 4), -1), ValueError, r'lie in \[0, 32\)'),
    (torch.zeros(2, 4, 4, 4, dtype=torch.long), ValueError, 'grid 4x4'),
    (torch.zeros(2, 4, 12, dtype=torch.long), ValueError, r'\(B, 4, 3, 4\)'),
    (torch.zeros(2, 4, 3, 4), TypeError, 'integer'),
])
def test_bad_codes(codes, error, match):
    model = small()
    with pytest.raises(error, match=match):
        model.loss(codes, torch.tensor([0, 1]))


@pytest.mark.parametrize('cond, error, match', [
    (torch.tensor([0, 5]), ValueError, r'class labels must lie in \[0, 5\)'),
    (torch.tensor([0, -1]), ValueError, r'class labels must lie in \[0, 5\)'),
    (torch.tensor([0.0, 1.0]), TypeError, 'int64 class labels'),
    (torch.tensor([0, 1, 2]), ValueError, 'condition holds 3'),
])
def test_bad_class_condition(cond, error, match):
    model = small()
    with pytest.raises(error, match=match):
        model.loss(random_codes(model.config), cond)


def test_bad_text_condition():
    model = small(cond='text')
    codes = random_codes(model.config)
    features, mask = text_cond(model.config)
    with pytest.raises(ValueError, match=r'text features must be float \(B, 6, 24\)'):
        model.loss(codes, (features[:, :5], mask[:, :5]))
    with pytest.raises(ValueError, match='True for the first tokens'):
        model.loss(codes, (features, torch.zeros_like(mask)))
    with pytest.raises(TypeError, match='text-conditional generator takes'):
        model.loss(codes, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='NaN'):
        model.loss(codes, (features * float('nan'), mask))


# ---------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    model = small(cond='text')
    model.save_pretrained(str(tmp_path / 'gen'))
    assert sorted(os.listdir(tmp_path / 'gen')) == ['config.json', 'model.safetensors']
    loaded = GeneratorModel.from_pretrained(str(tmp_path / 'gen'))
    assert loaded.config == model.config and not loaded.training
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    codes, cond = random_codes(model.config), text_cond(model.config)
    assert torch.equal(model(codes, cond), loaded(codes, cond))


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match='no generator model directory'):
        GeneratorModel.from_pretrained(str(tmp_path / 'nothing'))
    small().save_pretrained(str(tmp_path / 'gen'))
    weights = tmp_path / 'gen' / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='cannot read'):
        GeneratorModel.from_pretrained(str(tmp_path / 'gen'))
    weights.write_bytes(data)
    cfg = json.loads((tmp_path / 'gen' / 'config.json').read_text())
    (tmp_path / 'gen' / 'config.json').write_text(json.dumps(cfg | {'depth': 3}))
    with pytest.raises(CheckpointError, match=r'missing key\(s\): blocks\.2'):
        GeneratorModel.from_pretrained(str(tmp_path / 'gen'))
    (tmp_path / 'gen' / 'config.json').write_text(json.dumps(cfg | {'codebook_size': 64}))
    with pytest.raises(CheckpointError, match='shape mismatch for'):
        GeneratorModel.from_pretrained(str(tmp_path / 'gen'))
    (tmp_path / 'gen' / 'config.json').write_text('{not json')
    with pytest.raises(CheckpointError, match='invalid .*config.json'):
        GeneratorModel.from_pretrained(str(tmp_path / 'gen'))
    os.remove(weights)
    with pytest.raises(CheckpointError, match='missing .*model.safetensors'):
        GeneratorModel.from_pretrained(str(tmp_path / 'gen'))
