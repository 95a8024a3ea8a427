"""Throughput accounting of a loop that takes batches from a data loader and runs a model on them:
images per second, and the share of the wall time spent in the model vs blocked on the loader.

    meter = ThroughputMeter()
    for batch in meter.wait(loader):          # time in next(loader) counts as waiting for data
        with meter.model(len(batch)):         # time here counts as model time (sync the device inside)
            codes = model.encode(batch.to(device)).cpu()
    print(meter.result().summary())

The rest of the wall time (writing outputs, progress bars) is neither. A loop whose wait share is
small is bound by the model: more loader workers cannot make it faster.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar('T')


@dataclass(frozen=True)
class Throughput:
    """What a :class:`ThroughputMeter` measured (seconds of wall time)."""
    images: int = 0              # images the model processed
    wall: float = 0.0            # from the meter's start to :meth:`ThroughputMeter.result`
    model: float = 0.0           # inside ``meter.model(...)`` blocks
    wait: float = 0.0            # blocked in ``next()`` of the loader (worker start-up included)

    @property
    def images_per_second(self) -> float:
        return self.images / self.wall if self.wall > 0 else 0.0

    @property
    def model_share(self) -> float:
        return self.model / self.wall if self.wall > 0 else 0.0

    @property
    def wait_share(self) -> float:
        return self.wait / self.wall if self.wall > 0 else 0.0

    @classmethod
    def combine(cls, parts: Sequence[Throughput]) -> Throughput:
        """Processes that ran side by side: their images add up over the longest wall time; the
        shares are the mean of the processes' shares."""
        if not parts:
            return cls()
        wall = max(p.wall for p in parts)
        return cls(images=sum(p.images for p in parts), wall=wall,
                   model=wall * sum(p.model_share for p in parts) / len(parts),
                   wait=wall * sum(p.wait_share for p in parts) / len(parts))

    def summary(self) -> str:
        """One line, e.g. ``120 image(s) in 4.0 s: 30.0 images/s; model 85% of the time, waiting for data 3%``."""
        rate = self.images_per_second
        return (f'{self.images} image(s) in {self.wall:.1f} s: {rate:.{2 if rate < 10 else 1}f} images/s; '
                f'model {100 * self.model_share:.0f}% of the time, waiting for data {100 * self.wait_share:.0f}%')


class ThroughputMeter:
    """Accumulates wait and model time of one loop; starts when created.

    Args:
        clock: seconds as a float (default :func:`time.perf_counter`; tests pass a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.images, self.model_seconds, self.wait_seconds = 0, 0.0, 0.0

    def wait(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield from ``batches``, adding the time each ``next()`` takes to the wait time."""
        t = self.clock()
        iterator = iter(batches)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                self.wait_seconds += self.clock() - t
                return
            self.wait_seconds += self.clock() - t
            yield item
            t = self.clock()

    @contextlib.contextmanager
    def model(self, images: int) -> Iterator[None]:
        """Time the block as model time and count ``images`` as processed (when it completes)."""
        t = self.clock()
        yield
        self.model_seconds += self.clock() - t
        self.images += images

    def result(self) -> Throughput:
        return Throughput(images=self.images, wall=self.clock() - self.start, model=self.model_seconds,
                          wait=self.wait_seconds)
