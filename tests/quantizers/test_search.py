"""The exact nearest-code search: every route gives the float32 reference codes."""
import math

import pytest
import torch
import torch.nn.functional as F

from search_routes import quantizer_module, route  # noqa: F401  (route: a fixture)
from unitok import MultiCodebookQuantizer


def loop_codes(q: MultiCodebookQuantizer, z: torch.Tensor) -> torch.Tensor:
    """The float32 reference search: one matmul + argmax per sub-codebook, (B, L, K*d) -> (B, K, L)."""
    codes = []
    for k, chunk in enumerate(z.float().split(q.code_dim, dim=-1)):
        f = F.normalize(chunk.reshape(-1, q.code_dim), dim=-1)
        table = F.normalize(q.codebook[k].detach().float(), dim=-1)
        codes.append((f @ table.T).argmax(1).view(z.shape[:2]))
    return torch.stack(codes, 1)


def near_tie_quantizer(seed: int, groups: int = 1024, spread: float = 1e-3):
    """8 x 4096 codes of 8 dims in `groups` tight clusters per sub-codebook (codes differ by ~spread,
    below bf16 resolution), exact duplicates and rescaled copies among them, and latents inside the
    clusters: most tokens have several codes within the bf16 error of the best one."""
    g = torch.Generator().manual_seed(seed)
    q = MultiCodebookQuantizer(8, 4096, 8)
    centres = F.normalize(torch.randn(8, groups, 8, generator=g), dim=-1)
    member = torch.randint(0, groups, (8, 4096), generator=g)
    with torch.no_grad():
        q.codebook.copy_(centres.gather(1, member[..., None].expand(-1, -1, 8))
                         + spread * torch.randn(8, 4096, 8, generator=g))
        q.codebook[:, 3000:3100] = q.codebook[:, 100:200]           # exact duplicates: first index wins
        q.codebook[:, 3100:3200] = q.codebook[:, 200:300] * 7.0     # same direction after l2-normalisation
    pick = torch.randint(0, groups, (8, 3 * 200), generator=g)
    z = centres.gather(1, pick[..., None].expand(-1, -1, 8)) + spread * torch.randn(8, 600, 8, generator=g)
    return q, z.permute(1, 0, 2).reshape(3, 200, 64)


@pytest.mark.parametrize('seed,spread', [(0, 1e-3), (1, 1e-5), (2, 1e-6)])
def test_search_equals_float32_loop_on_near_ties(seed, spread, route, monkeypatch):
    q, z = near_tie_quantizer(seed, spread=spread)
    rescored = []
    original = quantizer_module._fma_chain_dot
    monkeypatch.setattr(quantizer_module, '_fma_chain_dot', lambda a, b: rescored.append(len(a)) or original(a, b))
    assert torch.equal(q.nearest_codes(z), loop_codes(q, z))
    assert route[1] == [600]                   # the forced route searched all 600 tokens
    if route[0] == 'bf16':
        assert sum(rescored) > 100             # the exact re-scoring of bf16 near-ties was exercised


def test_search_equals_float32_loop_on_exact_ties_and_degenerate_tokens(route, monkeypatch):
    exact_rows = []
    original = quantizer_module._argmax_rows
    monkeypatch.setattr(quantizer_module, '_argmax_rows', lambda r, t: exact_rows.append(len(r)) or original(r, t))
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(8, 4096, 8)
    with torch.no_grad():
        q.codebook[:, 500:1000] = q.codebook[:, 7:8]               # 501 equal codes: > 8 candidate blocks
        q.codebook[:, 2000] = q.codebook[:, 9] * 0.25             # bitwise the same unit vector
    z = torch.randn(2, 40, 64)
    z[0, :10] = q.codebook[:, 7].detach().reshape(64)              # ties among 501 codes -> code 7
    z[0, 10:20] = q.codebook[:, 9].detach().reshape(64) * 3        # ties 9 / 2000 -> code 9
    z[1, :5] = 0                                                   # all similarities 0 -> code 0
    codes = q.nearest_codes(z)
    assert torch.equal(codes, loop_codes(q, z))
    assert (codes[0, :, :10] == 7).all() and (codes[0, :, 10:20] == 9).all() and (codes[1, :, :5] == 0).all()
    assert route[1] == [80]
    if route[0] == 'bf16':
        assert sum(exact_rows) >= 15 * 8      # the tokens of the 501 ties and the zero tokens went exact


@pytest.mark.parametrize('shape', [(1, 1), (1, 15), (1, 16), (2, 7), (3, 100), (8, 256)])
@pytest.mark.parametrize('latent_scale,code_scale', [(1.0, 1.0), (1e-3, 50.0), (1e3, 1e-2)])
def test_search_equals_float32_loop_on_random_data(shape, latent_scale, code_scale, route):
    torch.manual_seed(shape[1])
    q = MultiCodebookQuantizer(8, 4096, 8)
    with torch.no_grad():
        q.codebook.mul_(code_scale)
    z = torch.randn(*shape, 64) * latent_scale
    assert torch.equal(q.nearest_codes(z), loop_codes(q, z))
    tokens = shape[0] * shape[1]
    assert route[1] == ([tokens] if tokens >= quantizer_module._MIN_SEARCH_TOKENS else [])


def test_fma_chain_dot_rounds_once_per_step():
    # a * b = 2^-24 + 2^-60: 1 + a*b lies just above the float32 midpoint 1 + 2^-24, so the fused result
    # is 1 + 2^-23; float64 rounds the sum onto the midpoint and a second rounding would give 1.
    a = torch.tensor([[1.0, 2.0 ** -12 * (1 + 2.0 ** -12)]])
    b = torch.tensor([[1.0, 2.0 ** -12 * (1 - 2.0 ** -12 + 2.0 ** -24)]])
    assert float(quantizer_module._fma_chain_dot(a, b)[0]) == 1 + 2.0 ** -23
    assert float((a.double() * b.double()).sum().float()) == 1.0     # what double rounding gives
    # The premise of the fast search on this machine: the float32 GEMM is that chain.
    torch.manual_seed(0)
    x, y = F.normalize(torch.randn(64, 8), dim=-1), F.normalize(torch.randn(300, 8), dim=-1)
    chain = quantizer_module._fma_chain_dot(x.repeat_interleave(300, 0), y.repeat(64, 1)).view(64, 300)
    if not quantizer_module._gemm_is_fma_chain(8):
        pytest.skip('this BLAS does not compute float32 dot products as an in-order FMA chain')
    assert torch.equal(x @ y.T, chain)


def bf16_sensitive_case(n=256, tokens=32, seed=0):
    """Per token a code pair a < b at 0.01 and 0.005 rad from the latent: float32 picks b, while in
    bf16 both similarities round to 1 and a tie picks a."""
    g = torch.Generator().manual_seed(seed)
    q = MultiCodebookQuantizer(1, n, 8)
    u = F.normalize(torch.randn(tokens, 8, generator=g), dim=-1)
    v = torch.randn(tokens, 8, generator=g)
    v = F.normalize(v - (v * u).sum(-1, keepdim=True) * u, dim=-1)
    a, b = torch.arange(tokens) * 2, torch.arange(tokens) * 2 + 1
    with torch.no_grad():
        q.codebook.copy_(torch.randn(1, n, 8, generator=g))
        q.codebook[0, a] = u
        q.codebook[0, b] = F.normalize(u + 0.005 * v, dim=-1)
    z = F.normalize(u + 0.01 * v, dim=-1)[None]                      # (1, tokens, 8)
    return q, z, b


def test_codes_stay_float32_exact_under_bf16_autocast():
    q, z, expected = bf16_sensitive_case()
    table = q.normalized_codebooks()[0].detach()
    naive = (z[0].bfloat16() @ table.bfloat16().T).argmax(-1)
    assert (naive != expected).sum() >= 24                          # bf16 scoring changes most codes
    fp32 = q.nearest_codes(z)
    assert torch.equal(fp32[0, 0], expected)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        codes = q.nearest_codes(z.bfloat16())
        out = q(z.bfloat16().requires_grad_(True))
        out_eval = q.eval()(z)
    assert torch.equal(codes, fp32) and torch.equal(out.codes, fp32) and torch.equal(out_eval.codes, fp32)
    assert out.quantized.dtype == torch.float32 and out_eval.quantized.dtype == torch.float32
    assert out.losses['commitment'].dtype == torch.float32
    torch.testing.assert_close(out_eval.quantized, q.lookup(fp32), rtol=0, atol=0)


@pytest.fixture
def matmul_precision():
    """Sets the process's float32 matmul precision (``torch.set_float32_matmul_precision``) and puts
    every backend's setting back afterwards."""
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    yield torch.set_float32_matmul_precision
    for backend, value in zip(backends, saved):
        backend.fp32_precision = value


class _MatmulPrecisionSpy(torch.overrides.TorchFunctionMode):
    """Records, for every float32 matmul, the cuBLAS and oneDNN float32 precision in force."""
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', '')
        if name in ('matmul', '__matmul__', 'bmm', 'mm', 'linear', 'baddbmm') and args[0].dtype == torch.float32:
            self.seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('precision', ['high', 'medium'])
@pytest.mark.parametrize('tokens', [8, 300])                 # the reference itself; the float32 search
def test_search_is_ieee_float32_under_a_lower_process_matmul_precision(precision, tokens, matmul_precision,
                                                                       monkeypatch):
    """TF32 ('high', CUDA) or bf16 ('medium', oneDNN on CPUs with bf16 units) float32 matmuls asked for by
    the process (e.g. a LlamaGen-style training script) do not reach the search; its settings come back."""
    monkeypatch.setattr(quantizer_module, '_native_route_applies', lambda *args: False)
    monkeypatch.setattr(quantizer_module, '_bf16_route_applies', lambda *args: False)
    torch.manual_seed(tokens)
    q = MultiCodebookQuantizer(8, 512, 8)
    z = torch.randn(1, tokens, 64)
    want = loop_codes(q, z)                                    # at the default, IEEE float32
    matmul_precision(precision)
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    assert before != ('ieee', 'ieee')
    with _MatmulPrecisionSpy() as spy:
        codes = q.nearest_codes(z)
    assert torch.equal(codes, want)
    assert spy.seen and set(spy.seen) == {('ieee', 'ieee')}
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == before
    assert torch.get_float32_matmul_precision() == precision


def test_overlapping_searches_in_two_threads_both_run_ieee_and_restore_the_setting(matmul_precision, monkeypatch):
    """The precision switch is process-wide: a search that ends while another one in a second thread is
    still scoring must neither hand that one back to TF32 nor leave IEEE behind when both are done."""
    import threading
    monkeypatch.setattr(quantizer_module, '_native_route_applies', lambda *args: False)
    monkeypatch.setattr(quantizer_module, '_bf16_route_applies', lambda *args: False)
    first_in, first_done, both_in = threading.Event(), threading.Event(), threading.Barrier(2, timeout=30)
    original = quantizer_module._nearest_fp32

    def paced(z, table):
        if threading.current_thread().name == 'first':
            first_in.set()
            both_in.wait()
        else:
            both_in.wait()
            assert first_done.wait(30)                 # the first search has left the switch
        return original(z, table)
    monkeypatch.setattr(quantizer_module, '_nearest_fp32', paced)
    q = MultiCodebookQuantizer(8, 512, 8)
    z = torch.randn(1, 300, 64)
    want = loop_codes(q, z)
    matmul_precision('high')
    seen, codes, errors = {}, {}, []

    def search(name):
        try:
            with _MatmulPrecisionSpy() as spy:
                codes[name] = q.nearest_codes(z)
            seen[name] = set(spy.seen)
        except Exception as err:                       # reported below, not lost in the thread
            errors.append(err)
        if name == 'first':
            first_done.set()
    threads = {name: threading.Thread(target=search, args=(name,), name=name) for name in ('first', 'second')}
    threads['first'].start()
    assert first_in.wait(30)
    threads['second'].start()
    for thread in threads.values():
        thread.join(60)
    assert errors == []
    assert seen == {'first': {('ieee', 'ieee')}, 'second': {('ieee', 'ieee')}}
    assert torch.equal(codes['first'], want) and torch.equal(codes['second'], want)
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == ('tf32', 'tf32')


def test_search_leaves_a_legacy_tf32_switch_readable(matmul_precision):
    """A script that sets ``torch.backends.cuda.matmul.allow_tf32`` reads it back unchanged after a
    search (PyTorch refuses that read once the new per-backend API has changed the setting)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    q = MultiCodebookQuantizer(2, 64, 8)
    q.nearest_codes(torch.randn(1, 40, 16))
    assert torch.backends.cuda.matmul.allow_tf32 is True


def test_compiled_quantizer_matches_eager_and_leaves_the_search_untraced(monkeypatch):
    """torch.compile (as ``TrainConfig.compile`` does) gives the eager codes, losses and gradients, and
    the search runs eagerly: traced, its cached probes and the native library's build would run again
    inside the trace (Dynamo ignores functools caches), spawning the compiler from every compiled step."""
    from unitok.quantizers import native
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(8, 512, 8)
    z = torch.randn(2, 40, 64, requires_grad=True)
    want = q(z)
    want.quantized.square().sum().backward()
    grad, z.grad = z.grad.clone(), None
    native.available()                                     # built and loaded once, eagerly
    spawned = []
    run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, 'run', lambda *a, **k: spawned.append(a) or run(*a, **k))
    torch._dynamo.reset()
    try:
        got = torch.compile(q, backend='eager')(z)
        got.quantized.square().sum().backward()
    finally:
        torch._dynamo.reset()
    assert spawned == []
    assert torch.equal(got.codes, want.codes)
    torch.testing.assert_close(got.losses['commitment'], want.losses['commitment'])
    torch.testing.assert_close(z.grad, grad)

def test_prepared_codebooks_follow_every_change_of_the_codebook(route):
    """nearest_codes keeps the prepared search table between calls; any change of the codebook, also
    one that bypasses autograd's version counter (``.data``), must be seen by the next call."""
    torch.manual_seed(3)
    q = MultiCodebookQuantizer(8, 4096, 8).eval()
    z = torch.randn(2, 64, 64)
    assert torch.equal(q.nearest_codes(z), loop_codes(q, z))
    first = q._search_table()
    assert q._search_table() is first                                # unchanged codebook: reused
    with torch.no_grad():
        q.codebook[:, :2048] = q.codebook[:, 2048:].flip(1)          # in place
    assert torch.equal(q.nearest_codes(z), loop_codes(q, z))
    q.codebook.data.copy_(torch.randn(8, 4096, 8))                   # no version bump
    assert torch.equal(q.nearest_codes(z), loop_codes(q, z))
    q.load_state_dict({'codebook': torch.randn(8, 4096, 8), 'vocab_usage': torch.zeros(8, 4096)})
    assert torch.equal(q.nearest_codes(z), loop_codes(q, z))
    assert q._search_table() is not first


def test_concurrent_searches_on_one_quantizer_are_each_exact(route):
    """The bf16 route keeps its work buffers with the prepared table; a search running while another
    holds them (another thread) must use its own and still return the reference codes."""
    import threading
    torch.manual_seed(4)
    q = MultiCodebookQuantizer(8, 4096, 8).eval()
    inputs = [torch.randn(2, 128, 64) for _ in range(4)]
    expected = [loop_codes(q, z) for z in inputs]
    results = [None] * len(inputs)

    def run(i):
        for _ in range(3):
            results[i] = q.nearest_codes(inputs[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_quantizer_copies_and_pickles_with_its_prepared_table(route):
    """The prepared search table (with a lock and work buffers) must not break copy.deepcopy (EMA
    helpers of other libraries) or pickling, and the copy searches exactly."""
    import copy
    import pickle
    torch.manual_seed(5)
    q = MultiCodebookQuantizer(8, 4096, 8).eval()
    z = torch.randn(2, 64, 64)
    q.nearest_codes(z)                                   # table and scratch buffers exist now
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert torch.equal(clone.nearest_codes(z), loop_codes(q, z))


@pytest.mark.parametrize('route', ['bf16'], indirect=True)
def test_long_inputs_are_searched_in_chunks(route, monkeypatch):
    monkeypatch.setattr(quantizer_module, '_BF16_CHUNK', 370)
    torch.manual_seed(6)
    q = MultiCodebookQuantizer(8, 4096, 8).eval()
    z = torch.randn(3, 250, 64)                          # 750 tokens: chunks of 370, 370 and 10
    assert torch.equal(q.nearest_codes(z), loop_codes(q, z))
    assert route[1] == [370, 370, 10]


@pytest.mark.parametrize('where', ['codebook', 'latents'])
def test_non_finite_values_give_the_reference_codes(where, route):
    """A NaN or inf (a diverged run) must not send the search down a route whose exactness assumes
    finite inputs: the codes stay those of the float32 loop (argmax takes a NaN as the maximum)."""
    torch.manual_seed(7)
    q = MultiCodebookQuantizer(8, 4096, 8).eval()
    z = torch.randn(2, 40, 64)
    with torch.no_grad():
        if where == 'codebook':
            q.codebook[:, 1000] = float('nan')
            q.codebook[3, 200, 0] = float('inf')
        else:
            z[0, 3, :8] = float('nan')
            z[1, 5, 8:16] = float('inf')
    assert torch.equal(q.nearest_codes(z), loop_codes(q, z))
    assert route[1] == []                                  # the reference itself answered, not the route
