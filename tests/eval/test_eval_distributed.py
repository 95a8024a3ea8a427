"""Explicit collectives: with 2 gloo processes and the group passed in, the codebook statistics, the
Fréchet distance, the adaptive GAN weight, the CLIP loss and ``evaluate`` equal one process on all the
data; without it (the default) each process keeps to its own data and runs no collective."""
import os

import pytest
import torch
import torch.nn.functional as F

from unitok.eval import CodebookStats, EvalConfig, FrechetDistance, evaluate
from unitok.losses import ContrastiveLoss, adaptive_generator_weight

WORLD = 2


def _data():
    g = torch.Generator().manual_seed(0)
    return {
        'codes': torch.randint(0, 8, (10, 3, 5), generator=g),
        'features': torch.randn(40, 6, generator=g, dtype=torch.float64),
        'fake_features': torch.randn(40, 6, generator=g, dtype=torch.float64) * 1.5 + 0.2,
        'grad_a': torch.randn(WORLD, 4, generator=g), 'grad_b': torch.randn(WORLD, 4, generator=g),
        'image': F.normalize(torch.randn(8, 16, generator=g), dim=-1),
        'text': F.normalize(torch.randn(8, 16, generator=g), dim=-1),
    }


def _statistics(rank, world, group, sync):
    """Every statistic over this rank's share of _data() (everything when world == 1)."""
    d, out = _data(), {}
    for split in (7, 10):                      # uneven shares; with 10 rank 1 sees no codes at all
        part = d['codes'][:split] if rank == 0 else d['codes'][split:]
        stats = CodebookStats(3, 8, **({'sync_on_compute': True, 'process_group': group} if sync else {}))
        if world == 1:
            part = d['codes']
        if len(part):
            stats.update(part)
        if len(part) or sync:                   # every rank of the group takes part in the merge
            summary = stats.compute()
            out[f'codebook{split}'] = {k: summary[k] for k in ('tokens', 'distinct_code_tuples', 'dead_codes')}
            out[f'counts{split}'] = summary['counts']
    fd = FrechetDistance(6, **({'sync_on_compute': True, 'process_group': group} if sync else {}))
    fd.update(d['features'][rank::world], real=True)
    fd.update(d['fake_features'][rank::world], real=False)
    out['fid'] = float(fd.compute())
    w = torch.nn.Parameter(torch.ones(4))
    a, b = (d['grad_a'][rank], d['grad_b'][rank]) if world > 1 else (d['grad_a'].mean(0), d['grad_b'].mean(0))
    out['adaptive'] = float(adaptive_generator_weight((w * a).sum(), (w * b).sum(), w, sync=sync, process_group=group))
    loss = ContrastiveLoss(rank=rank, world_size=world) if sync else ContrastiveLoss()
    out['clip'] = float(loss(d['image'][rank::world], d['text'][rank::world], torch.tensor(5.0)))
    return out


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        group = dist.new_group(list(range(WORLD)))
        from test_eval_subsets import KnownAccuracyModel, SortedSource
        results = {'synced': _statistics(rank, WORLD, group, sync=True),
                   'local': _statistics(rank, WORLD, group, sync=False)}
        cfg = EvalConfig(metrics=('psnr', 'l1', 'zero_shot', 'codebook'), max_samples=12, batch_size=4)
        m = evaluate(KnownAccuracyModel(shift=0.1), SortedSource(), cfg, process_group=group).metrics
        results['evaluate'] = {k: v for k, v in m.items() if k != 'seconds'}
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_with_the_group_equal_one_without(tmp_path):
    import torch.multiprocessing as mp
    from test_eval_subsets import KnownAccuracyModel, SortedSource
    mp.start_processes(_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=WORLD, start_method='spawn')
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(WORLD)]
    one = _statistics(0, 1, None, sync=False)
    for r in ranks:
        s = r['synced']
        for split in (7, 10):
            if f'codebook{split}' in s:
                assert s[f'codebook{split}'] == one[f'codebook{split}']                   # exact counts
                assert torch.equal(s[f'counts{split}'], one[f'counts{split}'])
        assert s['fid'] == pytest.approx(one['fid'], rel=1e-9)
        assert s['adaptive'] == pytest.approx(one['adaptive'], rel=1e-6)
    assert 'codebook10' not in ranks[1]['local']                  # rank 1's share is empty, yet it merges above
    # open_clip's local loss: the ranks' mean is the loss of the global batch
    assert sum(r['synced']['clip'] for r in ranks) / WORLD == pytest.approx(one['clip'], rel=1e-6)
    # default: no collective -- each rank's own share only
    for r in ranks:
        assert r['local']['codebook7']['tokens'] < one['codebook7']['tokens']
        assert r['local']['fid'] != pytest.approx(one['fid'], rel=1e-3)
        assert r['local']['adaptive'] != pytest.approx(one['adaptive'], rel=1e-3)
    cfg = EvalConfig(metrics=('psnr', 'l1', 'zero_shot', 'codebook'), max_samples=12, batch_size=4)
    alone = evaluate(KnownAccuracyModel(shift=0.1), SortedSource(), cfg).metrics
    for r in ranks:
        for key, value in r['evaluate'].items():
            assert value == pytest.approx(alone[key], rel=1e-6, abs=1e-12), key
    assert ranks[0]['evaluate']['samples'] == 12
