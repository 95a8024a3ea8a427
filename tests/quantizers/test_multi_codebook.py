import pytest
import torch
import torch.nn.functional as F

from search_routes import quantizer_module, route  # noqa: F401  (route: a fixture)
from unitok import MultiCodebookQuantizer
from unitok.quantizers import to_official_layout


def loop_reference(q: MultiCodebookQuantizer, z: torch.Tensor):
    """Per-sub-codebook loop, written as in the official code: codes, STE output, losses, usage."""
    outs, losses, usages, codes, ents = [], [], [], [], []
    for k, chunk in enumerate(z.split(q.code_dim, dim=-1)):
        B, L, d = chunk.shape
        f = F.normalize(chunk.reshape(-1, d), dim=-1)
        table = F.normalize(q.codebook[k], dim=-1)
        idx = (f.detach() @ table.T).argmax(1)
        hat = table[idx]
        losses.append(F.mse_loss(hat.detach(), f) * q.beta + F.mse_loss(hat, f.detach()))
        outs.append(((hat.detach() - f.detach()) + f).view(B, L, d))
        freq = idx.bincount(minlength=q.codebook_size).float()
        freq /= freq.sum()
        usages.append((freq > 0.01 / q.codebook_size).float().mean())
        codes.append(idx.view(B, L))
        dist = f.square().sum(1, keepdim=True) + table.square().sum(1) - 2 * f @ table.T
        logits = -dist / q.entropy_temperature
        p, logp = logits.softmax(-1), logits.log_softmax(-1)
        avg = p.mean(0)
        ents.append((-(p * logp).sum(-1)).mean() - (-(avg * torch.log(avg + 1e-7))).sum())
    return (torch.cat(outs, -1), torch.stack(codes, 1), torch.stack(losses).mean(), torch.stack(usages),
            torch.stack(ents).mean())


@pytest.mark.parametrize('K,n,d', [(8, 4096, 8), (4, 300, 16), (1, 64, 32), (3, 17, 5)])
def test_vectorised_equals_loop_reference(K, n, d, route):
    torch.manual_seed(K * n + d)
    q = MultiCodebookQuantizer(K, n, d, entropy_loss=True)
    z = torch.randn(3, 37, K * d, requires_grad=True)
    out = q(z)
    ref_q, ref_codes, ref_loss, ref_usage, ref_ent = loop_reference(q, z)
    assert torch.equal(out.codes, ref_codes)
    assert torch.equal(q.nearest_codes(z), ref_codes)
    torch.testing.assert_close(out.quantized, ref_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.losses['commitment'], ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.losses['entropy'], ref_ent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.stats['usage'], ref_usage)
    if route[0] != 'bf16' or n >= 8 * quantizer_module._BF16_BLOCK:    # smaller codebooks: bf16 -> fp32
        assert route[1] == [3 * 37, 3 * 37]                           # the forward and nearest_codes


def test_ties_pick_the_first_code_like_argmax():
    q = MultiCodebookQuantizer(2, 128, 4)
    with torch.no_grad():
        q.codebook[:, 100] = q.codebook[:, 7]         # exact duplicates: both codes score the same
        q.codebook[:, 70] = q.codebook[:, 7] * 3      # same direction, other norm: same after l2-norm
    z = F.normalize(q.codebook[:, 7].detach(), dim=-1).reshape(1, 1, 8).repeat(1, 5, 1)
    assert (q.nearest_codes(z) == 7).all()


def test_lookup_inverts_nearest_codes_in_eval():
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(4, 256, 8).eval()
    z = torch.randn(2, 10, 32)
    out = q(z)
    assert torch.equal(q.lookup(out.codes), out.quantized)
    again = q(out.quantized)                    # a code vector quantizes to itself
    assert torch.equal(again.codes, out.codes)
    with_grad = q(z.requires_grad_(True))       # straight-through: same values up to rounding
    torch.testing.assert_close(with_grad.quantized, out.quantized, rtol=0, atol=1e-6)


def test_straight_through_gradients():
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(4, 64, 8).train()
    z = torch.randn(2, 6, 32, requires_grad=True)
    out = q(z)
    g = torch.randn_like(out.quantized)
    (out.quantized * g).sum().backward()
    # Through the STE the quantizer is the identity on the normalised latent: the gradient w.r.t. z is the
    # gradient of the chunk-wise l2 normalisation applied to g.
    z2 = z.detach().clone().requires_grad_(True)
    zn = F.normalize(z2.view(2, 6, 4, 8), dim=-1).view(2, 6, 32)
    (zn * g).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    assert q.codebook.grad is None                      # codes get gradients only from the losses
    out = q(z)
    out.losses['commitment'].backward()
    used = torch.zeros(4, 64, dtype=torch.bool)
    used[torch.arange(4)[:, None], out.codes.permute(1, 0, 2).reshape(4, -1)] = True
    grad_norm = q.codebook.grad.norm(dim=-1)
    assert (grad_norm[used] > 0).all() and (grad_norm[~used] == 0).all()


def test_usage_ema_follows_official_schedule():
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(2, 32, 4)
    z1, z2 = torch.randn(1, 50, 8), torch.randn(1, 50, 8)
    f1 = q.code_histogram(q.nearest_codes(z1)[0])
    f1 = f1 / f1.sum(-1, keepdim=True)
    f2 = q.code_histogram(q.nearest_codes(z2)[0])
    f2 = f2 / f2.sum(-1, keepdim=True)
    q.eval()
    q(z1)
    assert int(q.usage_updates) == 0 and q.vocab_usage.abs().sum() == 0  # eval does not update by default
    q.train()
    q(z1)
    torch.testing.assert_close(q.vocab_usage, f1)
    q(z2)
    torch.testing.assert_close(q.vocab_usage, 0.9 * f1 + 0.1 * f2)
    q.usage_updates.fill_(100)
    before = q.vocab_usage.clone()
    q(z2)
    torch.testing.assert_close(q.vocab_usage, 0.99 * before + 0.01 * f2)
    out = q(z1)
    assert out.stats['usage'].shape == (2,) and ((out.stats['usage'] > 0) & (out.stats['usage'] <= 1)).all()
    assert (out.stats['perplexity'] >= 1).all()


def test_float32_under_autocast():
    q = MultiCodebookQuantizer(2, 16, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = q(torch.randn(1, 3, 8).bfloat16())
    assert out.quantized.dtype == torch.float32 and out.losses['commitment'].dtype == torch.float32


def test_official_layout_round_trip():
    q = MultiCodebookQuantizer(3, 16, 4)
    official = to_official_layout(q.state_dict(), prefix='')
    assert sorted(official) == sorted([f'codebooks.{k}.codebook.weight' for k in range(3)] +
                                      [f'codebooks.{k}.vocab_usage' for k in range(3)])
    q2 = MultiCodebookQuantizer(3, 16, 4)
    q2.load_state_dict(official, strict=True)
    assert torch.equal(q2.codebook, q.codebook)


@pytest.mark.parametrize('codes,error,match', [
    (torch.full((1, 2, 5), 16), ValueError, r'\[0, 16\)'),
    (torch.full((1, 2, 5), -1), ValueError, r'\[0, 16\)'),
    (torch.zeros(1, 3, 5, dtype=torch.long), ValueError, r'\(B, 2, L\)'),
    (torch.zeros(1, 2, 5), TypeError, 'integer'),
    (torch.zeros(1, 2, 5, dtype=torch.bool), TypeError, 'integer'),
])
def test_lookup_rejects_bad_codes(codes, error, match):
    q = MultiCodebookQuantizer(2, 16, 4)
    with pytest.raises(error, match=match):
        q.lookup(codes)


def test_wrong_latent_width():
    with pytest.raises(ValueError, match=r'\(B, L, 8\)'):
        MultiCodebookQuantizer(2, 16, 4)(torch.randn(1, 3, 9))




def test_commitment_gradients():
    """beta weighs the encoder side: d/dz = 2 beta (z - q) / numel, d/dq = 2 (q - z) / numel, each taken
    through the l2-normalisation of the latent chunk and of the code."""
    torch.manual_seed(0)
    B, L, K, n, d, beta = 2, 5, 3, 16, 4, 0.25
    q = MultiCodebookQuantizer(K, n, d, beta=beta)
    x = torch.randn(B, L, K * d, requires_grad=True)
    out = q(x)
    out.losses['commitment'].backward()
    xc = x.detach().view(B, L, K, d)
    z = F.normalize(xc, dim=-1)
    code_vec = q.lookup(out.codes).detach().view(B, L, K, d)
    numel = B * L * K * d

    def through_normalize(g, v, unit):          # Jacobian of v / |v| applied to g: (g - (g.u) u) / |v|
        return (g - (g * unit).sum(-1, keepdim=True) * unit) / v.norm(dim=-1, keepdim=True)

    g_z = 2 * beta * (z - code_vec) / numel
    torch.testing.assert_close(x.grad, through_normalize(g_z, xc, z).view(B, L, K * d))
    g_q = 2 * (code_vec - z) / numel                                 # (B, L, K, d) per selected code
    per_code = torch.zeros(K, n, d).index_put_(
        (torch.arange(K).expand(B, L, K), out.codes.transpose(1, 2)), g_q, accumulate=True)
    cb = q.codebook.detach()
    torch.testing.assert_close(q.codebook.grad, through_normalize(per_code, cb, F.normalize(cb, dim=-1)))


def test_usage_all_reduce_only_when_asked(monkeypatch):
    """No hidden collective: the histogram all-reduce runs only with sync_usage, on its process_group."""
    calls = []
    other_rank = torch.zeros(2, 32)
    other_rank[:, 5] = 50                                            # the other process chose code 5 only

    def fake_all_reduce(tensor, group=None):
        calls.append(group)
        tensor += other_rank

    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'all_reduce', fake_all_reduce)
    torch.manual_seed(0)
    z = torch.randn(1, 50, 8)
    q = MultiCodebookQuantizer(2, 32, 4).train()
    local = q.code_histogram(q.nearest_codes(z)[0])
    q(z)
    assert calls == [] and torch.equal(q.vocab_usage, local / 50)
    group = object()
    synced = MultiCodebookQuantizer(2, 32, 4, sync_usage=True, process_group=group).train()
    synced.load_state_dict(q.state_dict())
    synced.usage_updates.zero_()
    synced(z)
    assert calls == [group]
    torch.testing.assert_close(synced.vocab_usage, (local + other_rank) / 100)
    synced.eval()(z)                                                # no usage update: no collective
    assert calls == [group]

