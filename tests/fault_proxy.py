"""A fault-injecting HTTP proxy on 127.0.0.1, between a client and the stub server (tests/openai_stub.py).

``FaultProxy(upstream, seed=...)`` listens on 127.0.0.1 (ephemeral port, its own event loop on a background thread)
and forwards each HTTP/1.1 request to ``upstream``, which must be a loopback origin (``StubServer.origin``). For
each request it draws, from a ``random.Random(seed)``, what happens to it:

    reset     the connection is reset (TCP RST) once the request has arrived; no reply
    latency   the reply is forwarded after a pause of up to ``slowest`` seconds
    half      the reply's headers and half its body, then the connection closes
    trickle   the reply in small pieces, spread over up to ``slowest`` seconds
    burst     this request and the next few get 429 (with a short ``Retry-After``), 500 or 503
    (none)    the reply as it is

Faults are bounded: at most ``max_faults`` of them, none once ``duration`` seconds have passed since ``start()``;
after that every reply passes unchanged, and ``close()`` ends any fault still running. The proxy records each
request in ``calls``: when it arrived, when its reply was sent or the client went away (``end``), when the upstream
was working on it, the fault, and the query of the rerank prompt it carried. :func:`above` reads calls in flight
from such intervals.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from openai_stub import ERRORS, Reply, rate_limited, read_prompt

FAULTS = {"reset": 0.05, "latency": 0.35, "half": 0.05, "trickle": 0.15, "burst": 0.03}  # per request
BURST = (2, 5)  # a burst answers this many requests (inclusive range)
PIECE = 24  # bytes per piece of a trickled body
_REASONS = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Call:
    """One request through the proxy (times from ``time.monotonic()``)."""

    start: float
    fault: str | None = None
    query: str = ""
    end: float | None = None  # reply sent, or the client went away
    upstream: tuple[float, float] | None = None  # while the upstream server worked on it


class _Request:
    def __init__(self, head: bytes, body: bytes) -> None:
        self.head, self.body = head, body

    def forwarded(self) -> bytes:
        """The request with ``Connection: close``: one upstream connection per request."""
        lines = [line for line in self.head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        return b"\r\n".join(lines + [b"Connection: close", b"", b""]) + self.body

    def query(self) -> str:
        try:
            return read_prompt(json.loads(self.body).get("messages") or []).query
        except (ValueError, AttributeError):
            return ""


async def _read_request(reader: asyncio.StreamReader, prefix: bytes) -> _Request | None:
    """The next request on a keep-alive connection, or None when the client closed it."""
    try:
        head = prefix + await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return _Request(head[:-4], await reader.readexactly(length))


def _response(reply: Reply) -> bytes:
    body = json.dumps(reply.body).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **reply.headers}
    lines = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, '')}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """The proxy; a context manager. ``url`` is the base URL a client is given (``.../v1``)."""

    def __init__(self, upstream: str, seed: int = 0, faults: dict[str, float] | None = None,
                 max_faults: int = 100, duration: float = 60.0, slowest: float = 2.0) -> None:
        host, port = urlsplit(upstream).hostname, urlsplit(upstream).port
        if host not in ("127.0.0.1", "localhost", "::1") or port is None:
            raise ValueError(f"the fault proxy forwards to a loopback origin only, got {upstream!r}")
        self.upstream = ("127.0.0.1" if host == "localhost" else host, port)
        self.rates = dict(FAULTS if faults is None else faults)
        self.max_faults, self.duration, self.slowest = max_faults, duration, slowest
        self.random = random.Random(seed)
        self.calls: list[Call] = []
        self.injected: dict[str, int] = {}
        self._burst: tuple[str, int] = ("", 0)  # fault name, requests it still answers
        self._started = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running; use it as a context manager or call start()")
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    def start(self) -> "FaultProxy":
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop listening and end every connection (and the fault it is in)."""
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    # -- faults ------------------------------------------------------------------------------------------------

    def _draw(self) -> str | None:
        """The fault for the next request (called on the proxy's loop only, so draws follow arrival order)."""
        roll = self.random.random()  # drawn for every request, so the sequence depends on the seed alone
        fault, left = self._burst
        if left:
            self._burst = (fault, left - 1)
        else:
            fault = None
            for name, rate in self.rates.items():
                if roll < rate:
                    fault = name
                    break
                roll -= rate
            if fault == "burst":
                fault = self.random.choice(("429", "500", "503"))
                self._burst = (fault, self.random.randint(*BURST) - 1)
        spent = sum(self.injected.values()) >= self.max_faults
        if fault is None or spent or time.monotonic() - self._started > self.duration:
            self._burst = ("", 0)
            return None
        self.injected[fault] = self.injected.get(fault, 0) + 1
        return fault

    async def _forward(self, request: _Request, call: Call) -> tuple[bytes, bytes]:
        """The upstream's reply to ``request``: (status line and headers, body)."""
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            writer.write(request.forwarded())
            raw = await reader.read()  # the upstream closes after one reply (Connection: close)
        finally:
            writer.close()
            call.upstream = (started, time.monotonic())
        head, _, body = raw.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n", body

    async def _answer(self, request: _Request, writer: asyncio.StreamWriter, call: Call) -> bool:
        """Reply to one request, with its fault; False when the connection must close. The call ends as the reply
        is handed to the socket, or as the answer is given up (the client went away): not when the proxy's loop
        next gets to it, which may be after a new call of the same client has arrived."""
        try:
            return await self._reply(request, writer, call)
        finally:
            call.end = time.monotonic()

    async def _reply(self, request: _Request, writer: asyncio.StreamWriter, call: Call) -> bool:
        fault = call.fault = self._draw()
        if fault == "reset":
            _reset(writer)
            return False
        if fault in ("429", "500", "503"):
            error = rate_limited(f"{self.random.uniform(0.1, 1.0):.1f}") if fault == "429" else ERRORS[int(fault)]
            writer.write(_response(error))
            await writer.drain()
            return True
        if fault == "latency":
            await asyncio.sleep(self.random.uniform(0, self.slowest))
        head, body = await self._forward(request, call)
        if fault == "half":
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            return False
        if fault == "trickle":
            pieces = [body[i: i + PIECE] for i in range(0, len(body), PIECE)]
            pause = self.random.uniform(0, self.slowest) / max(1, len(pieces))
            writer.write(head)
            for piece in pieces:
                await asyncio.sleep(pause)
                writer.write(piece)
                await writer.drain()
            return True
        writer.write(head + body)
        await writer.drain()
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        prefix, call = b"", None
        try:
            while True:
                request = await _read_request(reader, prefix)
                if request is None:
                    return
                call = Call(time.monotonic(), query=request.query())
                self.calls.append(call)
                prefix, alive = await self._while_connected(reader, self._answer(request, writer, call))
                if not alive:
                    return
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            if call is not None and call.end is None:  # cut off by an error or by close()
                call.end = time.monotonic()
            writer.transport.abort()
            self._connections.discard(task)

    async def _while_connected(self, reader: asyncio.StreamReader, answer) -> tuple[bytes, bool]:
        """Run ``answer`` unless the client closes the connection first; (bytes read meanwhile, keep alive)."""
        work = asyncio.ensure_future(answer)
        gone = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done() and not gone.exception() and gone.result():  # the next request began: not gone
                await asyncio.wait({work})
            if not work.done():  # the client went away (timeout, cancellation): stop answering
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                return b"", False
            prefix = gone.result() if gone.done() and not gone.exception() else b""
            return prefix, work.result() and (not gone.done() or bool(prefix))
        finally:
            for task in (work, gone):
                task.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)  # the reader is free for the next request


def above(intervals: Iterable[tuple[float, float]], limit: int, grace: float) -> tuple[int, int, float]:
    """(most intervals open at once, stretches longer than ``grace`` seconds with more than ``limit`` open, the
    longest such stretch in seconds).

    ``grace`` absorbs observation lag: a client that gave a call up is seen leaving a little late, and its next
    call, started as it left, may be seen arriving first.
    """
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda event: (event[0], event[1]))
    peak = open_ = stretches = 0
    longest = 0.0
    since: float | None = None
    for at, step in events:
        open_ += step
        peak = max(peak, open_)
        if open_ > limit and since is None:
            since = at
        elif open_ <= limit and since is not None:
            stretches += at - since > grace
            longest = max(longest, at - since)
            since = None
    return peak, stretches, longest
