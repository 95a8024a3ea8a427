"""Shared timing helpers of the benchmark scripts."""
import time


def timed(fn, repeat: int, sync=None) -> tuple[float, list[float]]:
    """(best, all) wall times of ``repeat`` calls after one warm-up call, in seconds. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called after each call, inside its time, so that queued GPU work counts."""
    def call():
        fn()
        if sync is not None:
            sync()
    call()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return min(times), times


def best_time(fn, repeat: int, sync=None) -> float:
    """Best wall time of ``repeat`` calls after one warm-up call (seconds); ``sync`` as for :func:`timed`."""
    return timed(fn, repeat, sync)[0]
