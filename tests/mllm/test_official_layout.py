"""Reading and checking the released MLLM's folder layout (unitok.mllm.official_layout): one clear error and
nothing loaded for a bad folder; pickles are never read."""
import json
import os
import pickle
import shutil

import pytest
import torch

from unitok.mllm import UniTokMLLM, official_layout
from unitok.mllm.official_layout import resolve_official, to_library, to_official
from unitok.pretrained import CheckpointError

from official_golden import build_checkpoint


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp('unitok_mllm')))


@pytest.fixture
def folder(pristine, tmp_path, monkeypatch):
    """A fresh copy; loading anything from it fails the test (the errors must come first)."""
    out = shutil.copytree(pristine, tmp_path / 'ck')

    def must_not_load(*args, **kwargs):
        raise AssertionError('weights were read before the folder was checked')
    monkeypatch.setattr(official_layout, 'load_lm', must_not_load)
    monkeypatch.setattr(official_layout, 'read_tensors', must_not_load)
    return out


class _RunsCode:
    def __reduce__(self):
        return (open, ('/tmp/.unitok-pickle-ran', 'w'))


def _index(folder):
    with open(folder / 'model.safetensors.index.json') as f:
        return json.load(f)


def test_a_shard_missing_from_the_folder_is_one_error(folder):
    shard = sorted(set(_index(folder)['weight_map'].values()))[1]
    os.remove(folder / shard)
    with pytest.raises(CheckpointError, match=f"the index lists shard\\(s\\) \\['{shard}'\\] that are not in the "
                                              'folder; nothing was loaded'):
        UniTokMLLM.from_pretrained(str(folder))


def test_a_tensor_missing_from_the_index_is_one_error(folder):
    index = _index(folder)
    del index['weight_map']['ar_head.layers.2.mlp.up_proj.weight']
    (folder / 'model.safetensors.index.json').write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) of the released MLLM are not in the checkpoint "
                                              r"\(e.g. \['ar_head.layers.2.mlp.up_proj.weight'\]\)"):
        UniTokMLLM.from_pretrained(str(folder))


def test_pickled_weights_are_refused_and_never_run(folder):
    marker = '/tmp/.unitok-pickle-ran'
    if os.path.exists(marker):
        os.remove(marker)
    for f in os.listdir(folder):
        if f.endswith('.safetensors') or f.endswith('.index.json'):
            os.remove(folder / f)
    (folder / 'pytorch_model.bin').write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match=r"holds only pickled weights \['pytorch_model.bin'\], which are "
                                              'refused'):
        UniTokMLLM.from_pretrained(str(folder))
    index = {'weight_map': {'lm_head.weight': 'pytorch_model.bin'}}
    (folder / 'model.safetensors.index.json').write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"non-safetensors shard\(s\) \['pytorch_model.bin'\]"):
        UniTokMLLM.from_pretrained(str(folder))
    assert not os.path.exists(marker)


def test_a_stray_pickle_beside_the_safetensors_is_not_read(pristine, tmp_path):
    marker = '/tmp/.unitok-pickle-ran'
    if os.path.exists(marker):
        os.remove(marker)
    folder = shutil.copytree(pristine, tmp_path / 'ck')
    (folder / 'pytorch_model.bin').write_bytes(pickle.dumps(_RunsCode()))
    UniTokMLLM.from_pretrained(str(folder), dtype=torch.float32)
    assert not os.path.exists(marker)


def test_resolution_names_only_the_official_layout(pristine, tmp_path):
    assert resolve_official(pristine) == pristine
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
    assert resolve_official(str(tmp_path)) is None
    assert resolve_official('./not-there') is None


def test_key_mapping_round_trips():
    official = {f'model.multi_embedder.quantizer.codebooks.{k}.codebook.weight': torch.full((3, 2), float(k))
                for k in range(2)}
    official.update({f'model.multi_embedder.quantizer.codebooks.{k}.vocab_usage': torch.zeros(3) for k in range(2)})
    official.update({'model.multi_embedder.attn_projection.attn.q_bias': torch.ones(4),
                     'model.multi_embedder.mm_projector.0.weight': torch.ones(4),
                     'model.multi_embedder.mm_projector.3.bias': torch.ones(5),
                     'ar_head.linear_head.weight': torch.ones(6, 5)})
    lib = to_library(official, 2)
    assert lib['embedder.codebooks'].shape == (2, 3, 2) and lib['embedder.codebooks'][1].eq(1).all()
    assert {'embedder.projection.attn.q_bias', 'embedder.projector.norm.weight', 'embedder.projector.fc2.bias',
            'head.linear_head.weight'} <= set(lib)
    back = to_official(lib)
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)
