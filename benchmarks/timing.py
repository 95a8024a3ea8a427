"""Shared timing helper of the benchmark scripts."""
import time


def best_time(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
