"""The decoder's 2x up-sampling conv: the phase decomposition and its kernel cache in the fast path."""
import torch
import torch.nn.functional as F

from unitok.modules.decoder import Upsample2d


def reference(module: Upsample2d, x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x up-sampling, then the 3x3 conv: what the phase decomposition must equal."""
    w, b = module.conv.weight, module.conv.bias
    return F.conv2d(F.interpolate(x, scale_factor=2, mode='nearest'), w, b, padding=1)


def test_phase_decomposition_equals_upsample_then_conv():
    torch.manual_seed(0)
    module = Upsample2d(6, 5)
    x = torch.randn(2, 6, 7, 9)
    torch.testing.assert_close(module(x), reference(module, x), rtol=1e-5, atol=1e-5)


def test_fast_path_keeps_the_kernels_until_the_weight_changes():
    torch.manual_seed(1)
    module = Upsample2d(6, 5).bfloat16()
    x = torch.randn(1, 6, 8, 8).bfloat16()
    with torch.no_grad():
        first = module(x)
        kept = module.phase_kernels()
        assert module.phase_kernels() is kept                       # same weight: computed once
        torch.testing.assert_close(first.float(), reference(module, x).float(), rtol=0.05, atol=0.05)
        module.conv.weight.copy_(torch.randn(5, 6, 3, 3))            # in place: a new version
        assert module.phase_kernels() is not kept
        fresh = Upsample2d(6, 5).bfloat16()
        fresh.load_state_dict(module.state_dict())
        assert torch.equal(module(x), fresh(x))
        module.load_state_dict(Upsample2d(6, 5).bfloat16().state_dict())
        assert not torch.equal(module(x), fresh(x))


def test_training_recomputes_the_kernels_so_gradients_reach_the_weight():
    torch.manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        module = Upsample2d(4, 3).to(dtype)
        x = torch.randn(1, 4, 5, 5, dtype=dtype)
        with torch.no_grad():
            module(x)                                               # fills the cache in bf16
        module(x).float().sum().backward()
        assert module.conv.weight.grad is not None and module.conv.weight.grad.abs().sum() > 0
