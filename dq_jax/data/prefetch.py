"""Background-thread prefetch for host-side (numpy) batch iterators."""
from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")

_END = object()


class _Error:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(iterator: Iterator[T], size: int = 2) -> Iterator[T]:
    """Yields the items of ``iterator``, produced ``size`` ahead in a thread.

    Why: batch assembly (numpy gathers, augmentation, tf.data hand-off) then
    overlaps with the accelerator step instead of adding to it. Order is
    preserved; an exception in the producer is re-raised here, at the point
    the failing item would have been yielded. Closing the returned generator
    stops the producer thread after at most one more item and joins it.
    """
    if size < 1:
        raise ValueError(f"prefetch size={size} must be >= 1.")
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as e:  # Forwarded to the consumer.
            put(_Error(e))
            return
        put(_END)

    thread = threading.Thread(target=produce, name="dq_jax-prefetch", daemon=True)
    thread.start()

    def consume() -> Iterator[T]:
        try:
            while True:
                item = buffer.get()
                if item is _END:
                    return
                if isinstance(item, _Error):
                    raise item.exc
                yield item
        finally:
            stop.set()
            # Wait for the producer: a daemon thread still inside a JAX/TF call when the
            # interpreter exits aborts the process ("terminate called ...").
            thread.join(timeout=30)

    return consume()
