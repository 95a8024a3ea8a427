"""Fine-tuning the released MLLM (``unitok train-mllm --init``; unitok.mllm.official's training side) on the
tiny official checkpoint of tests/fixtures/golden_mllm, with codes of the released code space (8 x 4096 codes
on a 16x16 grid) from a tiny UniTok whose codebooks are the MLLM's own copy."""
import json
import logging
import math
import os

import pytest
import torch

pytest.importorskip('transformers')
pytest.importorskip('peft')

import unitok  # noqa: E402
from unitok.codes import ExportConfig, export_codes  # noqa: E402
from unitok.commands import main as cli  # noqa: E402
from unitok.config import ConfigError  # noqa: E402
from unitok.mllm import OfficialMLLM, UniTokMLLM  # noqa: E402
from unitok.mllm.data import IGNORE, collate  # noqa: E402
from unitok.train import Trainer  # noqa: E402
from unitok.train.tasks.mllm import MLLMTrainConfig, load_released  # noqa: E402

from hub_cache import cache_repo, use_cache  # noqa: E402
from official_golden import build_checkpoint, golden  # noqa: E402
from train_helpers import uninterrupted_and_resumed  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')
META, ARR = golden()
CODES = torch.from_numpy(ARR['image_codes']).view(8, 16, 16)
TRAINED = ('model.multi_embedder.attn_projection.', 'model.multi_embedder.mm_projector.', 'ar_head.')
CONSTANT = 'zero_k_bias'          # a buffer of the attention projection (the key bias it fixes at zero)
LORA = ('q_proj', 'k_proj', 'v_proj', 'o_proj')


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """``root/unitok_mllm`` (the official layout), ``root/tokenizer`` and its codes ``root/train``, ``root/val``."""
    root = tmp_path_factory.mktemp('finetune')
    folder = build_checkpoint(str(root / 'unitok_mllm'))
    codebooks = OfficialMLLM.load(folder, dtype=torch.float32).embedder.codebooks.detach()
    torch.manual_seed(0)
    tok = unitok.create_model('unitok-tiny', image_size=128, patch_size=8, num_codebooks=8, codebook_size=4096,
                              code_dim=8).eval()
    with torch.no_grad():
        tok.quantizer.codebook.copy_(codebooks.reshape_as(tok.quantizer.codebook))
    tok.save_pretrained(str(root / 'tokenizer'))
    export_codes(tok, ExportConfig(data='builtin:emoji', split='train', limit=6), str(root / 'train'))
    export_codes(tok, ExportConfig(data='builtin:emoji', split='val', limit=2), str(root / 'val'))
    return root


@pytest.fixture(scope='module')
def loaded(released):
    return OfficialMLLM.load(str(released / 'unitok_mllm'), dtype=torch.float32)


def _cfg(root, out, steps=4, **kw):
    base = dict(out=str(out), steps=steps, precision='fp32', log_every=1, eval_every=0, image_every=0, ckpt_every=0,
                keep_last=10, tokenizer=str(root / 'tokenizer'), init=str(root / 'unitok_mllm'), threads=1)
    return MLLMTrainConfig(**{**base, **kw}).override([f'data.train={root / "train"}', 'data.batch_size=1',
                                                       'data.num_workers=0', 'optim.warmup=0'])


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith('.safetensors'):
            out.update(load_file(os.path.join(folder, name)))
    return out


def _train_rows(run) -> list[dict]:
    return [r for r in map(json.loads, open(run / 'metrics.jsonl')) if r['kind'] == 'train']


def _with_image_marker(example) -> list[int]:
    """The ids with the image's run of positions as the one -200 of the official tokenizer_image_token."""
    ids, image = example['input_ids'].tolist(), example['image_mask'].tolist()
    at = image.index(True)
    return ids[:at] + [-200] + [i for i, m in zip(ids[at:], image[at:]) if not m]


def test_training_examples_follow_the_official_layouts(loaded):
    tok, f = loaded.text_tokenizer, loaded.prompt_format
    gen = loaded.generation_example(CODES, META['prompts'][0])
    assert _with_image_marker(gen) == META['teacher_forced']['ids']        # train.py's [<s> text, 3, img, 4, 2]
    P = META['teacher_forced']['image_start'] - 1                          # the prompt, before <boi>
    assert {i: int(v) for i, v in enumerate(gen['labels']) if v != IGNORE} == {P - 1: 3, P + 256: 4, P + 257: 2}
    assert gen['image_targets'].nonzero()[:, 0].tolist() == list(range(P, P + 256))
    assert torch.equal(gen['codes'][P + 1:P + 257], CODES.flatten(1).t())
    null = loaded.generation_example(CODES, None)
    before_boi = null['image_mask'].tolist().index(True) - 1
    assert null['input_ids'][:before_boi].tolist() == tok('<unconditional>')['input_ids']
    answer = 'a red apple'
    und = loaded.understanding_example(CODES, META['question'], answer)
    # the official training tokenizes the whole conversation, each piece around <image> on its own
    pieces = (f.understanding_text(META['question'], True) + f' {answer}</s>').split('<image>')
    joint = tok(pieces[0])['input_ids'] + [-200] + tok(pieces[1])['input_ids'][1:]
    assert _with_image_marker(und) == joint
    target = tok(answer, add_special_tokens=False)['input_ids'] + [2]
    n = len(und['input_ids'])
    assert und['labels'][n - len(target) - 1:-1].tolist() == target
    assert (und['labels'][:n - len(target) - 1] == IGNORE).all() and und['labels'][-1] == IGNORE
    assert not und['image_targets'].any()


def test_train_mllm_fine_tunes_the_released_layout_in_stage_1_then_2(released, tmp_path):
    def args(init, out, *flags, lr='1e-3'):
        return ['train-mllm', '--init', str(init), '--tokenizer', str(released / 'tokenizer'), '--codes',
                str(released / 'train'), '--val-codes', str(released / 'val'), '--out', str(out), '--batch-size',
                '1', '--steps', '3', *flags, 'precision=fp32', 'log_every=1', 'eval_every=0', 'image_every=0',
                'threads=1', 'data.num_workers=0', 'optim.warmup=0', f'optim.lr={lr}']
    official = released / 'unitok_mllm'
    assert cli(args(official, tmp_path / 's1')) == 0
    rows = _train_rows(tmp_path / 's1')
    assert len(rows) == 3 and all(math.isfinite(r['loss']) for r in rows) and 'z_loss' not in rows[0]
    assert rows[-1]['image_loss'] < rows[0]['image_loss'] - 0.3                # the head learns
    before, after = _tensors(official), _tensors(tmp_path / 's1' / 'model')
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {k for k in before if k.startswith(TRAINED) and not k.endswith(CONSTANT)}
    assert moved == trained                                                 # LM and codebooks frozen
    assert isinstance(UniTokMLLM.from_pretrained(str(tmp_path / 's1' / 'model')), OfficialMLLM)

    assert cli(args(tmp_path / 's1' / 'model', tmp_path / 's2', '--stage', '2', '--loss', 'official', lr='1e-2')) == 0
    rows = _train_rows(tmp_path / 's2')
    assert all(math.isfinite(r['loss']) and r['z_loss'] > 0 for r in rows)
    final = _tensors(tmp_path / 's2' / 'model')
    assert final.keys() == before.keys()
    moved = {k for k in after if not torch.equal(after[k], final[k])}
    lora = {k for k in after if k.startswith('model.layers.') and k.split('.')[-2] in LORA}
    assert lora and moved == lora | trained                                 # adapters merged into the LM
    from PIL import Image
    Image.new('RGB', (90, 60), (200, 30, 30)).save(tmp_path / 'x.png')
    assert cli(['chat', '--mllm', str(tmp_path / 's2' / 'model'), '--tokenizer', str(released / 'tokenizer'),
                '--image', str(tmp_path / 'x.png'), '--max-new-tokens', '2', 'What is this emoji?']) == 0


def test_stage_2_resumes_exactly_and_its_merged_export_computes_what_it_trained(released, tmp_path, monkeypatch):
    ref, again = uninterrupted_and_resumed(lambda out: _cfg(released, out, stage=2, loss='official'), tmp_path,
                                           monkeypatch)
    a, b = ref.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any('lora_B' in k for k in a)
    assert not any(k.startswith('llm.') and 'lora_' not in k for k in a)    # checkpoints hold what trains
    merged = UniTokMLLM.from_pretrained(str(tmp_path / 'ref' / 'model'), dtype=torch.float32)
    model = ref.model.eval()
    batch = collate([model.understanding_example(CODES, META['question'], 'a cat'),
                     model.generation_example(CODES, 'a cat')])
    with torch.no_grad():
        (want, wm), (got, gm) = model(batch, None, 'official'), merged(batch, None, 'official')
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert gm['text_loss'].item() == pytest.approx(wm['text_loss'].item(), abs=1e-5)
    assert not any('lora' in k for k in _tensors(tmp_path / 'ref' / 'model'))


def test_the_hub_id_resolves_from_a_local_cache(released, tmp_path, monkeypatch, caplog):
    folder = released / 'unitok_mllm'
    cache_repo(tmp_path / 'hub', 'FoundationVision/unitok_mllm', {n: folder / n for n in os.listdir(folder)})
    use_cache(monkeypatch, tmp_path / 'hub')
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(_cfg(released, tmp_path / 'run', steps=1, init='FoundationVision/unitok_mllm'))
    assert isinstance(trainer.model, OfficialMLLM)
    assert 'models--FoundationVision--unitok_mllm' in trainer.model.source
    assert 'differ from the codebooks' not in caplog.text                  # the tokenizer's codebooks match
    assert trainer.fit()['exit'] == 'finished'


def test_what_does_not_fit_the_released_mllm_is_refused_or_warned(released, tmp_path, caplog):
    folder, tok = str(released / 'unitok_mllm'), unitok.UniTok.from_pretrained(str(released / 'tokenizer'))
    with pytest.raises(ConfigError, match=r'model\.head_width: the released MLLM'):
        load_released(folder, _cfg(released, tmp_path, model={'head_width': 32}), tok)
    with pytest.raises(ConfigError, match=r'8 x 4096 codes on a 16x16 grid; .* makes 8 x 512 on 4x4'):
        load_released(folder, _cfg(released, tmp_path), unitok.create_model('unitok-tiny'))
    with torch.no_grad():
        tok.quantizer.codebook.view(-1)[0] += 1.0
    with caplog.at_level(logging.WARNING, logger='unitok.mllm.official'):
        model = load_released(folder, _cfg(released, tmp_path, stage=2, model={'lora_alpha': 8.0}), tok)
    assert 'differ from the codebooks inside this MLLM' in caplog.text
    assert model.config.lora_alpha == 8.0 and model.llm.peft_config['default'].lora_alpha == 8.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(('embedder.projection', 'embedder.projector', 'head.')) or 'lora_' in n
                             for n in trainable)
    assert not model.embedder.codebooks.requires_grad
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
