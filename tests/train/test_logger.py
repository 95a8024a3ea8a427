"""unitok.train.logger: after a resume every step appears once in metrics.jsonl."""
import json

from unitok.train.logger import MetricsLogger


def test_resume_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    rows = [{'step': s, 'kind': k, 'loss': s / 10} for s in range(1, 6) for k in ('train', 'val')]
    text = ''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 6, "kind": "tr'    # a line cut by kill -9
    (tmp_path / 'metrics.jsonl').write_text(text)
    logger = MetricsLogger(str(tmp_path), enabled=True, total_steps=10, start_step=3)
    for step in (4, 5):                                   # the resumed run logs these steps again
        logger.log(step, {'loss': 1.0})
    logger.close()
    got = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [(r['step'], r['kind']) for r in got] == [(s, k) for s in (1, 2, 3) for k in ('train', 'val')] + \
        [(4, 'train'), (5, 'train')]
    assert got[:6] == rows[:6]                            # kept rows are untouched


def test_a_fresh_run_keeps_the_log_as_it_is(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text('{"step": 7, "kind": "train"}\n')
    MetricsLogger(str(tmp_path), enabled=True, total_steps=10, start_step=0).close()
    assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 7, "kind": "train"}\n'
