import numpy as np
import pytest
import torch
from PIL import Image

from unitok import images
from unitok.images import ImageReadError


def test_uint8_round_trip_is_exact():
    a = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    x = images.to_tensor(a, resize='none')
    assert x.shape == (1, 3, 32, 48) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(images.to_uint8(x)[0], a)


def test_crop_and_pad(tmp_path):
    im = Image.fromarray(np.zeros((50, 90, 3), np.uint8))
    assert images.to_tensor(im, size=32).shape == (1, 3, 32, 32)
    assert images.to_tensor(im, size=(32, 64)).shape == (1, 3, 32, 64)
    padded = images.to_tensor(im, resize='pad')
    assert padded.shape == (1, 3, 64, 96) and padded[0, :, 50:, :].eq(1).all()
    with pytest.raises(ValueError, match='multiples of 16'):
        images.to_tensor(im, resize='none')
    path = tmp_path / 'a.png'
    im.save(path)
    assert images.to_tensor([str(path), im], size=16).shape == (2, 3, 16, 16)


def test_alpha_is_composited_on_white():
    rgba = np.zeros((16, 16, 4), np.uint8)   # fully transparent black
    x = images.to_tensor(rgba, resize='none')
    assert torch.equal(x, torch.ones_like(x))


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'\xff\xd8 not really a jpeg')
    with pytest.raises(ImageReadError, match='broken.jpg'):
        images.load_image(bad)
    with pytest.raises(ImageReadError, match='nothere.png'):
        images.to_tensor(str(tmp_path / 'nothere.png'))


def test_file_objects_and_decompression_bombs_are_read_errors(tmp_path, monkeypatch):
    import io
    buf = io.BytesIO()
    Image.new('RGB', (64, 64), 'red').save(buf, 'PNG')
    assert images.load_image(io.BytesIO(buf.getvalue())).size == (64, 64)
    with pytest.raises(ImageReadError, match='sample 7'):
        images.load_image(io.BytesIO(b'not an image'), name='sample 7')
    # PIL refuses images over twice MAX_IMAGE_PIXELS with DecompressionBombError (not an OSError).
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
    with pytest.raises(ImageReadError, match='decompression bomb'):
        images.load_image(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize('arr,error,match', [
    (np.full((16, 16, 3), 2.0), ValueError, r'\[0, 1\]'),
    (np.full((16, 16, 3), np.nan), ValueError, 'NaN'),
    (np.zeros((16, 16, 5), np.uint8), ValueError, r'\(H, W, 3\)'),
    (np.zeros((16, 16, 3), np.int32), TypeError, 'uint8, uint16 or float'),
])
def test_bad_arrays(arr, error, match):
    with pytest.raises(error, match=match):
        images.to_tensor(arr, resize='none')


def test_mixed_sizes_need_a_crop():
    with pytest.raises(ValueError, match='different sizes'):
        images.to_tensor([np.zeros((16, 16, 3), np.uint8), np.zeros((32, 16, 3), np.uint8)], resize='none')


def test_grid_and_side_by_side():
    x = torch.zeros(2, 3, 16, 16)
    pair = images.side_by_side(x, x)
    assert len(pair) == 2 and pair[0].size == (32, 16)
    assert images.make_grid([x, x]).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
