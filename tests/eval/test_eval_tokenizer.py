"""Evaluation: the Fréchet distance against float64 references, batch-size and process-count
independence, metric sanity, the HTML report in a headless browser."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import unitok
from unitok.data import open_source
from unitok.eval import CodebookStats, EvalConfig, FrechetDistance, evaluate, write_report
from unitok.eval.metrics.zero_shot import retrieval_recall, topk_correct


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula with scipy's matrix square root, in float64."""
    from scipy import linalg
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize('n,dim,shift', [(500, 64, 0.3), (2000, 256, 0.05), (300, 32, 2.0)])
def test_frechet_distance_matches_scipy_and_torch_fidelity(n, dim, shift):
    rng = np.random.default_rng(dim)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = rng.normal(size=(n, dim)) @ mix
    b = (rng.normal(size=(n, dim)) + shift) @ (mix + 0.1 * rng.normal(size=(dim, dim)) / np.sqrt(dim))
    fd = FrechetDistance(dim)
    for chunk in np.array_split(a, 7):          # any batching gives the same statistics
        fd.update(torch.from_numpy(chunk).float(), real=True)
    fd.update(torch.from_numpy(b), real=False)
    ours = fd.compute()
    assert ours.dtype == torch.float64
    ours = float(ours)
    ref = _reference_fid(a, b)
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    tf = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(a)),
                                  fid_features_to_statistics(torch.from_numpy(b)), verbose=False)
    assert abs(ours - tf['frechet_inception_distance']) <= 1e-6 * abs(ref)


def test_frechet_distance_of_identical_sets_is_zero():
    x = torch.randn(400, 16, dtype=torch.float64)
    fd = FrechetDistance(16)
    fd.update(x, real=True)
    fd.update(x, real=False)
    assert abs(float(fd.compute())) < 1e-9


def test_topk_and_retrieval():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 2, -1]), ks=(1, 2)) == {1: 1, 2: 2}
    f = torch.eye(3)
    r = retrieval_recall(f, f, ['a', 'b', 'c'], ks=(1,))
    assert r['recall@1'] == 1.0
    r = retrieval_recall(f, f[[1, 0, 2]], ['a', 'b', 'c'], ks=(1, 2))   # texts swapped for a and b
    assert r['image_to_text_recall@1'] == pytest.approx(1 / 3) and r['image_to_text_recall@2'] == 1.0
    # duplicate captions count as the same text
    r = retrieval_recall(f, f[[0, 0, 2]], ['a', 'a', 'c'], ks=(1,))
    assert r['image_to_text_recall@1'] == 1.0


def test_codebook_stats():
    s = CodebookStats(2, 8)
    s.update(torch.tensor([[[0, 1, 1, 3], [7, 7, 7, 7]]]))     # (B=1, K=2, L=4)
    s.update(torch.tensor([[[0, 1, 2, 3], [7, 6, 7, 7]]]))
    out = s.compute()
    assert out['per_codebook'][0]['usage'] == 4 / 8 and out['per_codebook'][1]['usage'] == 2 / 8
    assert out['dead_codes'] == 4 + 6 and out['tokens'] == 8
    assert out['distinct_code_tuples'] == len({(0, 7), (1, 7), (3, 7), (1, 6), (2, 7)})
    assert out['per_codebook'][1]['perplexity'] == pytest.approx(np.exp(-(7 / 8 * np.log(7 / 8) + 1 / 8 * np.log(1 / 8))))


@pytest.fixture(scope='module')
def trained_tiny(tmp_path_factory):
    """A few steps of training, so that reconstructions and features are not degenerate."""
    from train_helpers import tiny_config
    from unitok.train import Trainer
    out = tmp_path_factory.mktemp('tiny')
    Trainer(tiny_config(out / 'run', steps=3, **{'loss.discriminator': 'none'})).fit()
    return str(out / 'run' / 'model')


def _eval(model_dir, batch_size, **kw):
    model = unitok.UniTok.from_pretrained(model_dir)
    cfg = EvalConfig(batch_size=batch_size, max_samples=96, **kw)
    return evaluate(model, open_source('builtin:emoji', 'val'), cfg)


def test_metrics_do_not_depend_on_batch_size(trained_tiny):
    a = _eval(trained_tiny, 8).metrics
    b = _eval(trained_tiny, 64).metrics
    for key in ('psnr', 'ssim', 'rfid_effnet-lite0', 'zero_shot_top1', 'zero_shot_top5', 'recall@1',
                'codebook_usage', 'codebook_perplexity', 'distinct_code_tuples'):
        assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert a['samples'] == b['samples'] == 96


def test_metric_values_are_sane(trained_tiny):
    m = _eval(trained_tiny, 32, metrics=('psnr', 'ssim', 'rfid', 'zero_shot', 'retrieval', 'codebook')).metrics
    assert 0 < m['psnr'] < 60 and -1 <= m['ssim'] <= 1 and m['rfid_effnet-lite0'] > 0
    assert 0 <= m['zero_shot_top1'] <= m['zero_shot_top5'] <= 1 and m['zero_shot_classes'] == 9
    assert 0 < m['codebook_usage'] <= 1 and m['distinct_code_tuples'] >= 1


def test_identical_images_give_zero_distances(trained_tiny):
    """With the identity as 'tokenizer' the reconstruction metrics hit their ideal values."""
    model = unitok.UniTok.from_pretrained(trained_tiny)
    original = model.analyze

    def perfect(x):
        codes, _, feats = original(x)
        return codes, x.clone(), feats
    model.analyze = perfect
    m = evaluate(model, open_source('builtin:emoji', 'val'), EvalConfig(max_samples=40, metrics=('psnr', 'ssim', 'rfid'))).metrics
    # rank-deficient covariances (40 samples, 1280 dims) leave float64 eigenvalue noise of ~1e-5
    assert m['psnr'] > 100 and m['ssim'] == pytest.approx(1.0, abs=1e-4) and abs(m['rfid_effnet-lite0']) < 1e-3


def test_unreadable_images_are_skipped_and_listed(tmp_path, trained_tiny):
    source = open_source('builtin:emoji', 'val')
    root = tmp_path / 'imgs'
    root.mkdir()
    for i in range(10):
        source.read(i)[0].save(root / f'{i}.png')
    (root / 'broken.png').write_bytes(b'\x89PNG garbage')
    model = unitok.UniTok.from_pretrained(trained_tiny)
    result = evaluate(model, open_source(f'folder:{root}', 'val'), EvalConfig(metrics=('psnr', 'codebook')))
    assert result.metrics['samples'] == 10 and result.metrics['skipped'] == 1
    assert 'broken.png' in result.skipped[0]
    report = write_report(str(tmp_path / 'out'), result, {'name': 'tiny', 'data': str(root)})
    assert report['skipped_files'] == result.skipped


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, trained_tiny):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    base = ['eval', '--model', trained_tiny, '--data', 'builtin:emoji', '--max-samples', '64', '--batch-size', '16']
    one = subprocess.run([sys.executable, '-m', 'unitok.cli', *base, '--out', str(tmp_path / 'one')], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          '-m', 'unitok.cli', *base, '--out', str(tmp_path / 'two')], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / 'one' / 'report.json').read_text())
    b = json.loads((tmp_path / 'two' / 'report.json').read_text())
    assert b['meta']['processes'] == 2
    for key in ('psnr', 'ssim', 'rfid_effnet-lite0', 'zero_shot_top1', 'recall@1', 'recall@5', 'codebook_usage',
                'codebook_perplexity', 'distinct_code_tuples', 'samples'):
        assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a[key], b[key])


INCEPTION = os.environ.get('UNITOK_INCEPTION_WEIGHTS')


def _fid_ours_and_torch_fidelity(tmp_path, weights, n=50):
    """FID of two folders of ``n`` held-out emoji each, through our extractor and through torch-fidelity."""
    import torch_fidelity
    from unitok.eval.features import build_extractor
    source = open_source('builtin:emoji', 'val')
    for d, offset in (('a', 0), ('b', 60)):
        (tmp_path / d).mkdir()
        for i in range(n):
            source.read(i + offset)[0].save(tmp_path / d / f'{i}.png')
    extractor = build_extractor('inception', weights)
    fd = FrechetDistance(2048)
    for d, real in (('a', True), ('b', False)):
        x = unitok.images.to_tensor([str(tmp_path / d / f'{i}.png') for i in range(n)], resize='none')
        fd.update(extractor(unitok.images.to_uint8_tensor(x))[0], real=real)
    ours = float(fd.compute())
    ref = torch_fidelity.calculate_metrics(input1=str(tmp_path / 'a'), input2=str(tmp_path / 'b'), fid=True,
                                           feature_extractor_weights_path=weights, cache=False, cuda=False,
                                           save_cpu_ram=True, verbose=False)
    return ours, ref['frechet_inception_distance']


def test_inception_pipeline_matches_torch_fidelity_with_stand_in_weights(tmp_path):
    """Offline: the same comparison with randomly initialised weights in the release layout. It checks
    our side of the pipeline (PNG -> uint8 -> extractor -> float64 statistics -> distance), not the
    network, which is torch-fidelity's own class in both."""
    from unittest import mock
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    empty = tmp_path / 'empty.pth'
    torch.save({}, empty)
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, 'load_state_dict', lambda self, *a, **k: None):
        net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'], feature_extractor_weights_path=str(empty))
    weights = tmp_path / 'stand_in_inception.pth'
    torch.save(net.state_dict(), weights)
    ours, ref = _fid_ours_and_torch_fidelity(tmp_path, str(weights), n=30)
    assert ref > 0
    assert ours == pytest.approx(ref, rel=1e-4)


@pytest.mark.skipif(not INCEPTION or not os.path.isfile(INCEPTION or ''),
                    reason='FID Inception weights are not available offline; set UNITOK_INCEPTION_WEIGHTS to '
                           'weights-inception-2015-12-05-6726825d.pth to run this comparison')
def test_inception_fid_matches_torch_fidelity(tmp_path):
    ours, ref = _fid_ours_and_torch_fidelity(tmp_path, INCEPTION)
    assert ours == pytest.approx(ref, rel=1e-4)


def _chromium():
    return shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')


@pytest.mark.skipif(not _chromium(), reason='headless Chromium is not installed (apt-get install chromium)')
def test_html_report_renders_in_headless_chromium(tmp_path, trained_tiny):
    from PIL import Image
    model = unitok.UniTok.from_pretrained(trained_tiny)
    result = evaluate(model, open_source('builtin:emoji', 'val'), EvalConfig(max_samples=32))
    write_report(str(tmp_path / 'out'), result, {'name': 'tiny', 'data': 'builtin:emoji'})
    shot = tmp_path / 'shot.png'
    subprocess.run([_chromium(), '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                    '--disable-background-networking', '--disable-component-update', '--disable-sync',
                    f'--user-data-dir={tmp_path / "profile"}', f'--screenshot={shot}', '--window-size=1200,2600',
                    f'file://{tmp_path / "out" / "report.html"}'], capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert('RGB')).astype(np.int16)
    assert image.std() > 10                                           # not blank
    # the grid of emoji and the usage plots are drawn: strong colour (not text/table grey) on the page
    saturation = image.max(-1) - image.min(-1)
    assert (saturation > 80).mean() > 0.01
    html = (tmp_path / 'out' / 'report.html').read_text()
    assert html.count('data:image/png;base64,') == 2 and 'zero_shot_top1' in html


def test_kid_and_inception_score_sanity():
    from unitok.eval import inception_score, kernel_inception_distance
    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 32, generator=g)
    same, _ = kernel_inception_distance(a, a.clone(), subsets=10, subset_size=200)
    shifted, _ = kernel_inception_distance(a, a + 1.0, subsets=10, subset_size=200)
    assert abs(same) < 0.05 and shifted > 10 * max(abs(same), 1e-3)
    uniform, _ = inception_score(torch.zeros(100, 10), splits=5)
    confident, _ = inception_score(torch.eye(10).repeat(10, 1) * 50, splits=5)
    assert uniform == pytest.approx(1.0) and confident == pytest.approx(10.0, rel=1e-3)


def test_lpips_without_weights_names_the_eval_option(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"metric 'lpips' needs LPIPS-VGG weights in a local file: pass "
                                         r'--lpips-weights PATH \(EvalConfig.lpips_weights\)'):
        EvalConfig(metrics=('psnr', 'lpips')).validate()
    with pytest.raises(FileNotFoundError, match="--lpips-weights .*no file or folder at 'missing.pth', and not a hub id"):
        EvalConfig(metrics=('lpips',), lpips_weights='missing.pth').validate()
    from unitok.cli import main
    rc = main(['eval', '--model', str(tmp_path / 'no-model'), '--data', 'builtin:emoji', '--metrics', 'lpips',
               '--out', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert rc == 2 and '--lpips-weights PATH' in err and 'loss.lpips_path' not in err
