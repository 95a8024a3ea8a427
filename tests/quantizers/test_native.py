"""The native nearest-code kernel: exact against the float32 reference, built once, and never in the way
when it cannot be built (no compiler, a failed or damaged build, turned off)."""
import logging
import os
import stat

import pytest
import torch
import torch.nn.functional as F

from search_routes import quantizer_module
from unitok import MultiCodebookQuantizer
from unitok.quantizers import native

needs_kernel = pytest.mark.skipif(not native.available(), reason='no C++ compiler, or neither AVX-512 nor AVX2 here')
# Every instruction set this CPU runs is checked (an AVX-512 machine checks the AVX2 kernel too).
each_isa = pytest.mark.parametrize('isa', native.isas() or ['none'])


def chain_reference(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """argmax of the in-order float32 FMA chain (emulated exactly in float64), first index among equal
    maxima: the kernel's contract for any token count."""
    out = []
    for zk, ck in zip(z, codes):
        N, n = zk.shape[0], ck.shape[0]
        s = quantizer_module._fma_chain_dot(zk.repeat_interleave(n, 0), ck.repeat(N, 1)).view(N, n)
        out.append(s.argmax(-1))
    return torch.stack(out)


def tied_case(K, N, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    codes = F.normalize(torch.randn(K, n, d, generator=g), dim=-1)
    codes[:, n - 1] = codes[:, 1]                          # exact ties, the first index wins
    codes[:, n // 2] = codes[:, n // 3]
    z = F.normalize(torch.randn(K, N, d, generator=g), dim=-1)
    z[:, 0], z[:, -1] = codes[:, 1], codes[:, n // 3]
    if n > 35:                                             # a tie within one lane of the kernel (j = 3 mod 16)
        codes[:, 35] = codes[:, 3]
        z[:, 1] = codes[:, 3]
    return z, codes


@needs_kernel
@each_isa
@pytest.mark.parametrize('d', [4, 8, 16, 5, 12])             # compiled widths and the run-time width
@pytest.mark.parametrize('K,N,n', [(3, 13, 33), (2, 40, 16), (1, 3, 300), (2, 300, 1100)])
@pytest.mark.parametrize('threads', [1, 2, 7])
def test_kernel_is_the_fma_chain_argmax(d, K, N, n, threads, isa):
    # (2, 300, 1100): AVX2 token groups of 256 and code chunks of 32 blocks, both with remainders
    # (69 blocks: two full chunks, then 5 blocks = one unrolled step of 4 and one single block).
    z, codes = tied_case(K, N, n, d, seed=d * 1000 + N)
    got = native.nearest_code(z, native.code_blocks(codes), num_threads=threads, isa=isa)
    assert got.dtype == torch.int64 and got.shape == (K, N)
    assert torch.equal(got, chain_reference(z, codes))
    assert (got[:, 0] == 1).all() and (got[:, -1] == n // 3).all()
    assert n <= 35 or (got[:, 1] == 3).all()


@needs_kernel
@each_isa
@pytest.mark.parametrize('threads', [1, 2, 3, 64])
def test_kernel_equals_float32_matmul_argmax_at_released_sizes(threads, isa):
    """8 x 4096 codes of 8 dims, 2000 tokens (not a multiple of the 8-token groups), parts crossing
    sub-codebooks: equal to the per-codebook matmul argmax wherever this BLAS computes the FMA chain."""
    if not quantizer_module._gemm_is_fma_chain(8):
        pytest.skip('this BLAS does not compute float32 dot products as an in-order FMA chain')
    torch.manual_seed(threads)
    codes = F.normalize(torch.randn(8, 4096, 8), dim=-1)
    z = F.normalize(torch.randn(8, 2000, 8), dim=-1)
    got = native.nearest_code(z, native.code_blocks(codes), num_threads=threads, isa=isa)
    assert torch.equal(got, torch.stack([(z[k] @ codes[k].T).argmax(-1) for k in range(8)]))


@needs_kernel
@each_isa
def test_kernel_handles_empty_inputs_and_non_contiguous_tokens(isa):
    codes = F.normalize(torch.randn(2, 20, 8), dim=-1)
    assert native.nearest_code(torch.empty(2, 0, 8), native.code_blocks(codes), isa=isa).shape == (2, 0)
    z = F.normalize(torch.randn(30, 2, 8), dim=-1).transpose(0, 1)     # (2, 30, 8) view, as the quantizer passes
    assert torch.equal(native.nearest_code(z, native.code_blocks(codes), isa=isa), chain_reference(z, codes))


@needs_kernel
def test_isas_are_what_this_cpu_runs_and_others_are_refused():
    flags = open('/proc/cpuinfo').read().split() if os.path.exists('/proc/cpuinfo') else []
    if flags:
        want = tuple(isa for isa, has in (('avx512', 'avx512f' in flags), ('avx2', 'avx2' in flags and 'fma' in flags))
                     if has)
        assert native.isas() == want
    codes = native.code_blocks(F.normalize(torch.randn(1, 16, 8), dim=-1))
    for isa in {'avx512', 'avx2', 'sse'} - set(native.isas()):
        with pytest.raises(ValueError, match='not one this CPU runs'):
            native.nearest_code(torch.zeros(1, 4, 8), codes, isa=isa)


def test_code_blocks_layout():
    codes = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)
    blocks = native.code_blocks(codes)
    assert blocks.shape == (2, 2, 3, 16)
    assert torch.equal(blocks[1, 0, 2], codes[1, :16, 2])                # coordinate-major blocks of 16 codes
    assert torch.equal(blocks[0, 1, :, 0], codes[0, 16])
    assert blocks[:, 1, :, 1:].isnan().all()                             # padding codes never win


@needs_kernel
@pytest.mark.parametrize('z,blocks,error', [
    (torch.zeros(2, 4, 8, dtype=torch.float64), torch.zeros(2, 1, 8, 16), TypeError),
    (torch.zeros(2, 4, 8), torch.zeros(2, 1, 8, 16, dtype=torch.bfloat16), TypeError),
    (torch.zeros(2, 4, 8), torch.zeros(3, 1, 8, 16), ValueError),
    (torch.zeros(2, 4, 8), torch.zeros(2, 1, 4, 16), ValueError),
    (torch.zeros(2, 4, 8), torch.zeros(2, 1, 8, 8), ValueError),
    (torch.zeros(4, 8), torch.zeros(2, 1, 8, 16), ValueError),
])
def test_kernel_rejects_bad_operands(z, blocks, error):
    with pytest.raises(error):
        native.nearest_code(z, blocks)


@needs_kernel
def test_self_test_accepts_the_kernel_and_the_quantizer_uses_it(monkeypatch):
    if not quantizer_module._gemm_is_fma_chain(8):
        pytest.skip('this BLAS does not compute float32 dot products as an in-order FMA chain')
    assert quantizer_module._native_search_is_exact(8)
    calls = []
    original = native.nearest_code
    monkeypatch.setattr(native, 'nearest_code', lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(8, 4096, 8).eval()
    z = torch.randn(2, 64, 64)
    codes = q.nearest_codes(z)
    want = torch.stack([(F.normalize(c.reshape(-1, 8), dim=-1) @ F.normalize(q.codebook[k].detach(), dim=-1).T)
                        .argmax(-1).view(2, 64) for k, c in enumerate(z.split(8, -1))], 1)
    assert calls and torch.equal(codes, want)


# ---------------------------------------------------------------------------- building and falling back

@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A fresh library cache and no remembered build or self-test; both caches are reset afterwards."""
    monkeypatch.setenv('UNITOK_NATIVE_CACHE', str(tmp_path / 'cache'))
    native._library.cache_clear()
    quantizer_module._native_search_is_exact.cache_clear()
    yield tmp_path / 'cache'
    native._library.cache_clear()
    quantizer_module._native_search_is_exact.cache_clear()


def compile_calls(monkeypatch):
    calls = []
    run = native.subprocess.run

    def counted(args, *a, **k):
        if '-o' in args:
            calls.append(args)
        return run(args, *a, **k)
    monkeypatch.setattr(native.subprocess, 'run', counted)
    return calls


@needs_kernel
def test_build_is_cached_and_reused(fresh_build, monkeypatch):
    calls = compile_calls(monkeypatch)
    assert native.available()
    built = list(fresh_build.iterdir())
    assert len(calls) == 1 and len(built) == 1 and built[0].suffix == '.so'   # no temporary file left
    native._library.cache_clear()
    assert native.available() and len(calls) == 1                             # loaded, not compiled again


@needs_kernel
def test_damaged_cached_library_is_rebuilt(fresh_build, monkeypatch):
    fresh_build.mkdir()
    path = native._build(native._compiler(), fresh_build)          # built, not loaded by this process
    damaged = fresh_build / 'damaged'
    damaged.write_bytes(b'not a shared library')
    damaged.replace(path)
    calls = compile_calls(monkeypatch)
    assert native.available() and len(calls) == 1
    z, codes = tied_case(2, 20, 40, 8, seed=0)
    assert torch.equal(native.nearest_code(z, native.code_blocks(codes)), chain_reference(z, codes))


def search_is_exact_without_kernel():
    assert not native.available()
    assert not quantizer_module._native_search_is_exact(8)
    torch.manual_seed(1)
    q = MultiCodebookQuantizer(8, 4096, 8).eval()
    z = torch.randn(2, 40, 64)
    want = torch.stack([(F.normalize(c.reshape(-1, 8), dim=-1) @ F.normalize(q.codebook[k].detach(), dim=-1).T)
                        .argmax(-1).view(2, 40) for k, c in enumerate(z.split(8, -1))], 1)
    assert torch.equal(q.nearest_codes(z), want)
    with pytest.raises(RuntimeError, match='unavailable'):
        native.nearest_code(z.view(80, 8, 8).transpose(0, 1), native.code_blocks(q.normalized_codebooks()))


def test_no_compiler_falls_back_to_the_pytorch_search(fresh_build, monkeypatch):
    monkeypatch.delenv('CXX', raising=False)
    monkeypatch.setattr(native.shutil, 'which', lambda name: None)
    search_is_exact_without_kernel()


def test_failed_build_warns_leaves_nothing_and_falls_back(fresh_build, monkeypatch, tmp_path, caplog):
    fake = tmp_path / 'broken-g++'
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo broken 1.0; exit 0; }\n'
                    'for a; do [ "$prev" = -o ] && printf half > "$a"; prev=$a; done\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv('CXX', str(fake))
    with caplog.at_level(logging.WARNING, logger='unitok.quantizers.native'):
        search_is_exact_without_kernel()
    assert 'failed' in caplog.text
    assert not any(fresh_build.iterdir())                     # the half-written output was removed


def test_turned_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv('UNITOK_NATIVE', '0')
    search_is_exact_without_kernel()
    assert not fresh_build.exists() or not any(fresh_build.iterdir())


@needs_kernel
@pytest.mark.parametrize('kind', ['a file', 'read-only'])
def test_unusable_cache_folder_builds_in_a_temporary_one(fresh_build, kind, tmp_path, monkeypatch):
    scratch = tmp_path / 'scratch'                           # the process's temporary directory
    scratch.mkdir()
    monkeypatch.setattr(native.tempfile, 'tempdir', str(scratch))
    if kind == 'a file':
        fresh_build.parent.mkdir(exist_ok=True)
        fresh_build.write_text('a file where the cache folder should be')
    else:
        fresh_build.mkdir(parents=True)
        fresh_build.chmod(0o500)
        if os.access(fresh_build, os.W_OK):
            pytest.skip('running as a user who can write to read-only folders (root)')
    try:
        assert native.available()
    finally:
        if kind == 'read-only':
            fresh_build.chmod(0o700)
    if kind == 'a file':
        assert fresh_build.read_text() == 'a file where the cache folder should be'    # left as it was
    else:
        assert not any(fresh_build.iterdir())
    assert not any(scratch.iterdir())                   # the private build was removed once loaded
    z, codes = tied_case(1, 17, 20, 8, seed=1)
    assert torch.equal(native.nearest_code(z, native.code_blocks(codes)), chain_reference(z, codes))


@needs_kernel
def test_stale_temporary_files_of_killed_builds_are_removed(fresh_build):
    import time
    fresh_build.mkdir(parents=True)
    old, recent = fresh_build / '.nearest_code-x.so.a.tmp', fresh_build / '.nearest_code-x.so.b.tmp'
    old.write_bytes(b'half')
    recent.write_bytes(b'half')
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert native.available()
    assert not old.exists() and recent.exists()            # a recent one may belong to a running build
