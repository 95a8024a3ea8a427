"""Webdataset shards of image-text pairs (the DataComp / LAION layout: ``key.jpg|png|webp`` + ``key.txt``).

Shards are streamed from local paths or URLs (brace patterns such as ``shards/{000000..000123}.tar``;
``::`` joins several patterns). Corrupt tar members and undecodable images are skipped and counted.
"""
from __future__ import annotations

import io
import os
import random
from typing import Any, Iterator


from ..images import ImageReadError, load_image

IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')
TEXT_KEYS = ('txt', 'text', 'caption')


class WebDatasetSource:
    """Streamed shards. Args: ``urls`` pattern; ``resampled``: draw shards with replacement (for
    training on many nodes: every rank and worker gets an endless, independent stream);
    ``shuffle_buffer``: samples kept for in-stream shuffling."""

    templates = ('a photo of a {}.',)
    classnames = None

    def __init__(self, urls: str, resampled: bool = True, shuffle_buffer: int = 1000):
        from webdataset.shardlists import expand_urls
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f'no shards in {urls!r}')
        local = [u for u in self.urls if '://' not in u and not u.startswith('pipe:')]
        missing = [u for u in local if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f'{len(missing)} shard file(s) missing, e.g. {missing[0]!r}')
        if not isinstance(shuffle_buffer, int) or isinstance(shuffle_buffer, bool) or shuffle_buffer < 0:
            raise ValueError(f'shuffle_buffer must be an integer >= 0 (0 or 1: no shuffling), got {shuffle_buffer!r}')
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.bad_shards: list[str] = []

    def _on_error(self, exn: Exception) -> bool:
        if len(self.bad_shards) < 3:      # examples for the error message; a resampled stream never ends
            self.bad_shards.append(f'{type(exn).__name__}: {exn}'[:300])
        return True   # skip and continue

    def _urls(self, shard: int, num_shards: int, seed: int) -> Iterator[dict]:
        rng = random.Random(seed * 1_000_003 + shard)
        epoch = 0
        while True:
            if self.resampled or len(self.urls) < num_shards:
                yield dict(url=rng.choice(self.urls))
                continue
            order = list(self.urls)
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            for url in order[shard::num_shards]:
                yield dict(url=url)
            epoch += 1

    def iter_raw(self, shard: int, num_shards: int, seed: int, start: int = 0) -> Iterator[tuple[int, Any]]:
        """Endless stream of ``(position, raw sample dict)``; the first ``start`` are skipped undecoded.

        Samples pass webdataset's shuffle buffer (``shuffle_buffer`` samples, yielding once 100 are
        in). The stream stops with an error only when many shards in a row give no sample at all;
        small shards (fewer samples than the buffer) are fine.
        """
        from webdataset.filters import shuffle
        from webdataset.tariterators import tarfile_samples
        urls, opened_since_sample = self._urls(shard, num_shards, seed), [0]

        def counted():
            for u in urls:
                opened_since_sample[0] += 1
                if opened_since_sample[0] > 2 * len(self.urls) + num_shards:   # many shards, not one sample
                    raise RuntimeError(f'no readable samples in {len(self.urls)} shard(s); errors: {self.bad_shards[:3]}')
                yield u

        def read():
            for sample in tarfile_samples(counted(), handler=self._on_error):
                opened_since_sample[0] = 0      # counted per tar sample, before the buffer holds it back
                yield sample

        shuffled = shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer),
                           rng=random.Random(seed * 7919 + shard))(read())
        for position, sample in enumerate(shuffled):
            if position >= start:
                yield position, sample

    def iter_once(self, shard: int, num_shards: int) -> Iterator[Any]:
        """Every sample of this shard's share of the tar files, once, in order (evaluation)."""
        from webdataset.tariterators import tarfile_samples
        mine = [dict(url=u) for u in self.urls[shard::num_shards]]
        yield from tarfile_samples(iter(mine), handler=self._on_error)

    @staticmethod
    def key(raw: dict) -> str:
        return f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"

    def decode(self, raw: dict):
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        text_key = next((k for k in TEXT_KEYS if k in raw), None)
        if image_key is None or text_key is None:
            raise ImageReadError(f'sample {self.key(raw)} lacks an image or a caption (has {sorted(raw)})')
        image = load_image(io.BytesIO(raw[image_key]), name=f'of sample {self.key(raw)}')
        text = raw[text_key]
        return image, (text.decode('utf-8', 'replace') if isinstance(text, bytes) else str(text)).strip(), -1
