"""Samples files of the generator evaluation (unitok.eval.samples): the format round-trips, a second
evaluation reuses them without sampling and gives the same numbers, other settings or a damaged file
re-sample, and a damaged file read directly is one clear error."""
import json
import logging

import numpy as np
import pytest
import torch

import unitok
from unitok.data import open_source
from unitok.eval.generation import GenEvalConfig, evaluate_generator
from unitok.eval.samples import Sampler, SamplesFileError, read_samples, samples_path, write_samples
from unitok.generation import GeneratorConfig, GeneratorModel


def _generator(num_classes=9, seed=0):
    torch.manual_seed(seed)
    gen = GeneratorModel(GeneratorConfig.from_preset('gen-tiny', num_classes=num_classes, dim=64, num_heads=2,
                                                     depth=2, grid=(4, 4)))
    with torch.no_grad():                 # zero-initialised heads sample uniform codes: give them some structure
        for p in gen.head.parameters():
            p.normal_(0, 0.5)
    return gen.eval()


def _cfg(**kw):
    return GenEvalConfig(**{**dict(samples_per_class=2, cfg_scales=(1.0,), chunk_size=4), **kw})


class Counting(Sampler):
    """A Sampler that counts its calls to the generator."""
    calls = 0

    def sample(self, scale):
        Counting.calls += 1
        return super().sample(scale)


# ---------------------------------------------------------------------- the file format
@pytest.mark.parametrize('vocab', [4096, 70000])            # int16 and int32 storage
def test_samples_file_round_trips(tmp_path, vocab):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, vocab, (6, 8, 4, 4), generator=g)
    labels = torch.arange(6) // 2
    header = {'format': 'unitok-generator-samples', 'version': 1, 'seed': 3, 'cfg_scale': 1.5, 'grid': [4, 4]}
    path = str(tmp_path / 's' / 'cfg-1.5.npz')
    write_samples(path, codes, labels, header)
    c, y, h = read_samples(path)
    assert torch.equal(c, codes) and c.dtype == torch.int64
    assert torch.equal(y, labels) and h == header
    assert not np.load(path, allow_pickle=False)['codes'].dtype == np.int64      # stored small
    assert [p.name for p in (tmp_path / 's').iterdir()] == ['cfg-1.5.npz']      # no temporary file left


def test_a_damaged_samples_file_is_one_clear_error(tmp_path):
    good = str(tmp_path / 'good.npz')
    write_samples(good, torch.zeros(2, 1, 2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                  {'format': 'unitok-generator-samples', 'version': 1})
    data = open(good, 'rb').read()
    cases = {'truncated.npz': data[:len(data) // 2], 'garbage.npz': b'not a zip at all',
             'empty.npz': b''}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.savez(tmp_path / 'nokeys.npz', codes=np.zeros((2, 1, 2, 2), np.int16))
    np.savez(tmp_path / 'other.npz', codes=np.zeros((2, 1, 2, 2), np.int16), labels=np.zeros(2, np.int32),
             header=np.frombuffer(json.dumps({'format': 'something else'}).encode(), np.uint8))
    np.savez(tmp_path / 'shape.npz', codes=np.zeros((2, 4), np.int16), labels=np.zeros(2, np.int32),
             header=np.frombuffer(json.dumps({'format': 'unitok-generator-samples', 'version': 1}).encode(), np.uint8))
    for name in [*cases, 'nokeys.npz', 'other.npz', 'shape.npz']:
        with pytest.raises(SamplesFileError, match=name):
            read_samples(str(tmp_path / name))


# ---------------------------------------------------------------------- reuse and re-sampling
def test_a_matching_file_is_reused_and_other_settings_resample(tmp_path, monkeypatch, caplog):
    gen = _generator()
    Counting.calls = 0
    first = Counting(gen, _cfg(), str(tmp_path)).codes(1.0)
    assert Counting.calls == 1 and first.shape == (18, 8, 4, 4)
    assert torch.equal(first, Sampler(gen, _cfg()).codes(1.0))                 # in memory: the same codes
    assert torch.equal(read_samples(samples_path(str(tmp_path), 1.0))[0], first)
    assert torch.equal(Counting(gen, _cfg(batch_size=5), str(tmp_path)).codes(1.0), first)   # no decisive change
    assert Counting.calls == 1
    with caplog.at_level(logging.WARNING, logger='unitok.eval.samples'):
        other = Counting(gen, _cfg(seed=1), str(tmp_path)).codes(1.0)
    assert Counting.calls == 2 and 'seed: 0 -> 1' in caplog.text and not torch.equal(other, first)
    assert read_samples(samples_path(str(tmp_path), 1.0))[2]['seed'] == 1      # rewritten
    for changed in (dict(temperature=0.5), dict(top_k=5), dict(top_p=0.9), dict(chunk_size=3)):
        Counting(gen, _cfg(seed=1, **changed), str(tmp_path)).codes(1.0)
    assert Counting.calls == 6
    Counting(_generator(seed=1), _cfg(seed=1, chunk_size=3), str(tmp_path)).codes(1.0)    # other weights
    assert Counting.calls == 7 and 'generator_sha256' in caplog.text


def test_a_damaged_or_foreign_file_is_sampled_again(tmp_path, caplog):
    gen = _generator()
    path = samples_path(str(tmp_path), 2.0)
    fresh = Sampler(gen, _cfg(), str(tmp_path)).codes(2.0)
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 3])                             # an interrupted copy
    Counting.calls = 0
    with caplog.at_level(logging.WARNING, logger='unitok.eval.samples'):
        again = Counting(gen, _cfg(), str(tmp_path)).codes(2.0)
    assert Counting.calls == 1 and torch.equal(again, fresh) and 'cannot read samples file' in caplog.text
    assert torch.equal(read_samples(path)[0], fresh)                          # repaired
    codes, labels, header = read_samples(path)
    write_samples(path, codes[:-1], labels[:-1], header)                      # same header, fewer samples
    assert torch.equal(Counting(gen, _cfg(), str(tmp_path)).codes(2.0), fresh)
    assert Counting.calls == 2 and 'for a plan of 18 samples' in caplog.text
    write_samples(path, codes, labels.flip(0), header)                         # other conditions
    Counting(gen, _cfg(), str(tmp_path)).codes(2.0)
    assert Counting.calls == 3


# ---------------------------------------------------------------------- the whole evaluation
class PooledPixels(torch.nn.Module):
    """A cheap stand-in for a feature extractor (uint8 images -> 4x4 mean colours, 48-d)."""
    name, dim = 'pooled', 48

    def forward(self, u8):
        return torch.nn.functional.adaptive_avg_pool2d(u8.float() / 255, 4).flatten(1), None


def _evaluate(gen, tok, samples_dir):
    cfg = GenEvalConfig(samples_per_class=2, cfg_scales=(1.0, 2.0), chunk_size=5, batch_size=7, max_real=18,
                        max_train=18, kid_subsets=5, grid_samples=1)
    src = open_source('builtin:emoji', 'val')
    return evaluate_generator(gen, tok, src, open_source('builtin:emoji', 'train'), cfg, classnames=src.classnames,
                              samples_dir=samples_dir, generator_path='gen/model')


def test_a_second_evaluation_reads_the_samples_and_gives_the_same_numbers(tmp_path, monkeypatch):
    import unitok.eval.features as F
    monkeypatch.setattr(F, 'build_extractor', lambda name, weights=None: PooledPixels())
    torch.manual_seed(0)
    tok = unitok.create_model('unitok-tiny').eval()
    gen = _generator()
    memory = _evaluate(gen, tok, None)
    assert not list(tmp_path.iterdir())
    first = _evaluate(gen, tok, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['cfg-1.npz', 'cfg-2.npz']
    assert read_samples(str(tmp_path / 'cfg-2.npz'))[2]['generator'] == 'gen/model'

    def no_sampling(self, scale):
        raise AssertionError('sampled although the samples file matches')
    monkeypatch.setattr(Sampler, 'sample', no_sampling)
    second = _evaluate(gen, tok, str(tmp_path))
    for result in (first, second):
        assert {k: v for k, v in result.metrics.items() if k != 'seconds'} == \
            {k: v for k, v in memory.metrics.items() if k != 'seconds'}
        assert all(torch.equal(result.grids[s], memory.grids[s]) for s in memory.grids)
