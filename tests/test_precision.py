"""The bf16 inference fast path: dtypes of each part, code faithfulness (near-tie rule), loading, CLI."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from unitok import UniTok
from unitok.cli import main
from unitok.precision import compare_codes


def _dtypes(model):
    return {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()}


def test_bf16_keeps_quantizer_projections_and_clip_head_fp32(tiny_model):
    fast = copy.deepcopy(tiny_model).to(torch.bfloat16)
    assert fast.dtype == torch.bfloat16 and tiny_model.dtype == torch.float32
    dtypes = _dtypes(fast)
    first = ('encoder.patch_embed.backbone.stem.conv1.weight', 'encoder.patch_embed.backbone.stem.conv1.bias')
    kept = {n: d for n, d in dtypes.items() if n.split('.')[0] in UniTok.FP32_PARTS or n in first}
    cast = {n: d for n, d in dtypes.items() if n not in kept}
    assert 'quantizer.codebook' in kept and 'quant_proj.attn.zero_k_bias' in kept and 'logit_scale' in kept
    assert set(kept.values()) == {torch.float32} and all(n in kept for n in first)
    assert any(n.startswith('decoder.') for n in cast) and any(n.startswith('text_encoder.') for n in cast)
    assert set(cast.values()) == {torch.bfloat16}
    assert fast.bfloat16() is fast and set(_dtypes(copy.deepcopy(fast).float()).values()) == {torch.float32}


def test_bf16_codes_agree_with_fp32_up_to_near_ties(tiny_model, images64):
    torch.manual_seed(1)
    tiny_model.init_weights()
    fast = copy.deepcopy(tiny_model).to(torch.bfloat16)
    x = torch.cat([images64, torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1])
    result = compare_codes(tiny_model, fast, x)
    assert result.decisions == 8 * 8 * 16
    assert result.not_near_ties == 0
    assert result.near_ties == result.decisions - result.equal
    assert result.agreement >= 0.9
    assert 0 < result.max_shift < 0.2
    codes = fast.encode(x)
    assert codes.dtype == torch.int64 and codes.shape == (8, 8, 4, 4)
    rec, rec32 = fast.reconstruct(x), tiny_model.reconstruct(x)
    assert rec.dtype == torch.float32
    psnr = -10 * torch.log10(((rec - rec32) / 2).square().mean())
    assert psnr > 30
    assert fast.encode_image(x).dtype == torch.float32 and fast.encode_text(['a cat']).dtype == torch.float32


def test_compare_codes_flags_a_search_that_is_not_faithful(tiny_model, images64):
    fast = copy.deepcopy(tiny_model).to(torch.bfloat16)
    fast.quantizer.nearest_codes = lambda latents: (tiny_model.quantizer.nearest_codes(latents) + 1) % 512
    result = compare_codes(tiny_model, fast, images64)
    assert result.equal == 0 and result.not_near_ties > 0.9 * result.decisions


def test_from_pretrained_dtype_round_trip(tmp_path, tiny_model, images64):
    tiny_model.save_pretrained(str(tmp_path))
    fast = UniTok.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert fast.dtype == torch.bfloat16 and fast.quantizer.codebook.dtype == torch.float32
    w = tiny_model.decoder.up_conv4.conv2.weight
    assert torch.equal(fast.decoder.up_conv4.conv2.weight, w.bfloat16())
    assert torch.equal(fast.quantizer.codebook, tiny_model.quantizer.codebook)
    assert UniTok.from_pretrained(str(tmp_path), dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match='model dtype'):
        UniTok.from_pretrained(str(tmp_path), dtype=torch.int8)


def test_cli_precision_bf16_writes_the_precision(tmp_path, tiny_model):
    tiny_model.save_pretrained(str(tmp_path / 'model'))
    (tmp_path / 'imgs').mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / 'imgs' / f'im{i}.png')
    m = str(tmp_path / 'model')
    for precision in ('fp32', 'bf16'):
        out = str(tmp_path / f'{precision}.npz')
        assert main(['encode', str(tmp_path / 'imgs'), '--model', m, '--out', out, '--precision', precision]) == 0
        with np.load(out) as z:
            assert str(z['precision']) == precision and z['codes'].shape == (2, 8, 4, 4)
    assert main(['decode', str(tmp_path / 'bf16.npz'), '--model', m, '--out-dir', str(tmp_path / 'dec'),
                 '--precision', 'bf16']) == 0
    assert len(list((tmp_path / 'dec').glob('*.png'))) == 2
    assert main(['reconstruct', str(tmp_path / 'imgs'), '--model', m, '--out-dir', str(tmp_path / 'rec'),
                 '--precision', 'bf16']) == 0


def test_the_first_conv_stays_fp32_and_takes_the_images_unrounded(tmp_path, tiny_model, images64):
    tiny_model.save_pretrained(str(tmp_path))
    fast = UniTok.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    stem, ref_stem = fast.encoder.patch_embed.backbone.stem, tiny_model.encoder.patch_embed.backbone.stem
    for a, b in zip(stem.conv1.parameters(), ref_stem.conv1.parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b)          # the float32 weights, not rounded
    assert {p.dtype for p in stem.conv2.parameters()} == {torch.bfloat16}
    seen = {}
    stem.conv1.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    stem.norm1.register_forward_pre_hook(lambda m, args: seen.update(norm=args[0].dtype))
    codes = fast.encode(images64)
    assert torch.equal(seen['x'], images64) and seen['norm'] == torch.bfloat16       # unrounded in, bf16 out
    with torch.no_grad():
        assert torch.equal(seen['out'], ref_stem.conv1(images64).bfloat16())   # the float32 conv, rounded once
    assert codes.shape == (2, 8, 4, 4) and torch.equal(copy.deepcopy(fast).encode(images64), codes)
    back = copy.deepcopy(fast).to(torch.float32)                        # hooks off, the whole model float32
    assert back._first_conv_hooks == [] and {p.dtype for p in back.parameters()} == {torch.float32}
    assert back.encode(images64).shape == (2, 8, 4, 4)
    fast.to(torch.bfloat16)                                             # a second cast keeps the float32 weights
    assert torch.equal(stem.conv1.weight, ref_stem.conv1.weight) and len(fast._first_conv_hooks) == 2


def test_fp32_encoder_tail_keeps_the_original_weights(tmp_path, tiny_model, images64):
    tiny_model.save_pretrained(str(tmp_path))
    fast = UniTok.from_pretrained(str(tmp_path), dtype=torch.bfloat16, fp32_encoder_tail=1)
    last, first = fast.encoder.blocks[-1], fast.encoder.blocks[0]
    w = tiny_model.encoder.blocks[-1].mlp.w0.weight
    assert w.bfloat16().float().ne(w).any() and torch.equal(last.mlp.w0.weight, w)   # not rounded to bf16
    assert {p.dtype for p in last.parameters()} == {torch.float32} == {p.dtype for p in fast.encoder.norm.parameters()}
    assert {p.dtype for p in first.parameters()} == {torch.bfloat16}
    assert fast.encode(images64).shape == (2, 8, 4, 4)
    fast.to(torch.bfloat16)                                   # a later cast keeps the tail
    assert {p.dtype for p in last.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match='encoder depth'):
        fast.keep_encoder_tail_fp32(3)


def test_fp32_encoder_convs_keep_the_original_weights_and_fp32_inputs(tmp_path, tiny_model, images64):
    tiny_model.save_pretrained(str(tmp_path))
    fast = UniTok.from_pretrained(str(tmp_path), dtype=torch.bfloat16, fp32_encoder_convs=True).eval()
    embed, ref_embed = fast.encoder.patch_embed, tiny_model.encoder.patch_embed
    assert {p.dtype for p in embed.parameters()} == {torch.float32}
    assert {p.dtype for p in fast.encoder.blocks.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(embed.named_parameters(), ref_embed.parameters()):
        assert torch.equal(a, b), name                                  # the float32 weights, not rounded
    seen = {}
    embed.register_forward_pre_hook(lambda m, args: seen.update({'in': args[0].dtype}))    # (returns None)
    embed.register_forward_hook(lambda m, args, out: seen.update({'out': out.dtype}))
    codes = fast.encode(images64)
    assert seen == {'in': torch.float32, 'out': torch.bfloat16}     # float32 stages, bf16 features out
    assert torch.equal(fast._as_model_dtype(images64), images64)     # images are not rounded to bf16 first
    assert codes.shape == (2, 8, 4, 4)
    # The conv stages alone in float32 give their exact float32 features.
    with torch.no_grad():
        assert torch.equal(embed(images64), ref_embed(images64).bfloat16())
    fast.to(torch.bfloat16)                                           # a later cast keeps them float32
    assert {p.dtype for p in embed.parameters()} == {torch.float32}
    fast.keep_encoder_convs_fp32(False).to(torch.bfloat16)            # switched off: cast with the rest
    assert {n: p.dtype for n, p in embed.named_parameters() if p.dtype != torch.bfloat16} == {
        'backbone.stem.conv1.weight': torch.float32, 'backbone.stem.conv1.bias': torch.float32}   # but the first conv
    assert fast.encode(images64).shape == (2, 8, 4, 4)
    with pytest.raises(ValueError, match='bool'):
        fast.keep_encoder_convs_fp32(1)


def test_export_codes_precision_bf16_uses_the_fast_path(tmp_path, tiny_model, monkeypatch):
    import json
    tiny_model.save_pretrained(str(tmp_path / 'model'))
    loaded = []
    original = UniTok.from_pretrained.__func__

    def spy(cls, *a, **k):
        loaded.append(k.get('dtype'))
        return original(cls, *a, **k)
    monkeypatch.setattr(UniTok, 'from_pretrained', classmethod(spy))
    assert main(['export-codes', '--model', str(tmp_path / 'model'), '--data', 'builtin:emoji', '--out',
                 str(tmp_path / 'codes'), '--limit', '4', '--batch-size', '4', '--workers', '0',
                 '--precision', 'bf16', '--device', 'cpu']) == 0
    assert loaded == [torch.bfloat16]
    assert json.loads((tmp_path / 'codes' / 'manifest.json').read_text())['precision'] == 'bf16'


@pytest.mark.parametrize('has_units', [True, False])
def test_bf16_on_a_device_without_bf16_units_warns(tiny_model, monkeypatch, has_units, recwarn):
    import unitok.model as model_module
    seen = []
    monkeypatch.setattr(model_module, 'bf16_runs_in_hardware', lambda device: seen.append(device) or has_units)
    fast = copy.deepcopy(tiny_model).to(torch.bfloat16)
    warned = [w for w in recwarn.list if issubclass(w.category, RuntimeWarning) and 'no bf16 units' in str(w.message)]
    assert fast.dtype == torch.bfloat16 and seen == [torch.device('cpu')]
    assert len(warned) == (0 if has_units else 1)
    assert warned == [] or warned[0].filename == __file__      # points at the caller's line
    copy.deepcopy(tiny_model).to(torch.float16)                 # float16 and float32 casts do not ask
    copy.deepcopy(tiny_model).float()
    assert seen == [torch.device('cpu')]


def test_the_bf16_warning_points_at_the_caller_of_each_way_in(tiny_model, tmp_path, monkeypatch):
    import unitok.model as model_module
    monkeypatch.setattr(model_module, 'bf16_runs_in_hardware', lambda device: False)
    tiny_model.save_pretrained(str(tmp_path))
    for cast in (lambda: copy.deepcopy(tiny_model).bfloat16(),
                 lambda: UniTok.from_pretrained(str(tmp_path), dtype=torch.bfloat16)):
        with pytest.warns(RuntimeWarning, match='no bf16 units') as caught:
            cast()
        assert [w.filename for w in caught.list] == [__file__]


def test_bf16_runs_in_hardware_follows_the_cpu_flags(monkeypatch):
    from unitok.precision import bf16_runs_in_hardware
    for avx512_bf16, amx, want in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda v=amx: v)
        assert bf16_runs_in_hardware('cpu') is want


def test_precision_of_names_each_setting(tiny_model):
    from unitok.precision import INFERENCE_PRECISIONS, check_precision, precision_of
    assert precision_of(tiny_model) == 'fp32'
    assert precision_of(copy.deepcopy(tiny_model).bfloat16()) == 'bf16'
    assert precision_of(copy.deepcopy(tiny_model).keep_encoder_convs_fp32().bfloat16()) == 'bf16-convs32'
    assert precision_of(copy.deepcopy(tiny_model).keep_encoder_tail_fp32(1).bfloat16()) is None
    assert precision_of(copy.deepcopy(tiny_model).half()) is None
    assert list(INFERENCE_PRECISIONS) == ['fp32', 'bf16', 'bf16-convs32']
    with pytest.raises(ValueError, match="one of 'fp32', 'bf16', 'bf16-convs32'; got 'fp16'"):
        check_precision('fp16')


def test_precision_bf16_convs32_reaches_encode_and_export_codes(tmp_path, tiny_model, monkeypatch):
    import json
    from unitok.data import eval_transform, open_source
    from unitok.codes import CodeDataset
    from unitok.images import to_tensor
    m = str(tmp_path / 'model')
    tiny_model.save_pretrained(m)
    faithful = UniTok.from_pretrained(m, dtype=torch.bfloat16, fp32_encoder_convs=True).eval()
    loaded = []
    original = UniTok.from_pretrained.__func__
    monkeypatch.setattr(UniTok, 'from_pretrained',
                        classmethod(lambda cls, *a, **k: loaded.append(k) or original(cls, *a, **k)))
    (tmp_path / 'imgs').mkdir()
    rng = np.random.default_rng(0)
    files = [str(tmp_path / 'imgs' / f'im{i}.png') for i in range(3)]
    for f in files:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(f)
    out = str(tmp_path / 'codes.npz')
    assert main(['encode', str(tmp_path / 'imgs'), '--model', m, '--out', out, '--precision', 'bf16-convs32']) == 0
    with np.load(out) as z:
        assert str(z['precision']) == 'bf16-convs32'
        assert np.array_equal(z['codes'], faithful.encode(to_tensor(files, size=64)).numpy())
    assert main(['export-codes', '--model', m, '--data', 'builtin:emoji', '--out', str(tmp_path / 'export'),
                 '--limit', '4', '--batch-size', '4', '--workers', '0', '--precision', 'bf16-convs32',
                 '--device', 'cpu']) == 0
    assert loaded == [dict(dtype=torch.bfloat16, fp32_encoder_convs=True)] * 2
    assert json.loads((tmp_path / 'export' / 'manifest.json').read_text())['precision'] == 'bf16-convs32'
    source = open_source('builtin:emoji', 'train')
    x = torch.stack([eval_transform(64)(source.read(i)[0]) for i in range(4)])
    ds = CodeDataset(str(tmp_path / 'export'))
    assert torch.equal(torch.stack([ds[i]['codes'][0] for i in range(4)]), faithful.encode(x))


def test_export_codes_runs_each_precision_as_the_model_is_set(tmp_path, tiny_model):
    """No autocast around a cast model (it would run the float32 conv stages in bf16); bf16 autocast
    around a float32 model asked for 'bf16'; a model in another setting than the one the manifest would
    record is refused before anything is written."""
    from unitok.codes import ExportConfig, export_codes
    faithful = copy.deepcopy(tiny_model).keep_encoder_convs_fp32().bfloat16()
    seen = []
    for i, (model, precision) in enumerate(((faithful, 'bf16-convs32'), (copy.deepcopy(tiny_model), 'bf16'),
                                            (copy.deepcopy(tiny_model).bfloat16(), 'bf16'),
                                            (copy.deepcopy(tiny_model), 'fp32'))):
        hook = model.encoder.patch_embed.register_forward_pre_hook(
            lambda m, args: seen.append(torch.is_autocast_enabled('cpu')))
        export_codes(model, ExportConfig('builtin:emoji', limit=2, precision=precision), str(tmp_path / f'ok{i}'))
        hook.remove()
    assert seen == [False, True, False, False]
    for model, precision in ((tiny_model, 'bf16-convs32'), (faithful, 'bf16'), (faithful, 'fp32'),
                             (copy.deepcopy(tiny_model).bfloat16(), 'fp32'),
                             (copy.deepcopy(tiny_model).half(), 'bf16')):
        with pytest.raises(ValueError, match=f"export precision '{precision}' needs a model in that setting"):
            export_codes(model, ExportConfig('builtin:emoji', limit=2, precision=precision), str(tmp_path / 'refused'))
        assert not (tmp_path / 'refused').exists()
    with pytest.raises(ValueError, match='precision must be one of'):
        ExportConfig('builtin:emoji', precision='fp16')
