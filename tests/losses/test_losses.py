"""Training losses: values against hand computations, gradients, frozen networks, weight files.

The LPIPS-VGG and DINOv2 weights are not reachable offline; their loaders are tested on files in the
released formats (torchvision ``vgg16`` keys; DINOv2 ``dinov2_vits14_pretrain.pth`` keys at 518 px)
filled with random values, which is what the format checks and the wiring need.
"""
import pytest
import torch
import torch.nn.functional as F

from unitok.losses import (ContrastiveLoss, DiffAug, DinoDiscriminator, EffNetPerceptual, LPIPSPerceptual,
                           PatchGANDiscriminator, adaptive_generator_weight, build_discriminator,
                           build_perceptual, discriminator_hinge_loss, generator_hinge_loss,
                           reconstruction_losses)
from unitok.losses.adversarial import gaussian_blur
from unitok.losses.perceptual import MissingWeightsError
from unitok.pretrained import CheckpointError


def images(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------------- reconstruction, contrastive
def test_reconstruction_losses_are_float32_means():
    a, b = images(seed=0).bfloat16(), images(seed=1).bfloat16()
    out = reconstruction_losses(a, b)
    assert out['l1'].dtype == out['l2'].dtype == torch.float32
    assert torch.allclose(out['l1'], (a.float() - b.float()).abs().mean())
    assert torch.allclose(out['l2'], (a.float() - b.float()).square().mean())


def test_contrastive_loss_is_symmetric_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(7.0)
    logits = scale * img @ txt.T
    labels = torch.arange(6)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(ContrastiveLoss()(img, txt, scale), want, atol=1e-6)
    with pytest.raises(ValueError, match='rank'):
        ContrastiveLoss(rank=2, world_size=2)


# ---------------------------------------------------------------------- adversarial
def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2.5] -> 7/6
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(5 / 6 + 7 / 6)
    assert generator_hinge_loss(fake).item() == pytest.approx(0.5 / 3)     # -mean(fake)


def test_adaptive_weight_is_the_clamped_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.ones(4))
    a, b = torch.tensor([3.0, 0, 4, 0]), torch.tensor([0.0, 1, 0, 0])
    nll, g_loss = (w * a).sum(), (w * b).sum()          # gradients a (norm 5) and b (norm 1)
    assert adaptive_generator_weight(nll, g_loss, w).item() == pytest.approx(5 / (1 + 1e-6))
    assert adaptive_generator_weight(nll, 1e-9 * g_loss, w).item() == pytest.approx(1e4)   # upper clamp
    assert adaptive_generator_weight(1e-6 * nll, g_loss, w).item() == pytest.approx(0.015)  # lower clamp


def test_diffaug_keeps_shape_and_gradients_and_is_identity_when_off():
    x = images().requires_grad_()
    assert torch.equal(DiffAug(prob=0.0)(x), x)
    torch.manual_seed(0)
    y = DiffAug(prob=1.0)(x, blur=0.5)
    assert y.shape == x.shape and y.dtype == torch.float32 and not torch.equal(y, x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gaussian_blur_preserves_constants_and_smooths():
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(gaussian_blur(flat, sigma=2.0), flat, atol=1e-6)
    x = images(1, 32)
    assert torch.equal(gaussian_blur(x, sigma=0.2), x)                   # radius 0: identity
    y = gaussian_blur(x.bfloat16(), sigma=2.0)                           # bf16 in, float32 out
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert y.var() < 0.5 * x.var()


def test_patchgan_gives_patch_logits_and_trains():
    d = PatchGANDiscriminator()
    x = images(2, 64)
    logits = d(x)
    assert logits.dim() == 2 and logits.shape[0] == 2 and logits.shape[1] > 1
    discriminator_hinge_loss(d(x), d(-x)).backward()
    assert all(p.grad is not None for p in d.parameters())


def _dinov2_release_file(path):
    """A file in the layout of the released dinov2_vits14 weights (518 px, 37x37 patches + class token)."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('vit_small_patch14_dinov2', pretrained=False, img_size=518, num_classes=0)
    state = model.state_dict()
    assert state['pos_embed'].shape == (1, 1 + 37 * 37, 384)
    state['mask_token'] = torch.zeros(1, 384)                            # present in the release, unused
    torch.save(state, path)
    return state


def test_dino_discriminator_loads_released_layout_frozen(tmp_path):
    path = tmp_path / 'dinov2_vits14_pretrain.pth'
    state = _dinov2_release_file(path)
    d = DinoDiscriminator(str(path), image_size=64)                      # 64 px -> 4x4 patches of 14 px
    backbone = d._dino[0]
    assert torch.equal(backbone.blocks[3].attn.qkv.weight, state['blocks.3.attn.qkv.weight'])
    assert backbone.pos_embed.shape == (1, 1 + 16, 384)                  # interpolated from 37x37
    # Only the heads train: the backbone is outside parameters(), the state dict and the optimizer.
    assert not any(k.startswith('_dino') for k in d.state_dict())
    assert {id(p) for p in d.parameters()} == {id(p) for p in d.heads.parameters()}
    x = images(2, 64).requires_grad_()
    logits = d(x)
    assert logits.shape == (2, len(d.key_depths) * 16)
    generator_hinge_loss(logits).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0                # the generator gets a signal
    assert all(p.grad is not None for p in d.parameters())
    assert all(p.grad is None for p in backbone.parameters())


def test_dino_discriminator_rejects_a_file_of_another_model(tmp_path):
    path = tmp_path / 'wrong.pth'
    torch.save({'weight': torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="DINOv2 weights '.*wrong.pth' are not the released ViT-S/14 layout of "
                                              'dinov2_vits14_pretrain.pth: pos_embed is None'):
        DinoDiscriminator(str(path), image_size=64)
    state = _dinov2_release_file(path)
    del state['blocks.3.attn.qkv.weight']
    torch.save(state, path)
    with pytest.raises(CheckpointError, match='not the released ViT-S/14 layout .*Missing key.*blocks.3.attn.qkv'):
        DinoDiscriminator(str(path), image_size=64)


# ---------------------------------------------------------------------- perceptual
def test_effnet_perceptual_is_a_frozen_distance():
    p = EffNetPerceptual()
    p.train()
    assert not p.training and not any(q.requires_grad for q in p.parameters())
    x = images(2, 64)
    assert p(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = images(2, 64, seed=1).requires_grad_()
    loss = p(x, y)
    assert loss.item() > 0.01
    loss.backward()
    assert y.grad.abs().sum() > 0


def _vgg16_release_file(path, drop=None):
    """torchvision's vgg16 weight layout (features.N.*, classifier.*), random values."""
    import torchvision
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items()
             if k.startswith('features.')}                               # the trunk is all LPIPS reads
    if drop:
        del state[drop]
    torch.save(state, path)
    return state


@pytest.mark.filterwarnings('ignore:.*(pretrained|weight enum).*:UserWarning')  # lpips' own torchvision call
def test_lpips_loads_torchvision_vgg16_layout(tmp_path):
    pytest.importorskip('lpips')
    path = tmp_path / 'vgg16-397923af.pth'
    state = _vgg16_release_file(path)
    p = LPIPSPerceptual(str(path))
    loaded = p.net.state_dict()
    assert torch.equal(loaded['net.slice1.0.weight'], state['features.0.weight'])
    assert torch.equal(loaded['net.slice5.28.weight'], state['features.28.weight'])
    assert not any(q.requires_grad for q in p.parameters())
    x = images(2, 64)
    assert p(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = images(2, 64, seed=1).requires_grad_()
    loss = p(x, y)
    loss.backward()
    assert loss.item() > 0 and y.grad.abs().sum() > 0


@pytest.mark.filterwarnings('ignore:.*(pretrained|weight enum).*:UserWarning')
def test_lpips_file_without_the_full_trunk_is_refused(tmp_path):
    pytest.importorskip('lpips')
    path = tmp_path / 'partial.pth'
    _vgg16_release_file(path, drop='features.10.weight')
    with pytest.raises(CheckpointError, match=r'lack 1 of the 26 VGG16 trunk tensors \(e.g. net.slice3.10.weight\)'):
        LPIPSPerceptual(str(path))


def test_builders_fall_back_offline_and_name_missing_weights():
    assert isinstance(build_perceptual('auto'), EffNetPerceptual)
    assert build_perceptual('none') is None
    assert isinstance(build_discriminator('auto', 64), PatchGANDiscriminator)
    assert build_discriminator('none', 64) is None
    with pytest.raises(MissingWeightsError, match='loss.lpips_path'):
        build_perceptual('lpips-vgg')
    with pytest.raises(MissingWeightsError, match='loss.dino_path'):
        build_discriminator('dino', 64, '/nonexistent/dinov2.pth')
    with pytest.raises(ValueError, match='unknown perceptual'):
        build_perceptual('vgg')
    with pytest.raises(ValueError, match='unknown discriminator'):
        build_discriminator('stylegan', 64)
