"""How the work runs: one event-loop driver for sync and async callers, calls on threads, one shared call limit.

Every rerank is a coroutine. ``arerank`` awaits it in the caller's event loop; ``rerank`` runs it to completion
with :func:`run_blocking`, in an event loop of its own (on a helper thread when the calling thread already runs a
loop), so cancellation, Ctrl-C and errors mean the same on both paths: the first exception or cancellation
cancels every other task of the run (:func:`all_or_none`), which starts no new LLM call. Blocking work (a sync
LLM call, a cache store) runs on a daemon thread of its own (:func:`in_thread`): the event loop keeps running, and
a call abandoned at its timeout or by a cancelled caller is simply not waited for.

:class:`CallLimit` bounds the LLM calls in flight across queries, threads and event loops. A caller takes a
:class:`Slot` per request (none while it sleeps before a retry); a slot handed to a thread is given back once the
call really returns, so the limit holds even for calls that cannot be stopped. A slot held by an event loop that
was closed meanwhile is taken back (once no thread works with it). Sync code that blocks an event loop's own thread
gets private limits of the same sizes, because that loop's tasks may hold shared slots they cannot give back while
it is blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections import deque
from typing import Any, Awaitable, Callable, Iterable, TypeVar

T = TypeVar("T")
RECLAIM_EVERY = 1.0  # seconds between a waiter's checks for slots held by event loops that were closed

_blocking: contextvars.ContextVar[bool] = contextvars.ContextVar("llama_rerank_blocking", default=False)
_private_limits: contextvars.ContextVar[dict[int, "CallLimit"] | None] = contextvars.ContextVar(
    "llama_rerank_private_limits", default=None
)


class Slot:
    """One slot of a :class:`CallLimit`, held by the event loop ``loop``, and by a thread while ``busy`` (see
    :func:`in_thread`). :meth:`release` gives it back; calling it again does nothing."""

    __slots__ = ("_limit", "loop", "busy")

    def __init__(self, limit: CallLimit, loop: asyncio.AbstractEventLoop) -> None:
        self._limit, self.loop, self.busy = limit, loop, False

    def release(self) -> None:
        self._limit._release(self)


class _Waiter:
    __slots__ = ("loop", "future", "slot")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.future, self.slot = loop, loop.create_future(), None


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


class CallLimit:
    """At most ``size`` slots held at once, taken with ``await limit.acquire()`` from any event loop.

    Waiters are served in arrival order: a freed slot goes straight to the first in line, through
    ``call_soon_threadsafe`` into its loop. A waiter that gives up (cancelled) leaves the queue, or passes on a slot
    handed to it meanwhile.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a call limit needs at least one slot, got {size}")
        self.size = size
        self._lock = threading.Lock()
        self._held: set[Slot] = set()
        self._queue: deque[_Waiter] = deque()

    @property
    def in_use(self) -> int:
        """Slots held now (by event loops and by threads of calls not yet returned)."""
        return len(self._held)

    @property
    def waiting(self) -> int:
        """Callers queued for a slot now, served in arrival order."""
        return len(self._queue)

    async def acquire(self) -> Slot:
        """Wait for a slot without blocking the running event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._reclaim()
            if len(self._held) < self.size and not self._queue:
                return self._hold(loop)
            waiter = _Waiter(loop)
            self._queue.append(waiter)
        try:
            while not (await asyncio.wait({waiter.future}, timeout=RECLAIM_EVERY))[0]:
                with self._lock:
                    self._reclaim()
            return waiter.future.result()
        except BaseException:
            self._give_up(waiter)
            raise

    def _hold(self, loop: asyncio.AbstractEventLoop) -> Slot:
        slot = Slot(self, loop)
        self._held.add(slot)
        return slot

    def _grant(self) -> None:
        """Hand free slots to the waiters first in line (called under the lock)."""
        while self._queue and len(self._held) < self.size:
            waiter = self._queue.popleft()
            waiter.slot = self._hold(waiter.loop)
            try:
                waiter.loop.call_soon_threadsafe(_resolve, waiter.future, waiter.slot)
            except RuntimeError:  # its event loop is closed: nobody is left to take the slot
                self._held.discard(waiter.slot)

    def _reclaim(self) -> None:
        """Take back slots held by event loops that were closed, unless a thread still works with one (called
        under the lock)."""
        dead = {slot for slot in self._held if slot.loop.is_closed() and not slot.busy}
        if dead:
            self._held -= dead
            self._grant()

    def _release(self, slot: Slot) -> None:
        with self._lock:
            if slot in self._held:
                self._held.discard(slot)
                self._grant()

    def _give_up(self, waiter: _Waiter) -> None:
        """Leave the queue; a slot handed over meanwhile goes to the next in line."""
        with self._lock:
            if waiter.slot is None:
                self._queue.remove(waiter)
                return
        waiter.slot.release()

    def __reduce__(self) -> tuple[type, tuple[int]]:
        """A copied or unpickled reranker gets a fresh limit of the same size (locks and queues are not copied)."""
        return type(self), (self.size,)


def limit_for(limit: CallLimit) -> CallLimit:
    """The limit to take slots from: ``limit``, or a private one of its size inside sync code that blocks an event
    loop's own thread (see :func:`run_blocking`)."""
    private = _private_limits.get()
    if private is None:
        return limit
    return private.setdefault(id(limit), CallLimit(limit.size))


def blocking() -> bool:
    """True inside :func:`run_blocking`: a sync caller, whose LLM calls use the LLM's sync methods on threads."""
    return _blocking.get()


def in_thread(fn: Callable[[], T], slot: Slot | None = None) -> asyncio.Future[T]:
    """Start ``fn`` on a daemon thread of its own; the returned future (of the running loop) gets its result.

    ``slot``, if given, is held until ``fn`` really returns, and given back just after the result is delivered, so
    the waiting task acts on it (a permanent error stops its run) before the next waiter gets the slot. Cancelling
    the future (a timeout, a cancelled caller) abandons the thread, which cannot be stopped: it keeps the slot
    until it is done.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: tuple[bool, Any]) -> None:
        if not future.done():  # else abandoned
            if outcome[0]:
                future.set_result(outcome[1])
            else:
                future.set_exception(outcome[1])
        if slot is not None:
            slot.release()

    def target() -> None:
        try:
            outcome = (True, context.run(fn))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting task
            outcome = (False, exc)
        if slot is not None:
            slot.busy = False  # from now on, a closed loop's slot is taken back even if ``settle`` never runs
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            if slot is not None:
                slot.release()

    if slot is not None:
        slot.busy = True
    try:
        threading.Thread(target=target, daemon=True, name="llama-rerank-call").start()
    except BaseException:
        if slot is not None:
            slot.release()
        raise
    return future


async def all_or_none(coroutines: Iterable[Awaitable[T]]) -> list[T]:
    """Run ``coroutines`` as concurrent tasks and return their results in order. The first exception, or the
    caller's cancellation, cancels the others and waits until they have stopped, then propagates: nothing keeps
    running (or calling an LLM) in the background."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except (Exception, asyncio.CancelledError):  # (Ctrl-C and a closed coroutine go straight through: see _drive)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def run_blocking(make: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``make(*args)`` run to completion from sync code, in an event loop of its own.

    The loop runs on this thread, or on a helper thread when this thread already runs one (sync code called from
    async code); then this run takes its slots from private limits (:func:`limit_for`). Ctrl-C or any exception
    cancels every task at once and propagates; threads of calls still running are not waited for.
    """
    context = contextvars.copy_context()
    on_loop = _runs_an_event_loop()
    context.run(_blocking.set, True)
    context.run(_private_limits.set, {} if on_loop else None)
    loop = asyncio.new_event_loop()
    if not on_loop:
        return context.run(_drive, loop, make, args)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = context.run(_drive, loop, make, args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="llama-rerank-sync")
    thread.start()
    try:
        thread.join()
    except BaseException:  # Ctrl-C while waiting: stop the helper's work, do not wait for it
        try:
            loop.call_soon_threadsafe(_cancel_all, loop)
        except RuntimeError:  # it finished meanwhile
            pass
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def _drive(loop: asyncio.AbstractEventLoop, make: Callable[..., Awaitable[T]], args: tuple) -> T:
    try:
        return loop.run_until_complete(make(*args))
    finally:  # after Ctrl-C (raised wherever this thread was) or an error: every task still running is cancelled
        try:
            for _ in range(10):  # Ctrl-C inside a task reaches the loop again through each task awaiting that one
                pending = _cancel_all(loop)
                if not pending:
                    break
                with contextlib.suppress(BaseException):  # those echoes, or the loop stopping early because of one
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            loop.close()  # threads of abandoned calls then give their slots back themselves


def _cancel_all(loop: asyncio.AbstractEventLoop) -> set[asyncio.Task[Any]]:
    pending = {task for task in asyncio.all_tasks(loop) if not task.done()}
    for task in pending:
        task.cancel()
    return pending


def _runs_an_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
