"""Generator evaluation (unitok.eval.generation, `unitok eval-gen`): metric values on constructed
features with known answers, and the whole evaluation on a tiny random tokenizer and generator
(batch-size invariance, report files, clear errors)."""
import json

import pytest
import torch

import unitok
from unitok.cli import main as cli
from unitok.data import open_source
from unitok.eval.generation import (GenEvalConfig, GenEvalError, LinearProbe, consistency, copy_statistics,
                                    evaluate_generator, kid_interval, load_generator, precision_recall,
                                    sample_chunks)
from unitok.generation import GeneratorConfig, GeneratorModel
from unitok.codes import tokenizer_identity
from train_helpers import saved_tiny_tokenizer


# ---------------------------------------------------------------------- metrics with known answers
def test_precision_recall_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=g)
    assert precision_recall(a, a.clone()) == (1.0, 1.0)                    # identical sets
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)                    # disjoint, far apart
    # real: two far clusters; fakes from one of them only (mode dropping): precision 1, recall 1/2
    two = torch.cat([a[:32], a[32:] + 100.0])
    assert precision_recall(two, a[:32] + 0.01) == (1.0, 0.5)
    # one in four fakes far away: precision 3/4 exactly
    fake = a.clone()
    fake[::4] += 100.0
    assert precision_recall(a, fake)[0] == 0.75
    with pytest.raises(ValueError, match='more than 3 samples'):
        precision_recall(a[:3], a)


def test_kid_interval_contains_its_mean_and_separates_sets():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(80, 8, generator=g), torch.randn(80, 8, generator=g)
    same = kid_interval(a, b, subsets=50, seed=0)
    shifted = kid_interval(a, b + 2.0, subsets=50, seed=0)
    assert same['low'] <= same['mean'] <= same['high'] and same['subset_size'] == 40
    assert same['high'] > same['low']                                       # half-size subsets differ
    assert shifted['low'] > same['high']                                    # a shift is far outside
    assert kid_interval(a, b, subsets=50, seed=0) == same                   # seeded


def test_copy_rate_is_one_for_training_images_and_zero_for_noise():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(9, 32, generator=g) * 3
    train = centres.repeat(20, 1) + torch.randn(180, 32, generator=g)
    held = centres.repeat(5, 1) + torch.randn(45, 32, generator=g)
    copies = copy_statistics(train[:40], train, held)
    assert copies['copy_rate'] == 1.0 and copies['nn_distance_ratio'] < 1e-6
    noise = copy_statistics(torch.randn(40, 32, generator=g) * 5, train, held)
    assert noise['copy_rate'] == 0.0 and noise['nn_distance_ratio'] > 1.0
    fresh = copy_statistics(centres.repeat(5, 1) + torch.randn(45, 32, generator=g), train, held)
    assert fresh['copy_rate'] < 0.2 and 0.7 < fresh['nn_distance_ratio'] < 1.4    # like new real images


def test_linear_probe_separates_classes_and_the_control_sits_at_chance():
    g = torch.Generator().manual_seed(3)
    C = 5
    centres = torch.randn(C, 20, generator=g) * 4
    labels = torch.arange(C).repeat_interleave(40)
    x = centres[labels] + torch.randn(len(labels), 20, generator=g)
    probe = LinearProbe(x, labels, C)
    test_labels = torch.arange(C).repeat_interleave(200)
    test = centres[test_labels] + torch.randn(len(test_labels), 20, generator=g)
    acc, control = consistency(probe.predict(test), test_labels, seed=0)
    assert acc > 0.97
    assert abs(control - 1 / C) < 0.05
    # a probe of random labels is no better than chance on new data
    rand = LinearProbe(x, torch.randint(C, (len(labels),), generator=g), C)
    assert consistency(rand.predict(test), test_labels)[0] < 0.35


def test_sample_plan_is_fixed_by_chunks_not_batches():
    plan = sample_chunks(3, 5, 4, seed=0)
    assert [(lo, hi) for lo, hi, _ in plan] == [(0, 4), (4, 8), (8, 12), (12, 15)]
    assert len({s for *_, s in plan}) == 4 and plan == sample_chunks(3, 5, 4, seed=0)
    assert plan[0][2] != sample_chunks(3, 5, 4, seed=1)[0][2]


# ---------------------------------------------------------------------- the whole evaluation
class PooledPixels(torch.nn.Module):
    """A cheap per-sample stand-in for a feature extractor (uint8 images -> 4x4 mean colours, 48-d):
    the Fréchet distance of 1280-d EfficientNet features costs ~10 s per call on two CPU cores."""
    name, dim = 'pooled', 48

    def forward(self, u8):
        return torch.nn.functional.adaptive_avg_pool2d(u8.float() / 255, 4).flatten(1), None


@pytest.fixture
def cheap_features(monkeypatch):
    import unitok.eval.features as F
    monkeypatch.setattr(F, 'build_extractor', lambda name, weights=None: PooledPixels())


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp('evalgen')
    tok = saved_tiny_tokenizer(root)
    gen = GeneratorModel(GeneratorConfig.from_preset('gen-tiny', num_classes=9, dim=64, num_heads=2, depth=2,
                                                     grid=(4, 4)))
    with torch.no_grad():                 # zero-initialised heads sample uniform codes: give them some structure
        for p in gen.head.parameters():
            p.normal_(0, 0.5)
    gen.save_pretrained(str(root / 'model'))
    classnames = open_source('builtin:emoji', 'val').classnames
    info = {'classnames': classnames, 'label_set': None, 'tokenizer': str(root / 'tokenizer'), 'codes': None,
            'codes_tokenizer': tokenizer_identity(tok)}
    (root / 'model' / 'generation.json').write_text(json.dumps(info))
    return root


def _run(root, batch_size, **kw):
    gen, tok, info = load_generator(str(root / 'model'))
    base = dict(samples_per_class=2, cfg_scales=(1.0, 2.0), chunk_size=9, batch_size=batch_size, max_real=27,
                max_train=45, kid_subsets=10, grid_samples=2)
    cfg = GenEvalConfig(**{**base, **kw})
    return evaluate_generator(gen, tok, open_source('builtin:emoji', 'val'), open_source('builtin:emoji', 'train'),
                              cfg, classnames=info['classnames'])


def _numbers(d, prefix=''):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f'{prefix}{k}.'))
        elif isinstance(v, list):
            for i, m in enumerate(v):
                out.update(_numbers(m, f'{prefix}{k}[{i}].'))
        elif isinstance(v, (int, float)) and k != 'seconds':
            out[prefix + k] = v
    return out


@pytest.mark.slow
def test_metrics_do_not_depend_on_batch_size(models, cheap_features):
    a, b = _run(models, 4), _run(models, 13)
    na, nb = _numbers(a.metrics), _numbers(b.metrics)
    assert na.keys() == nb.keys() and len(na) > 40
    for k in na:
        assert abs(na[k] - nb[k]) <= 1e-6 * max(1.0, abs(na[k])), (k, na[k], nb[k])
    for s in a.grids:
        assert torch.equal(a.grids[s], b.grids[s])
    m = a.metrics
    assert m['classes'] == 9 and m['samples_per_scale'] == 18 and m['held_out_images'] == 27
    assert m['train_images'] == 45 and m['floors']['real_vs_real']['samples'] == 18
    assert [s['cfg_scale'] for s in m['sweep']] == [1.0, 2.0]
    assert set(m['held_out_nll']) >= {f'nll_{k}' for k in range(8)} and m['held_out_nll']['samples'] == 27
    for s in m['sweep']:
        assert s['fd_effnet-lite0'] > 0 and 0 <= s['precision_effnet-lite0'] <= 1
        assert s['kid_effnet-lite0_low'] <= s['kid_effnet-lite0_high']
        assert 0 <= s['copy_rate'] <= 1 and s['nn_distance_ratio'] > 0
    assert a.grids[1.0].shape == (9, 2, 3, 64, 64)
    # reconstructions of a random tokenizer are far from the images; train vs held-out is closer
    floors = m['floors']
    assert floors['real_vs_real']['fd_effnet-lite0'] < floors['reconstruction_vs_real']['fd_effnet-lite0']


@pytest.mark.slow
def test_samples_change_with_the_seed(models, cheap_features):
    a = _run(models, 8, cfg_scales=(1.0,))
    other_seed = _run(models, 8, cfg_scales=(1.0,), seed=1)
    assert not torch.equal(a.grids[1.0], other_seed.grids[1.0])
    assert a.metrics['sweep'][0]['fd_effnet-lite0'] != other_seed.metrics['sweep'][0]['fd_effnet-lite0']


def test_held_out_nll_matches_the_generator_loss(models, cheap_features):
    """The NLL is the per-sample mean of GeneratorModel.loss over the held-out images' codes."""
    m = _run(models, 9, cfg_scales=(1.0,), samples_per_class=1, grid_samples=0).metrics
    gen, tok, _ = load_generator(str(models / 'model'))
    from unitok.data import eval_transform
    from unitok.eval.subsets import subset_indices
    from unitok.images import to_uint8_tensor
    src = open_source('builtin:emoji', 'val')
    idx = subset_indices(len(src), 27, src.labels, 0)
    x = torch.stack([eval_transform(64)(src.read(i)[0]) for i in idx])
    codes = tok.encode(to_uint8_tensor(x).float().div(127.5).sub(1)).view(27, 8, 4, 4)
    _, ref = gen.eval().loss(codes, torch.tensor([src.labels[i] for i in idx]))
    for k in range(8):
        assert m['held_out_nll'][f'nll_{k}'] == pytest.approx(float(ref[f'nll_{k}']), rel=1e-5)


@pytest.mark.slow
def test_eval_gen_command_writes_the_report(models, tmp_path):
    out = tmp_path / 'eval'
    assert cli(['eval-gen', '--gen', str(models / 'model'), '--data', 'builtin:emoji', '--out', str(out),
                '--samples-per-class', '2', '--cfg', '1.0,1.5', '--max-real', '18', '--max-train', '27', '--chunk-size', '9',
                '--batch-size', '7']) == 0
    report = json.loads((out / 'report.json').read_text())
    assert [s['cfg_scale'] for s in report['sweep']] == [1.0, 1.5]
    assert set(report) >= {'sweep', 'floors', 'ceilings', 'held_out_nll', 'chance', 'meta'}
    assert report['meta']['protocol']['chunk_size'] == 9
    page = (out / 'report.html').read_text()
    assert 'Guidance sweep' in page and page.count('data:image/png;base64,') == 3      # plot + 2 grids
    assert 'not FID' in page and 'FID (Inception' not in page
    assert (out / 'sweep.png').exists() and (out / 'samples_cfg1.5.png').exists()


def test_bad_inputs_get_one_clear_error(models, tmp_path, capsys, cheap_features):
    base = ['eval-gen', '--gen', str(models / 'model'), '--out', str(tmp_path / 'o')]
    assert cli(base + ['--data', 'builtin:emoji:subcategory', '--samples-per-class', '1']) == 2
    assert 'other classes' in capsys.readouterr().err
    assert cli(base + ['--data', 'builtin:emoji', '--samples-per-class', '0']) == 2
    assert 'samples_per_class' in capsys.readouterr().err
    assert cli(base + ['--data', str(tmp_path)]) == 2                  # a folder without train/ and val/
    assert 'no distinct train and val splits' in capsys.readouterr().err
    other = unitok.create_model('unitok-tiny', codebook_size=256)
    other.save_pretrained(str(tmp_path / 'other'))
    assert cli(base + ['--data', 'builtin:emoji', '--tokenizer', str(tmp_path / 'other')]) == 2
    assert 'not the tokenizer' in capsys.readouterr().err
    with pytest.raises(GenEvalError, match='cfg_scales'):
        GenEvalConfig(cfg_scales=(1.0, 1.0)).validate()
    with pytest.raises(SystemExit):
        cli(base + ['--data', 'builtin:emoji', '--cfg', 'strong'])
