"""Drive a blocking token iterator from asyncio without blocking the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

from actors.engines.base import Cancellation

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(
    make_iterator: Callable[[Cancellation], Iterator[T]],
) -> AsyncIterator[T]:
    """Yield what a blocking iterator produces; it runs on its own thread.

    If the consumer stops early (client disconnect, task cancelled) the iterator is
    told through its `Cancellation`, so the device stops working for nobody.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    cancellation = Cancellation()

    def deliver(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            cancellation.cancel()

    def produce() -> None:
        iterator = make_iterator(cancellation)
        try:
            for item in iterator:
                deliver(item)
                if cancellation.cancelled:
                    break
        except BaseException as error:
            deliver(error)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # runs the iterator's own cleanup (joins its worker)
            deliver(_DONE)

    threading.Thread(target=produce, name="token-stream", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        cancellation.cancel()
