"""What the Tokenize and Sub-codebooks tabs compute: code maps, mixes, drops, the codes file round trip."""
import numpy as np
import pytest
import torch

import unitok
from unitok.apps.studio import tokens
from unitok.apps.studio.limits import StudioInputError
from unitok.codes.npz import read_codes_file
from unitok.images import to_tensor


pytestmark = pytest.mark.usefixtures('one_thread')


def test_tokenize_and_the_codes_file_round_trip(studio_dir, tmp_path):
    tok = unitok.UniTok.from_pretrained(studio_dir['tokenizer']).eval()
    from PIL import Image
    t = tokens.tokenize(tok, Image.open(studio_dir['images']['a.png']).convert('RGB'))
    assert torch.equal(t.codes, tok.encode(to_tensor(studio_dir['images']['a.png'], size=64)))
    assert torch.equal(t.reconstruction, tok.decode(t.codes).clamp(-1, 1))
    text = tokens.summary(t, 512)
    assert '128 codes of 9 bits: **144 bytes**' in text and f'{t.png_bytes * 8 / 1152:,.1f}x' in text
    path = str(tmp_path / 'codes.npz')
    tokens.save_codes(path, tok, t.codes, ['upload'])
    assert torch.equal(read_codes_file(path).codes, t.codes)                  # what `unitok decode` reads
    images, names = tokens.decode_codes_file(path, tok)
    assert torch.equal(images, tok.decode(t.codes).clamp(-1, 1)) and names == ['upload']
    torch.manual_seed(7)
    other = unitok.create_model('unitok-tiny').eval()                           # another tokenizer's codes
    with pytest.raises(StudioInputError, match='the uploaded file') as e:
        tokens.decode_codes_file(path, other)
    assert str(tmp_path) not in str(e.value)                                  # no server path in the page


def test_code_maps_colour_each_code_index():
    codes = torch.tensor([[[1, 1], [2, 500]], [[3, 3], [3, 3]]])
    maps = tokens.code_maps(codes, 512, scale=2)
    assert len(maps) == 2 and maps[0].size == (4, 4)
    a = np.asarray(maps[0])
    assert (a[0, 0] == a[0, 2]).all() and not (a[0, 0] == a[2, 0]).all() and not (a[2, 0] == a[2, 2]).all()
    assert (np.asarray(maps[1]) == np.asarray(maps[1])[0, 0]).all()
    assert (a[0, 0] == np.asarray(maps[0])[1, 1]).all()                       # a token is scale x scale pixels


def test_mix_takes_the_chosen_sub_codebooks_from_b():
    a, b = torch.zeros(1, 4, 2, 2, dtype=torch.long), torch.ones(1, 4, 2, 2, dtype=torch.long)
    mixed = tokens.mix_codes(a, b, [1, 3])
    assert mixed[0, :, 0, 0].tolist() == [0, 1, 0, 1] and a.sum() == 0
    with pytest.raises(StudioInputError, match='different shapes'):
        tokens.mix_codes(a, b[:, :, :1], [0])


def test_drop_replaces_a_sub_codebook_by_its_most_frequent_code():
    codes = torch.tensor([[[[5, 5], [7, 9]], [[1, 2], [3, 4]]], [[[8, 6], [6, 8]], [[0, 0], [0, 0]]]])   # (2, 2, 2, 2)
    dropped = tokens.drop_codebook(codes, 0)
    assert (dropped[0, 0] == 5).all() and (dropped[1, 0] == 6).all()          # per image; ties: smallest index
    assert torch.equal(dropped[:, 1], codes[:, 1])
