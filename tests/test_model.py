import pytest
import torch

import unitok
from unitok import UniTok


def test_forward_shapes_and_types(tiny_model, images64):
    out = tiny_model(images64, ['a cat', 'a dog'], recon_batch_size=1)
    cfg = tiny_model.config
    assert out.reconstruction.shape == (1, 3, 64, 64) and out.reconstruction.dtype == torch.float32
    assert out.codes.shape == (2, cfg.num_codebooks, 16)
    assert out.image_features.shape == out.text_features.shape == (2, cfg.embed_dim)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(2))
    assert out.codebook_usage.shape == (cfg.num_codebooks,)
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert tiny_model(images64, recon_batch_size=0).reconstruction is None


def test_backward_reaches_every_trainable_parameter(tiny_config, images64):
    torch.manual_seed(0)
    model = UniTok(tiny_config.replace(grad_checkpointing=True)).train()
    out = model(images64, ['a cat', 'a dog'])
    loss = out.reconstruction.square().mean() + out.quantizer_loss + \
        (out.image_features @ out.text_features.T * out.logit_scale).logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not model.encoder.pos_embed.requires_grad


def test_encode_decode_non_square(tiny_model):
    x = torch.rand(2, 3, 48, 96) * 2 - 1
    codes = tiny_model.encode(x)
    assert codes.shape == (2, tiny_model.config.num_codebooks, 3, 6) and codes.dtype == torch.int64
    y = tiny_model.decode(codes)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    torch.testing.assert_close(tiny_model.reconstruct(x), y, rtol=0, atol=1e-5)
    # the same image content at another size is a different grid, not a reshaped one
    assert tiny_model.encode(x[..., :48, :48]).shape == (2, tiny_model.config.num_codebooks, 3, 3)


def test_query_tokens_travel_with_the_codes():
    torch.manual_seed(0)
    model = unitok.create_model('unitok-tiny', num_query=3).eval()
    x = torch.rand(1, 3, 32, 64) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (1, model.config.num_codebooks, 3 + 2 * 4)
    with pytest.raises(ValueError, match='grid'):
        model.decode(codes)                      # 8 grid tokens: not a square, the grid must be given
    y = model.decode(codes, grid=(2, 4))
    torch.testing.assert_close(y, model.reconstruct(x), rtol=0, atol=1e-5)
    changed = codes.clone()
    changed[:, :, :3] = (changed[:, :, :3] + 1) % model.config.codebook_size
    assert not torch.allclose(model.decode(changed, grid=(2, 4)), y)   # query codes matter


def test_text_from_strings_equals_token_ids(tiny_model):
    texts = ['a red apple', 'an emoji of a smiling face']
    ids = tiny_model.tokenize(texts)
    assert ids.shape == (2, tiny_model.config.text_context_length)
    torch.testing.assert_close(tiny_model.encode_text(texts), tiny_model.encode_text(ids))


def test_zero_shot_helpers(tiny_model, images64):
    classifier = tiny_model.zero_shot_classifier(['cat', 'dog', 'car'], ['a photo of a {}.', lambda c: f'{c}!'])
    assert classifier.shape == (tiny_model.config.embed_dim, 3)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))
    logits = tiny_model.classify(images64, classifier)
    assert logits.shape == (2, 3)


def test_parameter_counts_add_up(tiny_model):
    counts = tiny_model.parameter_counts()
    parts = sum(v for k, v in counts.items() if k != 'total')
    assert parts == counts['total'] == sum(p.numel() for p in tiny_model.parameters())


def test_bf16_autocast_keeps_quantizer_in_fp32(tiny_model, images64):
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = tiny_model(images64, ['a', 'b'])
        latents, _ = tiny_model.encode_latents(images64)
    assert latents.dtype == torch.float32 and out.reconstruction.dtype == torch.float32


@pytest.mark.parametrize('make,error,match', [
    (lambda: torch.rand(2, 4, 64, 64), ValueError, '3 channels'),
    (lambda: torch.rand(2, 1, 64, 64), ValueError, '3 channels'),
    (lambda: torch.rand(3, 64, 64), ValueError, '4-D'),
    (lambda: torch.rand(1, 3, 60, 64), ValueError, 'multiples of 16'),
    (lambda: torch.rand(1, 3, 64, 70), ValueError, 'multiples of 16'),
    (lambda: torch.full((1, 3, 64, 64), float('nan')), ValueError, 'NaN'),
    (lambda: torch.full((1, 3, 64, 64), float('inf')), ValueError, 'NaN or inf'),
    (lambda: torch.rand(1, 3, 64, 64) * 255, ValueError, r'\[-1, 1\]'),
    (lambda: torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, 'float'),
    (lambda: [[0.0]], TypeError, 'torch.Tensor'),
])
def test_bad_images_get_one_clear_error(tiny_model, make, error, match):
    for fn in (tiny_model.encode, tiny_model.reconstruct, tiny_model.encode_image, tiny_model):
        with pytest.raises(error, match=match):
            fn(make())


@pytest.mark.parametrize('make,error,match', [
    (lambda K, n: torch.full((1, K, 4, 4), n), ValueError, 'must lie in'),
    (lambda K, n: torch.full((1, K, 4, 4), -1), ValueError, 'must lie in'),
    (lambda K, n: torch.zeros(1, K + 1, 4, 4, dtype=torch.long), ValueError, 'sub-codebooks'),
    (lambda K, n: torch.zeros(1, K, 4, 4), TypeError, 'integer'),
    (lambda K, n: torch.zeros(1, K, 4, 4, dtype=torch.bool), TypeError, 'integer'),
    (lambda K, n: torch.zeros(K, 4, 4, dtype=torch.long), ValueError, 'sub-codebooks'),  # batch axis missing
    (lambda K, n: torch.zeros(1, K, 7, dtype=torch.long), ValueError, 'square grid'),
    (lambda K, n: torch.zeros(1, K, 0, 4, dtype=torch.long), ValueError, 'empty'),
    (lambda K, n: torch.zeros(2, K, dtype=torch.long), ValueError, 'must have shape'),
    (lambda K, n: [[1, 2]], TypeError, 'torch.Tensor'),
])
def test_bad_codes_get_one_clear_error(tiny_model, make, error, match):
    cfg = tiny_model.config
    with pytest.raises(error, match=match):
        tiny_model.decode(make(cfg.num_codebooks, cfg.codebook_size))


def test_bad_text_ids(tiny_model):
    n = tiny_model.config.text_context_length
    with pytest.raises(ValueError, match=f'\\(N, {n}\\)'):
        tiny_model.encode_text(torch.zeros(2, n + 1, dtype=torch.long))
    with pytest.raises(ValueError, match='must lie in'):
        tiny_model.encode_text(torch.full((2, n), 10 ** 6))
    with pytest.raises(TypeError, match='integer'):
        tiny_model.encode_text(torch.zeros(2, n))


def test_grid_argument_checked(tiny_model):
    codes = torch.zeros(1, tiny_model.config.num_codebooks, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match='does not match'):
        tiny_model.decode(codes, grid=(2, 8))
    flat = codes.flatten(2)
    assert tiny_model.decode(flat, grid=(2, 8)).shape == (1, 3, 32, 128)
    assert tiny_model.decode(flat).shape == (1, 3, 64, 64)


def test_classify_is_scaled_cosine_similarity(tiny_model, images64):
    # logits = exp(logit_scale) * cos(image embedding, class weight), with a scale that is not 1
    with torch.no_grad():
        tiny_model.logit_scale.fill_(1.7)
    texts = ['a cat', 'a dog', 'a car']
    classifier = torch.nn.functional.normalize(tiny_model.encode_text(texts), dim=-1).T     # (E, 3)
    raw = tiny_model.encode_image(images64, normalize=False)                               # (2, E)
    cos = torch.nn.functional.cosine_similarity(raw[:, :, None], classifier[None], dim=1)  # (2, 3)
    torch.testing.assert_close(tiny_model.classify(images64, classifier), cos * torch.e ** 1.7,
                               rtol=1e-5, atol=1e-5)


def test_patch_size_8_gives_an_8x8_grid_at_64_px_and_decodes_back_to_64_px():
    torch.manual_seed(0)
    model = UniTok.from_preset('unitok-tiny-p8').eval()
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8, 12)
    assert model.decode(codes).shape == x.shape
    assert tuple(model.decoder.up_conv1.weight.shape[-2:]) == (3, 3)          # a same-size conv, not an up-sample
    assert model.encoder.patch_embed.backbone.pool.proj.stride == (1, 1)
    assert UniTok.from_preset('unitok-tiny').encode(x).shape == (2, 8, 4, 6)
