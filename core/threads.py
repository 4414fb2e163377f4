"""Run a function over a stream of items in a few threads, answers in the items' order.

For work that releases the GIL (OpenCV's decoding, resizing and network calls do): with
``threads`` > 1 the next items are already being worked on while the caller uses the
current answer. At most ``threads * ahead`` items are in flight, so a stream of a million
paths never holds more than a handful of decoded images.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
# threads that read and detect photos or frames ahead of the classifier (one process):
# OpenCV releases the GIL, and one network per thread runs faster than one on all cores
READERS = min(4, os.cpu_count() or 1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int = 1,
                ahead: int = 2) -> Iterator[R]:
    """``map(fn, items)`` on ``threads`` threads, ``threads * ahead`` items in flight; one
    thread (or fewer): plain ``map`` in the caller's thread. An exception raised by
    ``fn`` is raised here, at its item."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="kface-reader") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= threads * ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the caller stopped early or failed: drop what was not started
            for future in pending:
                future.cancel()
