"""A model call that reports as it runs (rows of codes, pieces of text), turned into an iterator a
gradio generator handler can yield from: the call runs in a worker thread under ``torch.inference_mode``."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch


def stream_call(work: Callable[[Callable[[object], None]], object]) -> Iterator[tuple[str, object]]:
    """Run ``work(emit)`` in a thread; yield ``('item', x)`` for each ``emit(x)``, then ``('done', result)``.
    An exception of ``work`` is raised here, in the caller's thread."""
    events: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            with torch.inference_mode():          # thread-local: set in the thread that runs the model
                result = work(lambda item: events.put(('item', item)))
        except BaseException as e:      # handed to the caller, which raises it
            events.put(('error', e))
        else:
            events.put(('done', result))

    threading.Thread(target=run, daemon=True, name='unitok-studio-call').start()
    while True:
        kind, value = events.get()
        if kind == 'error':
            raise value
        yield kind, value
        if kind == 'done':
            return
