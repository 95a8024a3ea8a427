"""The MLLM evaluation (unitok.eval.mllm, `unitok eval-mllm`) with a tiny random Llama over the tiny
tokenizer's emoji codes: the log-likelihood classifier equals a hand computation, a model fitted to
read the images beats the swapped-image control, the controls change the inputs as stated, numbers
do not depend on the batch size, and bad inputs get one clear error."""
import json

import pytest
import torch

pytest.importorskip('transformers')

import unitok  # noqa: E402
from unitok.cli import main as cli  # noqa: E402
from unitok.eval.mllm import (MLLMEvalConfig, MLLMEvalError, answer_log_likelihoods, crossing_derangement,  # noqa: E402
                              evaluate_mllm, exact_match, read_training_info, token_f1)
from unitok.eval.subsets import subset_indices  # noqa: E402
from unitok.codes import CodeDataset, CodeFormatError, ExportConfig, export_codes  # noqa: E402
from unitok.mllm.data import IGNORE, collate  # noqa: E402
from unitok.mllm.model import UniTokMLLM  # noqa: E402
from train_helpers import saved_tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')
HEAD = dict(head_width=32, head_heads=2, head_depth=1)
QUESTION = 'Which category is this emoji in?'
ITEMS = 18                   # held-out items evaluated: a class-balanced subset, 2 of each of the 9 categories


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval_mllm')
    tok = saved_tiny_tokenizer(root)
    export_codes(tok, ExportConfig(data='builtin:emoji', split='train', limit=24), str(root / 'train'))
    export_codes(tok, ExportConfig(data='builtin:emoji', split='val'), str(root / 'val'))       # 380 images, 2 s
    return root


@pytest.fixture(scope='module')
def fitted(root):
    """A tiny MLLM fitted for a few seconds to answer the category question of the ITEMS held-out items
    evaluated below (so that its answers depend on the image), saved to root/mllm."""
    torch.manual_seed(0)
    model = UniTokMLLM.build(str(root / 'tokenizer'), 'tiny-random', **HEAD)
    val = CodeDataset(str(root / 'val'), view=0)
    picked = subset_indices(len(val), ITEMS, [val[i]['label'] for i in range(len(val))], 0)
    batch = collate([model.understanding_example(val[i]['codes'], QUESTION, val.classnames[val[i]['label']])
                     for i in picked])
    params = [p for n, p in model.named_parameters() if not n.startswith('code_input.')]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    model.train()
    for _ in range(120):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    model.save_pretrained(str(root / 'mllm'))
    return model


def _cfg(**kw):
    return MLLMEvalConfig(**{**dict(max_items=ITEMS, cfg_scales=(1.0, 2.0), max_new_tokens=3, chunk_size=5,
                                    batch_size=7, kid_subsets=4, examples=2), **kw})


def test_category_question_adds_a_sequence_answered_with_the_class_name(root):
    from unitok.train.tasks.mllm import MLLMTrainConfig, MLLMTask
    base = dict(out=str(root / 'run'), tokenizer=str(root / 'tokenizer'), llm='tiny-random', precision='fp32')
    over = [f'data.train={root / "train"}', 'model.head_width=32', 'model.head_heads=2', 'model.head_depth=1']
    task = MLLMTask(MLLMTrainConfig(**base, category_question='Which group is it in?').override(over))
    item = task.train_codes[3]
    codes, captions = item['codes'][0], task.train_codes.captions(3)
    name_seq, cat_seq, gen_seq = task.examples(codes, captions, label=item['label'])
    target = cat_seq['labels'][cat_seq['labels'] != IGNORE][:-1]             # without the end-of-turn token
    assert task.model.text_tokenizer.decode(target) == task.classnames[item['label']] == \
        task.train_codes.label_sets['category'][item['label']]
    assert gen_seq['image_targets'].any() and (name_seq['labels'] != IGNORE).any()
    assert (task.examples(codes, captions, label=-1)[1]['labels'] == IGNORE).all()   # unlabelled: no target
    off = MLLMTask(MLLMTrainConfig(**base, category_question='').override(over))
    assert len(off.examples(codes, captions, label=item['label'])) == 2
    # the exported model records the question and the classes; the evaluation takes them from there
    task.export(task.model.state_dict(), str(root / 'exported'))
    info = read_training_info(str(root / 'exported'))
    assert info['classnames'] == task.classnames and info['category_set'] == 'category'
    resolved = MLLMEvalConfig().resolved(info)
    assert (resolved.category_question, resolved.label_set) == ('Which group is it in?', 'category')
    assert resolved.question == 'What is this emoji?' and resolved.draw == 'Draw an emoji of {}.'


def test_log_likelihood_classifier_equals_a_hand_computation(root, fitted):
    val = CodeDataset(str(root / 'val'), view=0)
    codes = torch.stack([val[i]['codes'] for i in (0, 5)])
    names = val.classnames
    ll = answer_log_likelihoods(fitted, codes, QUESTION, names)
    assert ll.shape == (2, len(names)) and ll.dtype == torch.float64
    for b in range(2):
        for c in (0, 4, len(names) - 1):
            e = fitted.understanding_example(codes[b], QUESTION, names[c])
            ids = e['input_ids'][None]
            h = fitted.hidden_states(fitted.embed(ids, e['image_mask'][None], e['codes'][None]))
            logp = fitted.text_logits(h)[0].float().log_softmax(-1)
            keep = e['labels'] != IGNORE
            hand = logp[keep].gather(1, e['labels'][keep][:, None]).sum()
            assert float(ll[b, c]) == pytest.approx(float(hand), abs=1e-4)
    assert not torch.allclose(ll[0], ll[1])                # the images change the answer likelihoods


def test_crossing_derangement_swaps_across_classes_reproducibly():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3, 0]
    p = crossing_derangement(labels, seed=3)
    assert sorted(p) == list(range(len(labels)))
    assert all(labels[p[i]] != labels[i] for i in range(len(labels)))
    assert p == crossing_derangement(labels, seed=3) and p != crossing_derangement(labels, seed=4)
    with pytest.raises(MLLMEvalError, match='more than half'):
        crossing_derangement([0, 0, 0, 1], seed=0)


def test_token_f1_and_exact_match_on_hand_cases():
    assert token_f1('grinning face', 'grinning face') == 1.0
    assert token_f1('a grinning cat face', 'grinning face') == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1('flag: France', 'flag france') == 1.0 and exact_match('Flag:  France.', 'flag: france') == 1.0
    assert token_f1('red apple', 'green pear') == 0.0 and token_f1('', '') == 1.0 and token_f1('x', '') == 0.0
    assert token_f1('face face', 'face face cat') == pytest.approx(0.8)       # multiset overlap (a set's: 0.4)
    assert exact_match('grinning face', 'grinning') == 0.0


def test_evaluation_sees_the_image_and_does_not_depend_on_the_batch_size(root, fitted):
    a = evaluate_mllm(fitted, str(root / 'val'), _cfg(), train_codes=str(root / 'train'))
    n = a['items']
    assert n == ITEMS and a['classes'] == 9 and a['chance'] == pytest.approx(1 / 9)
    # fitted to read the images: far above chance and above the swapped-image control, which answers
    # the swapped-in image's category instead
    assert a['llm_zero_shot_top1'] >= 0.9
    assert a['control_swapped_top1'] < a['llm_zero_shot_top1'] - 0.5
    assert a['control_swapped_partner_top1'] >= 0.5
    assert 0 <= a['control_noise_top1'] <= 0.5
    assert 0 <= a['tokenizer_zero_shot_top1'] <= 1 and 0 <= a['name_exact_match'] <= a['name_token_f1'] <= 1
    assert 'train_name_exact_match' in a and a['train_name_items'] == 24     # train_items 32 > 24 exported
    assert [m['cfg_scale'] for m in a['t2i']] == [1.0, 2.0] and all(m['samples'] == n for m in a['t2i'])
    for m in a['t2i'] + list(a['floors'].values()):
        assert m['fd_effnet-lite0'] >= 0 and 0 <= m['precision_effnet-lite0'] <= 1
    assert set(a['floors']) == {'real_vs_real', 'reconstruction_vs_real'}
    assert len(a['examples']) == 2 and a['examples'][0]['prompt'].startswith('Draw an emoji of ')
    # another batch size (and only the second scale: chunk seeds do not depend on the scale): the same numbers
    b = evaluate_mllm(fitted, CodeDataset(str(root / 'val'), view=0), _cfg(batch_size=3, cfg_scales=(2.0,)))
    for k in ('llm_zero_shot_top1', 'tokenizer_zero_shot_top1', 'name_exact_match', 'name_token_f1', 'floors',
              'control_swapped_top1', 'control_swapped_partner_top1', 'control_noise_top1', 'examples'):
        assert json.dumps(a[k], sort_keys=True) == json.dumps(b[k], sort_keys=True), k
    assert a['t2i'][1] == b['t2i'][0]


def test_bad_inputs_get_one_clear_error(root, fitted, tmp_path):
    torch.manual_seed(1)
    other = unitok.create_model('unitok-tiny')
    other.init_weights()
    export_codes(other.eval(), ExportConfig(data='builtin:emoji', split='val', limit=8), str(tmp_path / 'other'))
    with pytest.raises(CodeFormatError, match='another tokenizer'):
        evaluate_mllm(fitted, str(tmp_path / 'other'), _cfg())
    with pytest.raises(MLLMEvalError, match='unknown feature extractor'):
        evaluate_mllm(fitted, str(root / 'val'), _cfg(extractor='vgg'))
    with pytest.raises(MLLMEvalError, match='no exported codes|manifest'):
        evaluate_mllm(fitted, str(tmp_path / 'missing'), _cfg())
    (tmp_path / 'flat').mkdir()
    from PIL import Image
    for i in range(4):
        Image.new('RGB', (64, 64), (60 * i, 0, 0)).save(tmp_path / 'flat' / f'{i}.png')
    export_codes(fitted.image_tokenizer, ExportConfig(data=str(tmp_path / 'flat'), split='val'),
                 str(tmp_path / 'flat_codes'))
    with pytest.raises(MLLMEvalError, match='no class labels'):
        evaluate_mllm(fitted, str(tmp_path / 'flat_codes'), _cfg())
    from unitok.eval.mllm import run_mllm_evaluation
    with pytest.raises(MLLMEvalError, match='no held-out split'):
        run_mllm_evaluation(str(root / 'mllm'), str(tmp_path / 'flat'), str(tmp_path / 'out'), _cfg())


def test_cli_end_to_end(root, fitted, tmp_path, capsys):
    out = tmp_path / 'eval'
    assert cli(['eval-mllm', '--mllm', str(root / 'mllm'), '--data', 'builtin:emoji', '--codes-val', str(root / 'val'),
                '--codes-train', str(root / 'train'), '--out', str(out), '--max-items', '10', '--cfg', '1.0,2.0',
                '--max-new-tokens', '3', '--train-items', '6', '--chunk-size', '6']) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / 'report.json').read_text())
    assert report['items'] == 10 and report['train_name_items'] == 6 and 'LLM zero-shot top-1' in printed
    assert report['protocol']['category_question'] == QUESTION
    page = (out / 'report.html').read_text()
    assert page.count('<img class="thumb"') == 8 * 3 and 'Which category is this emoji in?' in page
    # held-out codes of another split: one clear error, exit status 2
    assert cli(['eval-mllm', '--mllm', str(root / 'mllm'), '--data', 'builtin:emoji', '--codes-val',
                str(root / 'train'), '--out', str(tmp_path / 'bad')]) == 2
    assert 'not from the val split' in capsys.readouterr().err
