"""One limit on LLM calls in flight, shared by threads and event loops alike.

``asyncio.Semaphore`` belongs to one event loop and ``threading.Semaphore`` blocks the loop that waits on it, so a
reranker used from worker threads and from several loops at once (a web server's threads, ``asyncio.run`` per
request, a notebook) needs its own: :class:`CallLimit` counts free slots under a ``threading.Lock`` and queues
waiters in arrival order. A thread waits on a ``threading.Event``; a task awaits a future of its own loop, set
through ``call_soon_threadsafe``. A freed slot is handed straight to the first waiter, so nobody can overtake the
queue. A waiter that gives up (cancelled, interrupted) leaves the queue, or passes on a slot handed to it meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Callable


class _Waiter:
    """One queued caller: ``wake`` tells it that ``granted`` became true (it now holds a slot)."""

    __slots__ = ("granted", "wake")

    def __init__(self, wake: Callable[[], object]) -> None:
        self.granted = False
        self.wake = wake


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class CallLimit:
    """At most ``size`` holders at once: ``with limit:`` in threads, ``async with limit:`` in any event loop."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a call limit needs at least one slot, got {size}")
        self.size = size
        self._free = size
        self._lock = threading.Lock()
        self._queue: deque[_Waiter] = deque()

    def _enqueue(self, wake: Callable[[], object]) -> _Waiter | None:
        """Take a free slot (``None``) or join the queue (the returned waiter)."""
        with self._lock:
            if self._free and not self._queue:
                self._free -= 1
                return None
            waiter = _Waiter(wake)
            self._queue.append(waiter)
            return waiter

    def _give_up(self, waiter: _Waiter) -> None:
        """Leave the queue; a slot handed over meanwhile goes to the next in line."""
        with self._lock:
            granted = waiter.granted
            if not granted:
                self._queue.remove(waiter)
        if granted:
            self.release()

    def acquire(self) -> None:
        """Block this thread until a slot is free."""
        event = threading.Event()
        waiter = self._enqueue(event.set)
        if waiter is None:
            return
        try:
            event.wait()
        except BaseException:
            self._give_up(waiter)
            raise

    async def aacquire(self) -> None:
        """Wait for a slot without blocking the running event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = self._enqueue(lambda: loop.call_soon_threadsafe(_resolve, future))
        if waiter is None:
            return
        try:
            await future
        except BaseException:
            self._give_up(waiter)
            raise

    def release(self) -> None:
        """Free a slot: hand it to the first waiter whose thread or loop can still take it."""
        while True:
            with self._lock:
                if not self._queue:
                    self._free += 1
                    return
                waiter = self._queue.popleft()
                waiter.granted = True
            try:
                waiter.wake()
                return
            except RuntimeError:  # its event loop is closed: nobody is left to take the slot
                continue

    def __reduce__(self) -> tuple[type, tuple[int]]:
        """A copied or unpickled reranker gets a fresh limit of the same size (locks and queues are not copied)."""
        return type(self), (self.size,)

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    async def __aenter__(self) -> None:
        await self.aacquire()

    async def __aexit__(self, *exc: Any) -> None:
        self.release()
