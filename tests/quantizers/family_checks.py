"""What every quantizer of the family must do inside UniTok, as a base class: a test module subclasses
:class:`FamilyChecks` with the registry ``name``, the ``unitok-tiny`` overrides of its shape and its
expected vocabularies, and pytest runs every check for it."""
import pytest
import torch

import unitok
from unitok.codes import CodeDataset, CodeFormatError, ExportConfig, export_codes


def tiny_model(name: str, seed: int = 0, **overrides) -> unitok.UniTok:
    torch.manual_seed(seed)
    model = unitok.create_model('unitok-tiny', quantizer=name, **overrides)
    model.init_weights()
    return model.eval()


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class FamilyChecks:
    name: str
    overrides: dict = {}
    vocab_sizes: tuple[int, ...]
    other = 'multi_codebook'            # a quantizer whose tokenizer must refuse this one's codes
    other_overrides: dict = {}

    def model(self, seed: int = 0) -> unitok.UniTok:
        return tiny_model(self.name, seed, **self.overrides)

    def latents(self, q, seed: int = 1) -> torch.Tensor:
        return 3 * torch.randn(4, 24, q.latent_dim, generator=torch.Generator().manual_seed(seed))

    def test_codes_lie_in_the_declared_vocabularies(self):
        q = self.model().quantizer
        assert q.name == self.name and tuple(q.vocab_sizes) == self.vocab_sizes
        with torch.no_grad():
            codes = q(self.latents(q)).codes
        assert codes.dtype == torch.int64 and codes.shape == (4, len(self.vocab_sizes), 24)
        for k, V in enumerate(self.vocab_sizes):
            assert 0 <= int(codes[:, k].min()) and int(codes[:, k].max()) < V
            assert q.code_vectors(k).shape[0] == V
        assert len(codes.unique()) > 16                                  # not one constant code

    def test_codebook_health_is_counted_per_sub_code(self):
        from unitok.eval.metrics.codebook import CodebookStats
        q = self.model().quantizer
        codes = q.nearest_codes(self.latents(q))
        stats = CodebookStats.for_quantizer(q)
        stats.update(codes)
        out = stats.compute()
        assert len(out['per_codebook']) == len(self.vocab_sizes) and out['tokens'] == 4 * 24
        for k, (V, row) in enumerate(zip(self.vocab_sizes, out['per_codebook'])):
            assert row['usage'] == codes[:, k].unique().numel() / V     # for FSQ/LFQ/BSQ: the values of group k

    @pytest.mark.parametrize('training', [True, False])
    def test_lookup_of_the_codes_is_the_quantized_output_without_autograd(self, training):
        q = self.model().quantizer.train(training)
        z = self.latents(q)
        with torch.no_grad():
            out = q(z, update_usage=False)
        assert torch.equal(q.lookup(out.codes), out.quantized)
        assert torch.equal(q.nearest_codes(z), out.codes)
        with_grad = q(z.clone().requires_grad_(), update_usage=False)    # straight through: the same values
        assert torch.equal(with_grad.codes, out.codes)
        torch.testing.assert_close(with_grad.quantized, out.quantized, atol=1e-5, rtol=1e-5)

    def test_reconstruction_gradients_reach_the_encoder(self):
        model = self.model().train()
        out = model(images())
        out.reconstruction.abs().mean().backward()                       # no quantizer loss: only the straight-through path
        stem = model.encoder.patch_embed.backbone.stem.conv1.weight     # the first layer of the encoder
        assert stem.grad is not None and float(stem.grad.abs().sum()) > 0
        assert torch.isfinite(out.quantizer_loss) and torch.isfinite(out.entropy_loss)
        assert out.codebook_usage.shape == (len(self.vocab_sizes),) and 0 < float(out.codebook_usage.min()) <= 1

    def test_save_and_load_round_trip(self, tmp_path):
        model = self.model()
        model.save_pretrained(str(tmp_path / 'm'))
        loaded = unitok.UniTok.from_pretrained(str(tmp_path / 'm')).eval()
        assert loaded.config == model.config and loaded.config.quantizer == self.name
        assert type(loaded.quantizer) is type(model.quantizer)
        assert loaded.quantizer.identity() == model.quantizer.identity()
        x = images()
        with torch.no_grad():
            codes = model.encode(x)
            assert torch.equal(loaded.encode(x), codes)
            assert torch.equal(loaded.decode(codes), model.decode(codes))

    @pytest.fixture(scope='class')
    def exported(self, tmp_path_factory):
        """This quantizer's tokenizer saved, its codes of 32 training and 8 held-out emoji exported."""
        root = tmp_path_factory.mktemp(self.name)
        model = self.model()
        model.save_pretrained(str(root / 'tokenizer'))
        for split, limit in (('train', 32), ('val', 8)):
            export_codes(model, ExportConfig(data='builtin:emoji', split=split, limit=limit), str(root / split))
        return root

    def test_exported_codes_train_a_generator_whose_samples_decode(self, exported):
        from unitok.eval.loading import load_generator
        from unitok.generation import generate
        from unitok.train import Trainer
        from unitok.train.tasks.generator import GenTrainConfig
        ds = CodeDataset(str(exported / 'train'))
        assert (ds.num_codebooks, ds.codebook_size, tuple(ds.grid)) == (len(self.vocab_sizes), self.vocab_sizes[0], (4, 4))
        cfg = GenTrainConfig(out=str(exported / 'gen'), steps=1, precision='fp32', log_every=1, eval_every=0,
                             image_every=0, ckpt_every=0, tokenizer=str(exported / 'tokenizer'))
        cfg = cfg.override([f'data.train={exported / "train"}', f'data.val={exported / "val"}', 'data.batch_size=8',
                            'model.dim=64', 'model.num_heads=2', 'model.depth=2'])
        summary = Trainer(cfg).fit()
        assert summary['exit'] == 'finished' and summary['step'] == 1
        generator, tokenizer, _ = load_generator(str(exported / 'gen' / 'model'))
        with torch.no_grad():
            codes = generate(generator, torch.tensor([0, 1]), generator=0)
            decoded = tokenizer.decode(codes)
        assert codes.shape == (2, len(self.vocab_sizes), 4, 4)
        tokenizer.quantizer.check_codes(codes.flatten(2))
        assert decoded.shape == (2, 3, 64, 64) and torch.isfinite(decoded).all()

    def test_codes_are_refused_by_a_tokenizer_with_another_quantizer(self, exported):
        ds = CodeDataset(str(exported / 'train'))
        ds.check_tokenizer(unitok.UniTok.from_pretrained(str(exported / 'tokenizer')))      # its own: accepted
        other = tiny_model(self.other, **self.other_overrides)
        with pytest.raises(CodeFormatError, match=f"another tokenizer.*quantizer.*{self.name}") as info:
            ds.check_tokenizer(other)
        assert len(str(info.value).splitlines()) == 1
