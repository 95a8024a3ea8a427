"""A quantizer defined only here plugs into UniTok through the registry (no edit to the library):
it trains a tokenizer step, its codes are exported and a generator trains on them. Every registered
quantizer also keeps the interface's invariants."""
import json
import math

import pytest
import torch

import unitok
from train_helpers import tiny_config
from unitok.config import ConfigError, UniTokConfig
from unitok.quantizers import QUANTIZERS, Quantizer, QuantizerOutput, create_quantizer, register_quantizer

NAME = 'test_scalar_rounding'


class ScalarRounding(Quantizer):
    """Grouped scalar rounding (FSQ-like): each of the K chunks of d dims is squashed by tanh and each
    dim rounded to one of ``levels[i]`` evenly spaced values; a sub-code is the mixed-radix number of
    the d rounded levels, so V = prod(levels). No parameters, no codebook."""

    def __init__(self, num_codebooks: int, code_dim: int, levels: tuple[int, ...]):
        super().__init__()
        assert len(levels) == code_dim
        self.num_codebooks, self.code_dim, self.levels = num_codebooks, code_dim, tuple(levels)
        self.vocab_sizes = (math.prod(levels),) * num_codebooks
        self.latent_dim = num_codebooks * code_dim
        self.basis = [math.prod(levels[:i]) for i in range(code_dim)]

    def _grid(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.levels, device=device) - 1).float(), torch.tensor(self.basis, device=device)

    def _values(self, idx: torch.Tensor) -> torch.Tensor:
        top, _ = self._grid(idx.device)
        return idx.float() / top * 2 - 1                                        # levels -> [-1, 1]

    def forward(self, latents, update_usage=None):
        B, L, _ = latents.shape
        z = torch.tanh(latents.float().view(B, L, self.num_codebooks, self.code_dim))   # (B, L, K, d)
        top, basis = self._grid(z.device)
        idx = torch.round((z.detach() + 1) / 2 * top).long()                    # (B, L, K, d)
        q = self._values(idx)
        quantized = z + (q - z).detach() if z.requires_grad else q
        codes = (idx * basis).sum(-1).permute(0, 2, 1)                          # (B, K, L)
        return QuantizerOutput(quantized.reshape(B, L, -1), codes, losses={'commitment': z.new_zeros(())})

    @torch.no_grad()
    def nearest_codes(self, latents):
        return self(latents).codes

    def lookup(self, codes):
        self.check_codes(codes)
        _, basis = self._grid(codes.device)
        idx = codes.long().permute(0, 2, 1)[..., None] // basis % torch.tensor(self.levels, device=codes.device)
        B, L = idx.shape[:2]
        return self._values(idx).reshape(B, L, -1)                              # (B, L, K*d)

    def code_vectors(self, k):
        every = torch.arange(self.vocab_sizes[k])[None, :, None].expand(1, -1, self.num_codebooks)
        return self.lookup(every.permute(0, 2, 1).contiguous()).view(-1, self.num_codebooks, self.code_dim)[:, k]


@register_quantizer(NAME)
def _build(config):
    levels = [1] * config.code_dim            # the power-of-two vocabulary spread over the d dims
    while math.prod(levels) < config.codebook_size:
        levels[levels.index(min(levels))] *= 2
    assert math.prod(levels) == config.codebook_size, 'a power-of-two codebook_size of at least 2^code_dim'
    return ScalarRounding(config.num_codebooks, config.code_dim, tuple(levels))


# ---------------------------------------------------------------------------- the interface, every quantizer
SHAPES = {'vq': dict(num_codebooks=1, codebook_size=4096, code_dim=32)}     # a 32-wide latent for every one


def _model(name, **overrides):
    torch.manual_seed(0)
    model = unitok.create_model('unitok-tiny', quantizer=name, **{**SHAPES.get(name, {}), **overrides})
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('name', sorted(QUANTIZERS))
def test_every_quantizer_keeps_the_interface_invariants(name, tmp_path):
    q = create_quantizer(UniTokConfig.from_preset('unitok-tiny', quantizer=name, **SHAPES.get(name, {})))
    q.init_weights()
    K = q.num_codebooks
    assert isinstance(q, Quantizer) and len(q.vocab_sizes) == K and q.latent_dim == 32
    latents = torch.randn(2, 24, q.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = q(latents, update_usage=False)
    assert out.codes.shape == (2, K, 24) and out.codes.dtype == torch.int64
    assert out.quantized.shape == (2, 24, q.latent_dim) and out.quantized.dtype == torch.float32
    for k, V in enumerate(q.vocab_sizes):
        assert 0 <= int(out.codes[:, k].min()) and int(out.codes[:, k].max()) < V
        assert q.code_vectors(k).shape[0] == V and q.code_vectors(k).dtype == torch.float32
    assert torch.equal(q.lookup(out.codes), out.quantized)                     # eval round trip
    assert torch.equal(q.nearest_codes(latents), out.codes)
    assert 'commitment' in out.losses
    bad = out.codes.clone()
    bad[0, K - 1, 0] = q.vocab_sizes[K - 1]
    with pytest.raises(ValueError, match='codes'):
        q.check_codes(bad)
    with pytest.raises(TypeError, match='integer'):
        q.lookup(out.codes.float())
    grad_in = latents.clone().requires_grad_()
    q(grad_in).quantized.sum().backward()                                      # straight through
    assert grad_in.grad is not None and grad_in.grad.abs().sum() > 0

    model = _model(name)
    ident = model.quantizer.identity()
    assert json.loads(json.dumps(ident)) == ident and ident['quantizer'] == name
    assert ident['vocab_sizes'] == list(model.quantizer.vocab_sizes)
    model.save_pretrained(str(tmp_path / 'm'))
    loaded = unitok.UniTok.from_pretrained(str(tmp_path / 'm'))
    assert loaded.config.quantizer == name and loaded.quantizer.identity() == ident
    params = list(model.quantizer.parameters())
    if params:                                           # another codebook: another identity
        with torch.no_grad():
            params[0].add_(torch.randn_like(params[0]))
        other = model.quantizer.identity()
    else:                                                # no learned table: another vocabulary
        other = _model(name, codebook_size=256).quantizer.identity()
    assert other['digest'] != ident['digest']


def test_unknown_quantizer_names_the_registered_ones():
    cfg = UniTokConfig.from_preset('unitok-tiny', quantizer='no_such_quantizer')       # checked when built
    with pytest.raises(ConfigError, match=r"unknown quantizer 'no_such_quantizer'.*multi_codebook"):
        unitok.UniTok(cfg)
    with pytest.raises(ValueError, match='registered already'):
        register_quantizer('multi_codebook')(_build)


def test_config_without_the_field_loads_as_the_multi_codebook_quantizer(tmp_path):
    model = unitok.create_model('unitok-tiny')
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / 'config.json').read_text())
    assert 'quantizer' not in saved                     # the default is not written: old files stay valid
    loaded = unitok.UniTok.from_pretrained(str(tmp_path))
    assert loaded.config.quantizer == 'multi_codebook'
    assert type(loaded.quantizer) is unitok.MultiCodebookQuantizer
    assert UniTokConfig.from_preset('unitok-tiny', quantizer=NAME).to_dict()['quantizer'] == NAME


# ---------------------------------------------------------------------------- the plug-in end to end
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One tokenizer step with the plug-in quantizer, through the library's training entry."""
    from unitok.train import Trainer
    out = tmp_path_factory.mktemp('plugin') / 'run'
    cfg = tiny_config(out, steps=1, **{'model.quantizer': NAME, 'model.image_size': 32, 'data.batch_size': 4,
                                       'loss.discriminator': 'none', 'loss.perceptual': 'none'})
    summary = Trainer(cfg).fit()
    return summary, out


def test_plugin_trains_a_tokenizer_step(trained):
    summary, out = trained
    assert summary['exit'] == 'finished' and summary['step'] == 1 and summary['nonfinite_steps'] == 0
    model = unitok.UniTok.from_pretrained(str(out / 'model'))
    assert isinstance(model.quantizer, ScalarRounding) and model.config.quantizer == NAME
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (2, 8, 2, 2) and model.decode(codes).shape == (2, 3, 32, 32)


@pytest.fixture(scope='module')
def exported(trained):
    from unitok.codes import ExportConfig, export_codes
    _, out = trained
    model = unitok.UniTok.from_pretrained(str(out / 'model'))
    root = out.parent
    for split, limit in (('train', 32), ('val', 8)):
        export_codes(model, ExportConfig(data='builtin:emoji', split=split, limit=limit), str(root / split))
    return root


def test_plugin_codes_export(exported):
    from unitok.codes import CodeDataset
    ds = CodeDataset(str(exported / 'train'))
    assert len(ds) == 32 and (ds.num_codebooks, ds.codebook_size, tuple(ds.grid)) == (8, 512, (2, 2))


def test_plugin_generator_trains_on_its_codes(exported, trained):
    from unitok.train import Trainer
    from unitok.train.tasks.generator import GenTrainConfig
    _, out = trained
    cfg = GenTrainConfig(out=str(exported / 'gen'), steps=1, precision='fp32', log_every=1, eval_every=0,
                         image_every=0, ckpt_every=0, tokenizer=str(out / 'model'))
    cfg = cfg.override([f'data.train={exported / "train"}', f'data.val={exported / "val"}', 'data.batch_size=8',
                        'model.dim=64', 'model.num_heads=2', 'model.depth=2'])
    summary = Trainer(cfg).fit()
    assert summary['exit'] == 'finished' and summary['step'] == 1
