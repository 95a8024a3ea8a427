"""The quick-start demo wiring: train, evaluate, tokenise, report (a few steps only)."""
import json
import os

import pytest

from unitok.commands import main


@pytest.mark.slow
def test_demo_end_to_end_in_a_few_steps(tmp_path, capsys):
    args = ['demo', '--out', str(tmp_path / 'demo'), '--steps', '2', '--gen-steps', '2', '--gen-limit', '48']
    assert main(args) == 0
    out = capsys.readouterr().out
    assert 'report.html' in out
    summary = json.loads((tmp_path / 'demo' / 'demo_summary.json').read_text())
    assert summary['steps'] == 2 and 'psnr' in summary and 'zero_shot_top1' in summary
    report = json.loads((tmp_path / 'demo' / 'report' / 'report.json').read_text())
    assert report['samples'] == 380 and report['zero_shot_classes'] == 9
    samples = os.listdir(tmp_path / 'demo' / 'samples')
    assert 'codes.npz' in samples and 'reconstructions.png' in samples
    assert len([s for s in samples if s.startswith('val_') and s.endswith('.png')]) == 12
    # generation: a class-conditional generator on the exported codes, a row of samples per category
    from PIL import Image
    from unitok.codes import CodeDataset
    assert summary['gen_steps'] == 2 and summary['gen_chance'] == pytest.approx(1 / 9)
    assert 0 <= summary['gen_consistency_zero_shot'] <= 1 and 0 < summary['gen_nll'] < 2 * summary['gen_nll_uniform']
    assert len(CodeDataset(str(tmp_path / 'demo' / 'codes' / 'train'))) == 48
    grid = Image.open(summary['gen_grid'])
    tile = 4 * (64 + 2)                                    # 64 px samples, 2 px padding, shown at 4x
    assert (grid.width, grid.height) == (8 * tile + 8, 9 * tile + 8)
    assert [k for k in SUMMARY_FIGURES if k not in summary] == [] and summary['gen_judged'] == 9 * 16
    assert [s['title'] for s in report['sections']][0].startswith('Generation')
    assert 'Generation: samples' in (tmp_path / 'demo' / 'report' / 'report.html').read_text()
    # a second run continues the finished trainings instead of starting over
    assert main(args) == 0
    again = json.loads((tmp_path / 'demo' / 'demo_summary.json').read_text())
    assert again['gen_nll'] == summary['gen_nll']
    assert json.loads((tmp_path / 'demo' / 'generator' / 'summary.json').read_text())['step'] == 2


def test_builtin_caption_variants_only_for_training():
    from unitok.data import open_source
    train, val = open_source('builtin:emoji', 'train'), open_source('builtin:emoji', 'val')
    _, captions, _ = train.read(0)
    assert isinstance(captions, list) and captions[0] == train.captions[0] and len(set(captions)) > 3
    _, caption, label = val.read(0)
    assert isinstance(caption, str) and 0 <= label < len(val.classnames) == 9


def test_demo_continues_an_interrupted_training_instead_of_starting_over(tmp_path, monkeypatch):
    """The demo hands ``resume='latest'`` to the trainer when its run has a checkpoint (fast: the
    trainer is replaced by a recorder that stops like an interrupted run)."""
    import unitok.train.loop
    from unitok.train.state import Checkpointer
    calls = []

    class Recorder:
        def __init__(self, cfg, *args, **kwargs):
            self.cfg = cfg
            self.checkpointer = Checkpointer(os.path.join(cfg.out, 'checkpoints'))

        def fit(self, resume=None):
            calls.append(resume)
            return {'exit': 'signal SIGTERM'}
    monkeypatch.setattr(unitok.train.loop, 'Trainer', Recorder)
    out = tmp_path / 'demo'
    assert main(['demo', '--out', str(out), '--steps', '2']) == 143
    ckpt = out / 'train' / 'checkpoints' / 'step_00000001.pt'
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b'')
    assert main(['demo', '--out', str(out), '--steps', '2']) == 143
    assert calls == [None, 'latest']


def test_add_section_puts_a_figure_in_the_report_and_replaces_it_by_title(tmp_path):
    from PIL import Image
    from unitok.eval.report import add_section
    (tmp_path / 'report.json').write_text(json.dumps({'psnr': 20.5, 'meta': {'name': 'tiny'}}))
    add_section(str(tmp_path), 'Generation: samples', Image.new('RGB', (8, 4), (255, 0, 0)), 'first caption')
    add_section(str(tmp_path), 'Generation: samples', Image.new('RGB', (6, 6), (0, 255, 0)), 'second caption')
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['psnr'] == 20.5 and len(report['sections']) == 1
    entry = report['sections'][0]
    assert entry['caption'] == 'second caption' and Image.open(tmp_path / entry['file']).size == (6, 6)
    page = (tmp_path / 'report.html').read_text()
    assert 'second caption' in page and 'first caption' not in page and page.count('<h2>Generation: samples</h2>') == 1
    assert 'border-collapse' in page and '$' not in page          # the shared stylesheet, every field filled


SUMMARY_FIGURES = ('total_minutes', 'stage_minutes', 'cpu_model', 'psnr', 'zero_shot_top1', 'zero_shot_chance',
                   'gen_consistency_zero_shot', 'gen_control_zero_shot', 'gen_chance', 'gen_guidance', 'targets',
                   'targets_met')


def test_demo_summary_holds_the_stage_times_the_cpu_and_every_target_figure(tmp_path, monkeypatch):
    """Issue 27's figures (keys, not values) in ``demo_summary.json``; the stages are replaced by stubs
    that return what the real ones do, so this runs in a second."""
    from unitok.commands import demo
    monkeypatch.setattr(demo, 'fit_to_end', lambda cfg, announce=None: {'exit': 'finished'})
    monkeypatch.setattr(demo, 'run_evaluation', lambda *a, **k: {'psnr': 22.5, 'zero_shot_top1': 0.52,
                                                                 'zero_shot_classes': 9})
    monkeypatch.setattr(demo, 'reconstruct_examples', lambda model_dir, data, samples: samples)

    def generation(*args):                        # the real stage adds its parts' minutes to `stages` (last)
        args[-1].update(export_codes=0.1, train_generator=1.0, sample_and_judge=0.2)
        return {'gen_consistency_zero_shot': 0.6, 'gen_control_zero_shot': 0.12, 'gen_chance': 1 / 9,
                'gen_guidance': 3.0, 'gen_nll': 2.0, 'gen_nll_uniform': 6.2, 'gen_judged': 144, 'gen_grid': 'g.png'}
    monkeypatch.setattr(demo, 'demo_generation', generation)
    assert main(['demo', '--out', str(tmp_path / 'd')]) == 0
    summary = json.loads((tmp_path / 'd' / 'demo_summary.json').read_text())
    assert [k for k in SUMMARY_FIGURES if k not in summary] == []
    assert set(summary['stage_minutes']) == {'train_tokenizer', 'evaluate_tokenizer', 'reconstruct', 'export_codes',
                                             'train_generator', 'sample_and_judge', 'generation'}
    assert set(summary['targets_met']) == set(summary['targets']) == {
        'total_minutes', 'psnr', 'zero_shot_top1', 'gen_consistency_zero_shot', 'gen_control_off_chance'}
    assert summary['recipe'] == 'fast' and summary['cpu_model']
    assert all(summary['targets_met'].values())


def test_targets_met_reads_each_figure_against_its_threshold():
    from unitok.commands.demo import targets_met
    good = {'total_minutes': 14.0, 'psnr': 22.1, 'zero_shot_top1': 0.5, 'gen_consistency_zero_shot': 0.55,
            'gen_control_zero_shot': 0.15, 'gen_chance': 1 / 9}
    assert all(targets_met(good).values())
    for key, bad in (('total_minutes', 15.5), ('psnr', 21.9), ('zero_shot_top1', 0.49),
                     ('gen_consistency_zero_shot', 0.49), ('gen_control_zero_shot', 0.17)):
        met = targets_met({**good, key: bad})
        assert [k for k, ok in met.items() if not ok] == [key.replace('gen_control_zero_shot', 'gen_control_off_chance')]
    assert set(targets_met({'total_minutes': 1, 'psnr': 30, 'zero_shot_top1': 1})) == {
        'total_minutes', 'psnr', 'zero_shot_top1'}


def test_recipe_legacy_trains_the_earlier_128_px_tokenizer(tmp_path, monkeypatch):
    from unitok.commands import demo
    seen = []
    monkeypatch.setattr(demo, 'fit_to_end', lambda cfg, announce=None: seen.append(cfg) or {'exit': 'finished'})
    monkeypatch.setattr(demo, 'run_evaluation', lambda *a, **k: {'psnr': 19.4, 'zero_shot_top1': 0.48})
    monkeypatch.setattr(demo, 'reconstruct_examples', lambda model_dir, data, samples: samples)
    assert main(['demo', '--out', str(tmp_path / 'd'), '--recipe', 'legacy', '--gen-steps', '0']) == 0
    assert (seen[0].preset, seen[0].model['image_size'], seen[0].steps, seen[0].loss.clip) == ('unitok-tiny', 128, 500, 1.0)
    summary = json.loads((tmp_path / 'd' / 'demo_summary.json').read_text())
    assert summary['recipe'] == 'legacy' and 'gen_consistency_zero_shot' not in summary['targets_met']
    assert main(['demo', '--out', str(tmp_path / 'd'), '--gen-steps', '0']) == 0    # the default: 8 px patches
    assert (seen[1].preset, seen[1].model, seen[1].steps, seen[1].loss.clip) == ('unitok-tiny-p8', {}, 1000, 0.1)
    assert main(['demo', '--out', str(tmp_path / 'e'), '--recipe', 'fast-clip0.5', '--gen-steps', '0']) == 0
    assert (seen[2].preset, seen[2].steps, seen[2].loss.clip) == ('unitok-tiny-p8', 900, 0.5)
