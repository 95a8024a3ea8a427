"""unitok.images: every PIL mode maps to the right RGB; modes that cannot be mapped are refused."""

import numpy as np
import pytest
from PIL import Image

from unitok.images import ImageReadError, load_image, to_rgb, to_tensor


RAMP8 = np.tile(np.arange(256, dtype=np.uint8), (4, 1))                   # mean 127.5
RAMP16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))


def _palette_grey():
    im = Image.fromarray(RAMP8, 'L').convert('P')
    return im


def _transparent(mode, colour):
    im = Image.new(mode, (8, 8), colour)
    if mode in ('P', 'PA'):
        im.putpalette([0, 0, 0] * 256)
    return im


MODES = {
    '1': (lambda: Image.fromarray(RAMP8 >= 128), 127.5),
    'L': (lambda: Image.fromarray(RAMP8, 'L'), 127.5),
    'P': (_palette_grey, 127.5),
    'RGB': (lambda: Image.fromarray(np.stack([RAMP8] * 3, -1), 'RGB'), 127.5),
    'I;16': (lambda: Image.frombytes('I;16', (256, 4), RAMP16.astype('<u2').tobytes()), 127.5),
    'I;16L': (lambda: Image.frombytes('I;16L', (256, 4), RAMP16.astype('<u2').tobytes()), 127.5),
    'I;16B': (lambda: Image.frombytes('I;16B', (256, 4), RAMP16.astype('>u2').tobytes()), 127.5),
    'I;16N': (lambda: Image.frombytes('I;16N', (256, 4), RAMP16.astype('=u2').tobytes()), 127.5),
    'I': (lambda: Image.fromarray(RAMP16.astype(np.int32)), 127.5),
    'F': (lambda: Image.fromarray(RAMP16.astype(np.float32) / 65535, 'F'), 127.5),
    'RGBA': (lambda: _transparent('RGBA', (0, 0, 0, 0)), 255.0),
    'RGBa': (lambda: _transparent('RGBa', (0, 0, 0, 0)), 255.0),
    'LA': (lambda: _transparent('LA', (0, 0)), 255.0),
    'La': (lambda: _transparent('La', (50, 100)), (127.5 * 100 + 255 * 155) / 255),   # premultiplied
    'PA': (lambda: _transparent('PA', (0, 0)), 255.0),
    'CMYK': (lambda: Image.new('CMYK', (8, 8), (0, 0, 0, 0)), 255.0),
    'YCbCr': (lambda: Image.new('YCbCr', (8, 8), (128, 128, 128)), 128.0),
    'LAB': (lambda: Image.new('LAB', (8, 8), (255, 128, 128)), 254.3),   # L* = 100 is white (PIL: 254,255,254)
    'HSV': (lambda: Image.new('HSV', (8, 8), (0, 0, 200)), 200.0),
}


@pytest.mark.parametrize('mode', sorted(MODES))
def test_every_image_mode_maps_to_the_right_rgb(mode):
    make, mean = MODES[mode]
    im = make()
    assert im.mode == mode
    rgb = np.asarray(to_rgb(im))
    assert rgb.dtype == np.uint8 and rgb.shape[-1] == 3
    assert rgb.mean() == pytest.approx(mean, abs=0.8)


def test_16_bit_png_file_is_not_white(tmp_path):
    Image.fromarray(np.tile(RAMP16, (4, 1))).save(tmp_path / 'g16.png')           # 16 x 256, mode I;16
    assert np.asarray(load_image(tmp_path / 'g16.png')).mean() == pytest.approx(127.5, abs=0.5)
    x = to_tensor(str(tmp_path / 'g16.png'), resize='none')
    assert float(x.mean()) == pytest.approx(0.0, abs=0.01)


def test_transparency_key_and_exif_orientation(tmp_path):
    im = Image.new('RGB', (16, 16), (0, 0, 0))
    im.save(tmp_path / 'key.png', transparency=(0, 0, 0))       # tRNS: black is transparent
    assert np.asarray(load_image(tmp_path / 'key.png')).min() == 255
    tall = Image.new('RGB', (16, 32), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                                           # rotate 90 degrees to display
    tall.save(tmp_path / 'rot.jpg', exif=exif)
    assert load_image(tmp_path / 'rot.jpg').size == (32, 16)


@pytest.mark.parametrize('make,match', [
    (lambda: Image.fromarray(np.full((4, 4), 200.0, np.float32), 'F'), r'\[0, 1\]'),
    (lambda: Image.fromarray(np.full((4, 4), -5, np.int32)), '16-bit range'),
    (lambda: Image.fromarray(np.full((4, 4), 70000, np.int32)), '16-bit range'),
])
def test_modes_that_cannot_be_mapped_are_refused(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        to_rgb(make())
    make().save(tmp_path / 'x.tiff')
    with pytest.raises(ImageReadError, match='x.tiff'):
        load_image(tmp_path / 'x.tiff')


def test_uint16_arrays_scale_like_16_bit_files():
    x = to_tensor(np.tile(RAMP16[:, :, None], (4, 1, 3)), resize='none')
    assert float(x.mean()) == pytest.approx(0.0, abs=0.01)
