"""UniTok inputs: other float dtypes are cast, bad arguments get one clear error."""

import numpy as np
import pytest
import torch

from unitok.config import ConfigError
from unitok.images import to_tensor
from fault_fixtures import model, model_dir  # noqa: F401


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_cast(model, images64, dtype):
    x = images64[:1, :, :32, :32].to(dtype)               # small: bfloat16 is slow on CPU
    ref = model.encode(x.float())                       # the same pixels at float32 precision
    assert torch.equal(model.encode(x), ref) if dtype == torch.float64 else model.encode(x).shape == ref.shape
    assert model.reconstruct(x).dtype == torch.float32
    assert model.encode_image(x).shape == (1, model.config.embed_dim)
    assert model(x).codes.shape[0] == 1


def test_bad_model_arguments(model):
    K = model.config.num_codebooks
    codes = torch.zeros(1, K, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r'grid must be \(h, w\), two positive integers'):
        model.decode(codes.flatten(2), grid=(-4, -4))
    with pytest.raises(ValueError, match=r'\(B, 8, h, w\).*batch axis'):
        model.decode(torch.zeros(K, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match='texts must be a string'):
        model.encode_text(None)
    with pytest.raises(TypeError, match='holding int'):
        model.encode_text(['ok', 3])
    with pytest.raises(ValueError, match='exactly one {}'):
        model.zero_shot_classifier(['cat', 'dog'], ['a photo'])
    with pytest.raises(ValueError, match=r'\(128, C\)'):
        model.classify(torch.zeros(1, 3, 64, 64), torch.zeros(5, 2))
    with pytest.raises(ValueError, match='recon_batch_size'):
        model(torch.zeros(1, 3, 64, 64), recon_batch_size=-1)
    with pytest.raises(ValueError, match='at least one image'):
        to_tensor([])
    with pytest.raises(ValueError, match='positive int'):
        to_tensor(np.zeros((16, 16, 3), np.uint8), size=0)


def test_recon_batch_size_means_the_same_in_model_and_training_config(model, images64):
    from unitok.train import TrainConfig
    assert model(images64, recon_batch_size=None).reconstruction.shape[0] == 2    # None: all
    assert model(images64, recon_batch_size=1).reconstruction.shape[0] == 1
    assert model(images64, recon_batch_size=0).reconstruction is None           # 0: none
    with pytest.raises(ConfigError, match='recon_batch_size must be null'):      # training needs >= 1
        TrainConfig().override(['data.recon_batch_size=0']).validate()
    TrainConfig().override(['data.recon_batch_size=null']).validate()
