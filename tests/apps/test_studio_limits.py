"""The studio's input caps: uploads (bytes, pixels, not an image, CMYK, 16-bit), texts, labels, numbers."""
import math

import numpy as np
import pytest

from unitok.apps.studio.limits import (
    StudioInputError, StudioLimits, check_labels, check_number, check_text, read_image,
)
from unitok.images import to_tensor

LIMITS = StudioLimits(max_upload_mb=1, max_pixels=1_000_000, max_prompt_chars=200, max_labels=4)


def test_images_that_are_read(studio_dir):
    images = studio_dir['images']
    for name in ('a.png', 'cmyk.jpg', '16bit.png'):
        im = read_image(images[name], LIMITS)
        assert im.mode == 'RGB'
        np.testing.assert_array_equal(np.asarray(im), np.asarray(to_tensor(images[name], size=None, resize='none')
                                                                   .add(1).mul(127.5).round()[0].permute(1, 2, 0)))


@pytest.mark.parametrize('name, limits, match', [
    ('not_image.png', LIMITS, 'is not an image file PIL can read'),
    ('huge.png', StudioLimits(max_pixels=40_000_000), '12000 x 12000 = 144 megapixels; the limit is 40 megapixels'),
    ('a.png', StudioLimits(max_pixels=5000), '96 x 96 = 0 megapixels; the limit is 0.005 megapixels'),
    ('b.png', StudioLimits(max_upload_mb=0.001), 'MB; the limit is 0.001 MB'),
])
def test_refused_uploads(studio_dir, name, limits, match):
    with pytest.raises(StudioInputError, match=match):
        read_image(studio_dir['images'][name], limits)


def test_no_upload():
    with pytest.raises(StudioInputError, match='No image'):
        read_image(None, LIMITS)


def test_texts_and_labels():
    assert check_text('  a cat  ', LIMITS) == 'a cat'
    for bad, match in (('', 'is empty'), ('   ', 'is empty'), (None, 'is empty'), ('x' * 100_000, '100,000 characters')):
        with pytest.raises(StudioInputError, match=match):
            check_text(bad, LIMITS)
    assert check_labels('cat, dog\ncat,, tree ', LIMITS) == ['cat', 'dog', 'tree']
    with pytest.raises(StudioInputError, match='at least two labels'):
        check_labels('cat, cat', LIMITS)
    with pytest.raises(StudioInputError, match='5 labels; the limit is 4'):
        check_labels('a, b, c, d, e', LIMITS)


def test_numbers():
    assert check_number(2, 'Guidance', 0, 10) == 2.0 and check_number(3.0, 'Seed', 0, 9, integer=True) == 3
    for value, match in ((math.nan, 'finite'), (math.inf, 'finite'), ('2', 'finite'), (True, 'finite'),
                         (11, r'lie in \[0, 10\]'), (-1, r'lie in \[0, 10\]')):
        with pytest.raises(StudioInputError, match=match):
            check_number(value, 'Guidance', 0, 10)
    with pytest.raises(StudioInputError, match='whole number'):
        check_number(2.5, 'Seed', 0, 10, integer=True)


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match='queue_size must be a positive number'):
        StudioLimits(queue_size=0)
