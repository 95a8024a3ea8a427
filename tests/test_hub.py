"""The official releases by their hub names (unitok.hub), resolved offline from a locally filled Hugging Face cache.

``FoundationVision/unitok_tokenizer`` holds ``unitok_tokenizer.pth``; ``FoundationVision/unitok_external`` the
official recipe's LPIPS, DINOv2 and Inception weights under the names of its ``utils/config.py``. The fixtures
have those names and layouts (the networks' real shapes, random values; the tokenizer is the tiny preset).
"""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from fault_fixtures import random_images
from hub_cache import cache_repo, use_cache
import unitok
from unitok import CheckpointError, UniTok
from unitok.commands import main
from unitok.hub import hub_file, resolve_file
from unitok.losses.adversarial import DINO_FILE, DinoDiscriminator, build_discriminator
from unitok.losses.perceptual import LPIPS_FILE, LPIPSPerceptual, MissingWeightsError, build_perceptual
from unitok.official import save_official_checkpoint
from pickle_payloads import OpensFile

TOKENIZER, EXTERNAL = 'FoundationVision/unitok_tokenizer', 'FoundationVision/unitok_external'
INCEPTION_FILE = 'weights-inception-2015-12-05-6726825d.pth'
pytestmark = pytest.mark.filterwarnings('ignore:.*(pretrained|weight enum).*:UserWarning')   # lpips' torchvision call


def _official_lpips_state() -> dict:
    """The layout the official ``utils/lpips.py`` loads strictly: each VGG slice an ``nn.Sequential`` numbered
    from 0 (``net.slice2.1.weight`` is torchvision's ``features.5``), heads ``lins.K.model.1.weight``."""
    import lpips
    torch.manual_seed(0)
    net = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False)
    starts = {1: 0, 2: 4, 3: 9, 4: 16, 5: 23}
    state = {}
    for key, value in net.state_dict().items():
        if key.startswith('net.slice'):
            _, sl, idx, param = key.split('.')
            state[f'net.{sl}.{int(idx) - starts[int(sl[5:])]}.{param}'] = value
    for k, c in enumerate((64, 128, 256, 512, 512)):
        state[f'lins.{k}.model.1.weight'] = torch.rand(1, c, 1, 1)
    return state


def _dinov2_state() -> dict:
    """The released dinov2_vits14 layout (518 px: 37x37 patches + class token, and the unused mask token)."""
    import timm
    torch.manual_seed(0)
    state = timm.create_model('vit_small_patch14_dinov2', pretrained=False, img_size=518, num_classes=0).state_dict()
    state['mask_token'] = torch.zeros(1, 384)
    return state


def _inception_state() -> dict:
    """torch-fidelity's FeatureExtractorInceptionV3 state dict (the layout of its 2015-12-05 weights file)."""
    from unittest import mock
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, 'load_state_dict', lambda self, *a, **k: None), \
            mock.patch('torch.load', lambda *a, **k: {}):
        net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'], feature_extractor_weights_path='unused')
    return net.state_dict()


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """The local release files: ``tokenizer/unitok_tokenizer.pth`` and ``external/<three weights>``."""
    root = tmp_path_factory.mktemp('released')
    torch.manual_seed(0)
    model = UniTok.from_preset('unitok-tiny').eval()
    (root / 'tokenizer').mkdir()
    save_official_checkpoint(model, str(root / 'tokenizer' / 'unitok_tokenizer.pth'))
    (root / 'external').mkdir()
    for name, state in ((LPIPS_FILE, _official_lpips_state()), (DINO_FILE, _dinov2_state()),
                        (INCEPTION_FILE, _inception_state())):
        torch.save(state, root / 'external' / name)
    return root


@pytest.fixture()
def hub(tmp_path, monkeypatch, released):
    """A Hugging Face cache in tmp_path holding both release repositories (HF_HUB_OFFLINE=1)."""
    cache = use_cache(monkeypatch, tmp_path / 'hf-cache')
    cache_repo(cache, TOKENIZER, {'unitok_tokenizer.pth': released / 'tokenizer' / 'unitok_tokenizer.pth',
                                  'README.md': b'# UniTok tokenizer'})
    cache_repo(cache, EXTERNAL, {n: released / 'external' / n for n in os.listdir(released / 'external')})
    return cache


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------- the tokenizer
def test_tokenizer_hub_name_loads_the_official_release(hub, released, images64):
    local = UniTok.from_pretrained(str(released / 'tokenizer' / 'unitok_tokenizer.pth'))
    loaded = UniTok.from_pretrained(TOKENIZER)                        # hf_hub_download from the cache
    assert loaded.config == local.config and _same_weights(loaded, local)
    assert torch.equal(loaded.encode(images64), local.encode(images64))


def test_library_layout_is_preferred_over_the_release_file(hub, released, images64):
    torch.manual_seed(1)
    other = UniTok.from_preset('unitok-tiny').eval()                 # different weights in the library's layout
    other.save_pretrained(str(hub / 'ours'))
    cache_repo(hub, 'someone/both', {'config.json': hub / 'ours' / 'config.json',
                                     'model.safetensors': hub / 'ours' / 'model.safetensors',
                                     'unitok_tokenizer.pth': released / 'tokenizer' / 'unitok_tokenizer.pth'})
    assert _same_weights(UniTok.from_pretrained('someone/both'), other)


def test_hub_repo_of_neither_layout_lists_what_it_holds(hub):
    cache_repo(hub, 'someone/other', {'weights.bin': b'x', 'README.md': b'y', 'sub/model.pt': b'z'})
    with pytest.raises(CheckpointError, match=r"hub model 'someone/other' is not a UniTok model: it holds neither "
                                              r"config.json \+ model.safetensors \(this library's layout\) nor "
                                              r'unitok_tokenizer.pth \(the official release\); the local cache '
                                              r'holds: README.md, sub/model.pt, weights.bin$'):
        UniTok.from_pretrained('someone/other')


@pytest.mark.parametrize('content, match', [
    (b'PK\x03\x04' + bytes(200), 'cannot read checkpoint'),                  # a torch zip file cut short
    (pickle.dumps({'args': {}, 'trainer': {'unitok': {'w': torch.zeros(2)}, 'x': OpensFile('MARKER')}}),
     'refused to load .* unpickling it would import and call (io|builtins).open, which can run arbitrary code.* '
     'Nothing from the file was executed')])
def test_bad_release_file_on_the_hub_is_one_error_and_runs_nothing(hub, tmp_path, monkeypatch, content, match):
    monkeypatch.chdir(tmp_path)                                      # the exploit would create ./MARKER
    cache_repo(hub, 'someone/bad', {'unitok_tokenizer.pth': content})
    with pytest.raises(CheckpointError, match=match):
        UniTok.from_pretrained('someone/bad')
    assert not (tmp_path / 'MARKER').exists()


def test_hub_file_missing_offline_lists_the_cache(hub):
    with pytest.raises(CheckpointError, match=r"'nope.pth' of hub repository 'FoundationVision/unitok_tokenizer' is "
                                              r'not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids '
                                              r'downloading it \(the local cache holds: README.md, '
                                              r'unitok_tokenizer.pth'):
        hub_file(TOKENIZER, 'nope.pth')


# ---------------------------------------------------------------------- the external weights
def test_external_weights_by_file_folder_or_hub_id(hub, released):
    folder = released / 'external'
    assert resolve_file(str(folder / DINO_FILE), DINO_FILE, 'w') == str(folder / DINO_FILE)
    assert resolve_file(str(folder), DINO_FILE, 'w') == str(folder / DINO_FILE)
    from unitok.eval import EvalConfig
    EvalConfig(metrics=('lpips',), lpips_weights=EXTERNAL).validate()     # --lpips-weights takes the hub id too
    from_hub = resolve_file(EXTERNAL, DINO_FILE, 'w')
    assert from_hub.startswith(str(hub)) and open(from_hub, 'rb').read() == (folder / DINO_FILE).read_bytes()
    with pytest.raises(CheckpointError, match=rf"DINOv2 weights: the folder '.*tokenizer' has no {DINO_FILE} \(it "
                                              r'holds: unitok_tokenizer.pth\)'):
        resolve_file(str(released / 'tokenizer'), DINO_FILE, 'DINOv2 weights')
    with pytest.raises(CheckpointError, match=rf"hub repository '{TOKENIZER}' .*{DINO_FILE}|{DINO_FILE}.*{TOKENIZER}"):
        resolve_file(TOKENIZER, DINO_FILE, 'DINOv2 weights')


def test_lpips_reads_the_official_layout_from_the_hub(hub, released):
    pytest.importorskip('lpips')
    state = torch.load(released / 'external' / LPIPS_FILE, weights_only=True)
    p = build_perceptual('auto', EXTERNAL)                            # loss.lpips_path=FoundationVision/unitok_external
    assert isinstance(p, LPIPSPerceptual)
    loaded = p.net.state_dict()
    assert torch.equal(loaded['net.slice2.5.weight'], state['net.slice2.1.weight'])   # features.5: slice-local 1
    assert torch.equal(loaded['net.slice5.28.weight'], state['net.slice5.5.weight'])
    assert torch.equal(loaded['lin3.model.1.weight'], state['lins.3.model.1.weight'])  # the file's heads
    assert _same_weights(p, LPIPSPerceptual(str(released / 'external')))              # its folder
    assert _same_weights(p, LPIPSPerceptual(str(released / 'external' / LPIPS_FILE)))


def test_dino_reads_the_released_layout_from_the_hub(hub, released):
    state = torch.load(released / 'external' / DINO_FILE, weights_only=True)
    d = build_discriminator('auto', 64, EXTERNAL)                     # loss.dino_path=FoundationVision/unitok_external
    assert isinstance(d, DinoDiscriminator)
    assert torch.equal(d._dino[0].blocks[5].mlp.fc1.weight, state['blocks.5.mlp.fc1.weight'])
    local = DinoDiscriminator(str(released / 'external' / DINO_FILE), 64)
    assert _same_weights(d._dino[0], local._dino[0])


def test_inception_reads_torch_fidelity_layout_from_the_hub(hub, released):
    from unitok.eval.features import build_extractor
    state = torch.load(released / 'external' / INCEPTION_FILE, weights_only=True)
    e = build_extractor('inception', EXTERNAL)                        # --inception-weights <the hub id>
    assert torch.equal(e.net.state_dict()['fc.weight'], state['fc.weight'])
    assert _same_weights(e, build_extractor('inception', str(released / 'external')))


@pytest.mark.parametrize('name', [LPIPS_FILE, DINO_FILE, INCEPTION_FILE])
def test_external_weights_of_another_layout_or_unsafe_are_one_error(hub, tmp_path, monkeypatch, name):
    from unitok.eval.features import build_extractor
    load = {LPIPS_FILE: LPIPSPerceptual, DINO_FILE: lambda p: DinoDiscriminator(p, 64),
            INCEPTION_FILE: lambda p: build_extractor('inception', p)}[name]
    layout = {LPIPS_FILE: r'lack 26 of the 26 VGG16 trunk tensors', DINO_FILE: 'not the released ViT-S/14 layout',
              INCEPTION_FILE: 'not the layout torch-fidelity reads'}[name]
    torch.save({'weight': torch.zeros(3), 'pos_embed': torch.zeros(1, 5, 384)}, tmp_path / 'wrong.pth')
    cache_repo(hub, 'someone/wrong', {name: tmp_path / 'wrong.pth'})
    with pytest.raises(CheckpointError, match=layout):
        load('someone/wrong')
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / 'evil.pth', 'wb') as f:
        pickle.dump({'weight': OpensFile('MARKER')}, f)
    cache_repo(hub, 'someone/evil', {name: tmp_path / 'evil.pth'})
    with pytest.raises(CheckpointError, match='refused to load .* Nothing from the file was executed'):
        load('someone/evil')
    assert not (tmp_path / 'MARKER').exists()


def test_missing_external_weights_still_name_the_option():
    with pytest.raises(MissingWeightsError, match='loss.lpips_path'):
        LPIPSPerceptual('no/such/dir/lpips.pth')
    with pytest.raises(MissingWeightsError, match='loss.dino_path'):
        DinoDiscriminator(None, 64)


# ---------------------------------------------------------------------- the command line
@pytest.fixture()
def imgs(tmp_path):
    return random_images(tmp_path / 'imgs', 2)


def test_cli_takes_the_hub_names(hub, released, imgs, tmp_path, capsys):
    local = UniTok.from_pretrained(str(released / 'tokenizer' / 'unitok_tokenizer.pth'))
    assert main(['encode', str(imgs), '--model', TOKENIZER, '--out', str(tmp_path / 'codes.npz')]) == 0
    from unitok.images import to_tensor
    with np.load(tmp_path / 'codes.npz') as z:
        assert np.array_equal(z['codes'], local.encode(to_tensor(sorted(map(str, imgs.iterdir())), 64)).numpy())
    assert main(['reconstruct', str(imgs), '--model', TOKENIZER, '--out-dir', str(tmp_path / 'rec')]) == 0
    assert sorted(os.listdir(tmp_path / 'rec')) == ['im0.png', 'im1.png']
    assert main(['eval', '--model', TOKENIZER, '--data', f'folder:{imgs}', '--metrics', 'rfid',
                 '--extractor', 'inception', '--inception-weights', EXTERNAL, '--out', str(tmp_path / 'ev')]) == 0
    report = json.loads((tmp_path / 'ev' / 'report.json').read_text())
    assert report['samples'] == 2 and np.isfinite(report['rfid_inception'])
    cache_repo(hub, 'someone/other', {'weights.bin': b'x'})
    assert main(['encode', str(imgs), '--model', 'someone/other', '--out', str(tmp_path / 'x.npz')]) == 2
    err = capsys.readouterr().err
    assert 'is not a UniTok model' in err and 'the local cache holds: weights.bin' in err and 'Traceback' not in err
    assert not (tmp_path / 'x.npz').exists()


def test_cli_resolves_hub_names_through_the_environment(hub, imgs, tmp_path):
    """A fresh ``unitok`` process finds the release through HF_HUB_CACHE / HF_HUB_OFFLINE alone."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(unitok.__file__)))
    env = {**os.environ, 'HF_HUB_CACHE': str(hub), 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': root}
    r = subprocess.run([sys.executable, '-m', 'unitok', 'info', TOKENIZER], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert '8 x 512' in r.stdout
    shutil.rmtree(hub / ('models--' + TOKENIZER.replace('/', '--')))
    r = subprocess.run([sys.executable, '-m', 'unitok', 'info', TOKENIZER], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and 'is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1' in r.stderr
