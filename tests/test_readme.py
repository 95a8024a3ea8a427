"""The README's Python examples run, in order, on the tiny preset.

Every fenced ``python`` block of README.md is executed in one namespace, in a temporary working
directory that holds what the examples name: ``unitok_tokenizer.pth`` (a tiny model in the official
release format, also in a local Hugging Face cache as ``FoundationVision/unitok_tokenizer``), ``cat.jpg``
and ``dog.png``. ``push_to_hub`` goes to a stand-in for the hub that
puts the uploaded folder into a local Hugging Face cache, so the example that loads the model back
from the hub reads exactly what was pushed. A block preceded by ``<!-- readme-test: skip -->`` is not
run; the test keeps the number of such blocks small.
"""
import os
import re
import shutil

import pytest
import torch
from PIL import Image

import unitok
from hub_cache import cache_repo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = '<!-- readme-test: skip -->'
MAX_SKIPPED = 1


def readme_python_blocks() -> tuple[list[str], int]:
    """(blocks to run, number skipped) from README.md."""
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    blocks, skipped = [], 0
    for marker, code in re.findall(r'(<!-- readme-test: skip -->\s*\n)?```python\n(.*?)^```', text, re.S | re.M):
        if marker:
            skipped += 1
        else:
            blocks.append(code)
    return blocks, skipped


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """HfApi.create_repo / upload_folder that write into a local hub cache (read offline)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoUrl
    cache = tmp_path / 'hub-cache'
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    pushed = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        repo = cache / ('models--' + repo_id.replace('/', '--'))
        commit = f'{len(pushed) + 1:040d}'
        shutil.copytree(folder_path, repo / 'snapshots' / commit)
        (repo / 'refs').mkdir(parents=True, exist_ok=True)
        (repo / 'refs' / 'main').write_text(commit)
        pushed[repo_id] = sorted(os.listdir(folder_path))
        return f'https://huggingface.co/{repo_id}/commit/{commit}'
    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    return pushed


def test_readme_python_examples_run(tmp_path, monkeypatch, fake_hub):
    blocks, skipped = readme_python_blocks()
    assert len(blocks) >= 3 and skipped <= MAX_SKIPPED
    torch.manual_seed(0)
    released = unitok.create_model('unitok-tiny').eval()
    unitok.save_official_checkpoint(released, str(tmp_path / 'unitok_tokenizer.pth'))
    cache_repo(tmp_path / 'hub-cache', 'FoundationVision/unitok_tokenizer',      # the cache of fake_hub
               {'unitok_tokenizer.pth': tmp_path / 'unitok_tokenizer.pth'})
    Image.new('RGB', (300, 260), (220, 120, 40)).save(tmp_path / 'cat.jpg')
    Image.new('RGB', (256, 256), (30, 90, 200)).save(tmp_path / 'dog.png')
    monkeypatch.chdir(tmp_path)

    scope = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f'README.md python block {i + 1}', 'exec'), scope)

    # what the examples claim, on the tiny model
    x, codes = scope['x'], scope['codes']
    assert x.shape == (2, 3, 256, 256) and codes.dtype == torch.int64 and codes.shape == (2, 8, 16, 16)
    assert torch.equal(codes, released.encode(x))                     # the released weights were used
    assert torch.equal(scope['released'].encode(x), codes)            # ... also by their hub name
    assert scope['images'].shape == (2, 3, 256, 256) and os.path.isfile('cat_rec.png')
    torch.testing.assert_close(scope['same'], scope['images'], rtol=0, atol=1e-6)
    assert scope['seq'].shape == (2, 256, 8)
    assert scope['logits'].shape == (2, 2)
    out = scope['out']
    assert out.codes.shape == (2, 8, 256) and torch.equal(scope['q'].lookup(out.codes), out.quantized)
    assert sorted(os.listdir('unitok-large')) == ['README.md', 'config.json', 'model.safetensors']
    assert fake_hub == {'your-name/unitok-large': ['README.md', 'config.json', 'model.safetensors']}
    from_hub = scope['model']                                          # the hub example loads it back
    assert torch.equal(from_hub.encode(x), codes)
    assert scope['sampled'].shape == (2, 8, 4, 4) and scope['pictures'].shape == (2, 3, 64, 64)   # generation


def test_install_section_names_the_distribution_in_pyproject():
    tomllib = pytest.importorskip('tomllib')
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        project = tomllib.load(f)['project']
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    name = project['name']
    assert name != 'unitok'                                # PyPI's `unitok` is an unrelated project
    assert f'**The package name is `{name}`.**' in readme and f'pip uninstall unitok {name}' in readme
    assert project['scripts'] == {'unitok': 'unitok.cli:main'}
    assert project['license'] == 'Apache-2.0'              # SPDX string, not the deprecated table


def test_import_warns_when_the_unrelated_unitok_package_is_installed(monkeypatch):
    from importlib import metadata

    class Dist:
        def __init__(self, summary, version):
            self.metadata, self.version = {'Summary': summary}, version

    found = {}

    def distribution(name):
        if name not in found:
            raise metadata.PackageNotFoundError(name)
        return found[name]
    monkeypatch.setattr(metadata, 'distribution', distribution)
    with pytest.warns(RuntimeWarning, match=r"the unrelated PyPI package 'unitok' 4\.4\.4 is installed in this "
                                            r'environment too.*pip uninstall unitok unitok-vision'):
        found['unitok'] = Dist('A tabular preprocessing toolkit', '4.4.4')
        unitok._warn_if_the_other_unitok_is_installed()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        found['unitok'] = Dist('UniTok: a unified discrete image tokenizer', '0.1.0')   # this project, old name
        unitok._warn_if_the_other_unitok_is_installed()
        del found['unitok']
        unitok._warn_if_the_other_unitok_is_installed()
