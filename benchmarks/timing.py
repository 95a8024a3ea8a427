"""Shared timing helpers of the benchmark scripts."""
import time


def timed(fn, repeat: int) -> tuple[float, list[float]]:
    """(best, all) wall times of ``repeat`` calls after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


def best_time(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one warm-up call (seconds)."""
    return timed(fn, repeat)[0]
