"""The save/load contract (unitok.pretrained): directories, hub ids, model cards, push_to_hub."""
import os

import pytest
import torch

import unitok
from unitok import CheckpointError, UniTok
from unitok.utils.io import atomic_write


def test_save_load_round_trip(tiny_model, images64, tmp_path):
    tiny_model.quantizer.vocab_usage.uniform_()
    tiny_model.save_pretrained(str(tmp_path / 'm'))
    assert sorted(os.listdir(tmp_path / 'm')) == ['README.md', 'config.json', 'model.safetensors']
    assert (tmp_path / 'm' / 'config.json').read_text() == tiny_model.config.to_json() + '\n'
    loaded = UniTok.from_pretrained(str(tmp_path / 'm'))
    assert loaded.config == tiny_model.config and not loaded.training
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(loaded.encode(images64), tiny_model.encode(images64))
    torch.testing.assert_close(loaded.reconstruct(images64), tiny_model.reconstruct(images64), rtol=0, atol=0)
    # also through the weights file path and the non-persistent buffers
    again = UniTok.from_pretrained(str(tmp_path / 'm' / 'model.safetensors'))
    assert torch.equal(again.quantizer._offsets, tiny_model.quantizer._offsets)
    assert torch.equal(again.text_encoder.attn_mask, tiny_model.text_encoder.attn_mask)


def test_pretrained_dir_problems(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match='missing'):
        os.makedirs(tmp_path / 'empty')
        UniTok.from_pretrained(str(tmp_path / 'empty'))
    tiny_model.save_pretrained(str(tmp_path / 'm'))
    (tmp_path / 'm' / 'model.safetensors').write_bytes(b'\x00' * 10)
    with pytest.raises(CheckpointError, match='cannot read'):
        UniTok.from_pretrained(str(tmp_path / 'm'))
    with pytest.raises(CheckpointError, match="'no-such-owner/no-such-model' is not in the local Hugging Face "
                                              'cache, and HF_HUB_OFFLINE=1 forbids downloading it'):
        UniTok.from_pretrained('no-such-owner/no-such-model')   # HF_HUB_OFFLINE=1 in tests
    with pytest.raises(CheckpointError, match='no model at'):
        UniTok.from_pretrained('./not/here')


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / 'f.bin'
    path.write_bytes(b'old')

    def fail(f):
        f.write(b'partial')
        raise RuntimeError('disk full')
    with pytest.raises(RuntimeError):
        atomic_write(str(path), fail)
    assert path.read_bytes() == b'old' and os.listdir(tmp_path) == ['f.bin']


# ---------------------------------------------------------------------- path or hub id, never a guess
@pytest.mark.parametrize('name,match', [
    ('unitok-tiny', r"'unitok-tiny' is a preset name, not a saved model: use unitok.create_model\('unitok-tiny'\)"),
    ('runs/model.pth', "no model at 'runs/model.pth': no such file or directory, and not a Hugging Face hub id"),
    ('./owner/name', 'no model at'),
    ('runs/tiny/model', 'no model at'),
    ('just-a-name', 'no model at'),
    ('bad--id/x', 'no model at'),
])
def test_not_a_path_nor_a_hub_id_is_not_sent_to_the_hub(monkeypatch, name, match):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError('must not reach the hub')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', no_download)
    with pytest.raises(CheckpointError, match=match):
        UniTok.from_pretrained(name)


def _cache_hub_model(monkeypatch, tmp_path, repo_id, model=None, files=None):
    """A Hugging Face cache holding ``repo_id`` at revision main, as snapshot_download leaves it."""
    from huggingface_hub import constants
    cache = tmp_path / 'hub-cache'
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    commit = 'c' * 40
    snapshot = repo / 'snapshots' / commit
    if model is not None:
        model.save_pretrained(str(snapshot))
    for name, text in (files or {}).items():
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)


def test_cached_hub_model_loads_offline(tiny_model, images64, tmp_path, monkeypatch):
    _cache_hub_model(monkeypatch, tmp_path, 'someone/unitok-tiny', tiny_model)
    loaded = UniTok.from_pretrained('someone/unitok-tiny')          # HF_HUB_OFFLINE=1: from the cache only
    assert loaded.config == tiny_model.config
    assert torch.equal(loaded.encode(images64), tiny_model.encode(images64))
    with pytest.raises(CheckpointError, match="hub model 'someone/unitok-tiny' at revision 'v2' is not in the "
                                              'local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids'):
        UniTok.from_pretrained('someone/unitok-tiny', revision='v2')


def test_hub_repo_that_is_not_a_unitok_model(tmp_path, monkeypatch):
    _cache_hub_model(monkeypatch, tmp_path, 'someone/other', files={'config.json': '{"model_type": "bert"}'})
    with pytest.raises(CheckpointError, match="hub model 'someone/other' is not a UniTok model: it holds neither "
                                              r'config.json \+ model.safetensors .* the local cache holds: config.json$'):
        UniTok.from_pretrained('someone/other')


# ---------------------------------------------------------------------- model card, push_to_hub
def test_model_card_describes_the_model_and_its_example_runs(tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard
    from PIL import Image

    model = unitok.create_model('unitok-tiny', num_codebooks=4, codebook_size=256, code_dim=8)
    model.save_pretrained(str(tmp_path / 'tiny-4x256'))
    card = ModelCard.load(str(tmp_path / 'tiny-4x256' / 'README.md'))
    assert card.data.library_name == 'unitok'
    assert {'image-tokenizer', 'vector-quantization', 'multi-codebook-quantization'} <= set(card.data.tags)
    for fact in ['# tiny-4x256', '| encoder | `vitamin_tiny`', '| image size | 64 px',
                 '| codes | 4 sub-codebooks x 256 codes of 8 dims (latent width 32) |',
                 '| tokens per image | 4 x 4 grid, each a tuple of 4 codes |', '| image/text embedding | 128 dims',
                 f"| parameters | {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M", 'arxiv.org/abs/2502.20321',
                 'pip install unitok-vision', "UniTok.from_pretrained('tiny-4x256')"]:
        assert fact in card.text, fact
    # the card's example loads this model and gives the codes the card states
    example = card.text.split('```python\n')[1].split('```')[0]
    Image.new('RGB', (80, 64), (200, 30, 90)).save(tmp_path / 'photo.jpg')
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(example, 'model card', 'exec'), scope)
    assert scope['codes'].shape == (1, 4, 4, 4) and '# (1, 4, 4, 4) int64' in example
    assert torch.equal(scope['codes'], model.encode(scope['x']))
    assert scope['images'].shape == (1, 3, 64, 64)


def test_hand_written_model_card_is_kept_generated_one_refreshed(tiny_model, tmp_path):
    directory = tmp_path / 'm'
    tiny_model.save_pretrained(str(directory))
    other = unitok.create_model('unitok-tiny', codebook_size=128)
    other.save_pretrained(str(directory))                 # our own card follows the new config
    assert '8 sub-codebooks x 128 codes' in (directory / 'README.md').read_text()
    (directory / 'README.md').write_text('# my notes\n')
    tiny_model.save_pretrained(str(directory))
    assert (directory / 'README.md').read_text() == '# my notes\n'
    assert UniTok.from_pretrained(str(directory)).config == tiny_model.config


def test_push_to_hub_uploads_what_save_pretrained_writes(tiny_model, images64, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls['create'] = (repo_id, kwargs)
        return RepoUrl(f'https://huggingface.co/me/{repo_id}')       # the hub adds the user's namespace

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls['upload'] = (repo_id, kwargs, sorted(os.listdir(folder_path)))
        calls['card'] = open(os.path.join(folder_path, 'README.md')).read()
        calls['model'] = UniTok.from_pretrained(folder_path)
        return f'https://huggingface.co/{repo_id}/commit/abc'
    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    url = tiny_model.push_to_hub('unitok-tiny', private=True, commit_message='first')
    assert url == 'https://huggingface.co/me/unitok-tiny/commit/abc'
    assert calls['create'] == ('unitok-tiny', {'private': True, 'exist_ok': True, 'repo_type': 'model'})
    repo_id, kwargs, files = calls['upload']
    assert repo_id == 'me/unitok-tiny' and files == ['README.md', 'config.json', 'model.safetensors']
    assert kwargs['commit_message'] == 'first' and kwargs['repo_type'] == 'model'
    assert "UniTok.from_pretrained('me/unitok-tiny')" in calls['card'] and '# me/unitok-tiny' in calls['card']
    assert torch.equal(calls['model'].encode(images64), tiny_model.encode(images64))


def test_push_to_hub_errors_are_clear(tiny_model, monkeypatch):
    from huggingface_hub import HfApi
    with pytest.raises(CheckpointError, match="cannot push to 'me/x': HF_HUB_OFFLINE=1 disables the Hugging Face hub"):
        tiny_model.push_to_hub('me/x')                       # the real HfApi, offline in tests
    with pytest.raises(CheckpointError, match="cannot push to 'a/b/c': not a valid hub repository id"):
        tiny_model.push_to_hub('a/b/c')

    def refused(self, repo_id, **kwargs):
        raise PermissionError('401 Client Error: Unauthorized')
    monkeypatch.setattr(HfApi, 'create_repo', refused)
    with pytest.raises(CheckpointError, match=r"pushing to 'me/x' on the Hugging Face hub failed \(PermissionError: "
                                              r'401 Client Error: Unauthorized\). Log in with `hf auth login`'):
        tiny_model.push_to_hub('me/x')


# ---------------------------------------------------------------------- one contract for every model
def _model_and_load_options(kind, tiny_model):
    """A small model of each class and the options its from_pretrained needs."""
    if kind == 'unitok':
        return tiny_model, {}
    if kind == 'generator':
        from unitok.generation import GeneratorConfig, GeneratorModel
        torch.manual_seed(0)
        return GeneratorModel(GeneratorConfig(num_codebooks=4, codebook_size=32, grid=(3, 4), dim=32, depth=2,
                                              num_heads=2, num_classes=5)).eval(), {}
    pytest.importorskip('transformers')
    from unitok.mllm import UniTokMLLM
    from unitok.mllm.tiny import tiny_llm
    torch.manual_seed(0)
    mllm = UniTokMLLM.build(tiny_model, tiny_llm(), head_width=32, head_heads=2, head_depth=1)
    return mllm.eval(), {'llm': tiny_llm(), 'tokenizer': tiny_model}


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize('kind', ['unitok', 'generator', 'mllm'])
def test_every_model_saves_and_loads_through_the_one_contract(kind, tiny_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from unitok.pretrained import Pretrained
    model, options = _model_and_load_options(kind, tiny_model)
    cls = type(model)
    assert issubclass(cls, Pretrained)
    assert not {'_load_pretrained', '_load_dir', '_from_state'} & set(vars(cls))   # the loading path is shared
    # save + load: the class's own file names, the same tensors
    directory = tmp_path / 'm'
    model.save_pretrained(str(directory))
    assert {cls.config_file, cls.weights_file} <= set(os.listdir(directory))
    again = cls.from_pretrained(str(directory), **options)
    assert type(again) is cls and not again.training
    _same_state(model, again)
    # strict keys: a missing and an unexpected tensor are both named
    weights = directory / cls.weights_file
    state = load_file(str(weights))
    dropped = sorted(state)[-1]
    state['extra.weight'] = state.pop(dropped)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=rf'1 missing key\(s\): {dropped}; 1 unexpected key\(s\): extra.weight'):
        cls.from_pretrained(str(directory), **options)
    # non-finite weights are refused, naming the tensor and the file
    state[dropped] = state.pop('extra.weight')
    poisoned = next(k for k in sorted(state) if state[k].is_floating_point() and state[k].numel() > 3)
    state[poisoned] = state[poisoned].clone()
    state[poisoned].view(-1)[:3] = float('nan')
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=rf"{cls.weights_file}: tensor '{poisoned}' holds 3 non-finite"):
        cls.from_pretrained(str(directory), **options)
    # a hub id, from a Hugging Face cache filled locally (HF_HUB_OFFLINE=1 in tests)
    _cache_hub_model(monkeypatch, tmp_path, f'someone/{kind}', model)
    _same_state(model, cls.from_pretrained(f'someone/{kind}', **options))
    with pytest.raises(CheckpointError, match=f"hub model 'someone/{kind}' at revision 'v2' is not in the local"):
        cls.from_pretrained(f'someone/{kind}', revision='v2', **options)


def test_a_full_disk_while_saving_the_weights_is_one_error_naming_the_file(tiny_model, tmp_path, monkeypatch):
    """safetensors reports a full disk as 'I/O error: ... (os error 28)': it becomes the OutputError of every write."""
    from safetensors import SafetensorError

    from unitok import pretrained
    from unitok.utils.io import OutputError

    def full(state, path, metadata=None):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    monkeypatch.setattr(pretrained, 'save_file', full)
    with pytest.raises(OutputError, match=r"cannot write .*model weights '.*model.safetensors': the disk is full"):
        tiny_model.save_pretrained(str(tmp_path / 'm'))
    assert not os.path.exists(tmp_path / 'm' / 'model.safetensors')
