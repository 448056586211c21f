"""A fault soak: many concurrent reranks on one instance, with cancellations and deadlines, through the fault proxy.

``soak(Plan(...))`` starts the stub server (tests/openai_stub.py) and a :class:`~fault_proxy.FaultProxy` in front of
it, and reranks through LlamaIndex's ``OpenAILike`` (so the real ``openai`` client and httpx), on one shared
``LikelihoodRerank``: ``task_reranks`` asyncio reranks, ``tasks`` at a time, each either awaited plainly, under
``asyncio.wait_for`` with a random deadline, or cancelled with ``task.cancel()`` after a random pause; and, at the
same time, ``thread_reranks`` sync reranks on ``threads`` threads. Every random choice comes from ``seed``.

It returns :class:`Figures`, counted from outside the reranker:

- a rerank ends within its bound: a cancelled one ``grace`` seconds after its cancellation, one under a deadline
  ``grace`` seconds after it, any other within :meth:`Plan.worst_case`;
- calls in flight, seen by the proxy (a request from its arrival until its reply was sent or the client went away)
  and by the stub server (while it worked on one), against ``max_concurrency``;
- calls started after their rerank was cancelled or had returned, seen by an httpx request hook in the rerank's own
  context (so a call is attributed to the rerank that started it);
- threads, event-loop tasks and sockets left once the soak is over, and nodes lost or duplicated. A sync call
  abandoned at its timeout cannot be stopped: its thread runs on, holding its slot, until the reply ends, so threads
  are counted twice: when the last rerank returned, and 2 s after the proxy closed (ending every reply).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import math
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from llama_index.core.schema import NodeWithScore, TextNode

from fault_proxy import FAULTS, FaultProxy, above
from openai_stub import StubServer

WORDS = ("swept wing drag lift boundary layer shock wave nozzle flow heat transfer panel flutter buckling cylinder "
         "plate slender body supersonic hypersonic laminar turbulent separation pressure gradient").split()
BACKOFF_CAP = 8.0  # the longest backoff between attempts (llama_rerank.llm._Wait); the proxy asks for at most 1 s


@dataclass
class Plan:
    """The soak's size and settings (every random choice follows ``seed``)."""

    seed: int = 0
    task_reranks: int = 120
    tasks: int = 8  # asyncio reranks in flight at once
    thread_reranks: int = 24
    threads: int = 4
    max_concurrency: int = 4
    timeout: float = 1.0  # the reranker's per-call timeout
    max_retries: int = 2
    window_size: int = 4
    passages: tuple[int, int] = (5, 12)  # passages per rerank (inclusive range): 2 or 3 windows
    faults: dict[str, float] = field(default_factory=lambda: dict(FAULTS))  # the proxy's rate of each fault
    slowest: float = 3.0  # the proxy's longest pause or trickle
    max_faults: int = 400
    fault_seconds: float = 300.0
    deadline: float | None = None  # the reranker's whole-rerank deadline (LikelihoodRerank.deadline), if set
    grace: float = 0.5  # a cancelled rerank, or one past its deadline, must have ended this long after
    lag: float = 0.1  # calls above the limit for less than this are observation lag, not counted

    def worst_case(self) -> float:
        """How long a rerank without a deadline of the caller's may take: ``deadline`` and ``grace`` if the reranker
        has one; else its own calls one after another plus, for its first slot, every call that can be queued ahead
        of it, each call taking at most every attempt's timeout and the waits between them."""
        if self.deadline is not None:
            return self.deadline + self.grace
        call = (self.max_retries + 1) * self.timeout + self.max_retries * BACKOFF_CAP
        windows = math.ceil(self.passages[1] / self.window_size)
        queued = (self.tasks + self.threads) * windows
        return (math.ceil(queued / self.max_concurrency) + windows) * call

    def longest(self) -> float:
        """How long the whole soak may take: every rerank of a task or thread after the other, each in its bound."""
        return max(math.ceil(self.task_reranks / self.tasks), math.ceil(self.thread_reranks / self.threads)) * \
            (self.worst_case() + 2 * self.timeout + self.grace)  # a caller's deadline or cancellation comes later


@dataclass
class Rerank:
    """One rerank, as the soak saw it."""

    kind: str  # "plain", "deadline", "cancel" (asyncio) or "thread"
    ids: list[str]
    start: float = 0.0
    end: float = 0.0
    bound: float = 0.0  # when it must have ended by
    cancelled_at: float | None = None
    outcome: str = ""  # "ok", "cancelled", "deadline", or the exception's type
    calls: list[float] = field(default_factory=list)  # when each of its HTTP requests started
    lost: int = 0
    duplicated: int = 0


@dataclass
class Figures:
    plan: Plan
    reranks: list[Rerank]
    requests: int
    faults: dict[str, int]
    peak_proxy: int
    above_proxy: int
    longest_proxy: float  # seconds, the longest stretch above max_concurrency, however short
    peak_stub: int
    above_stub: int
    threads_left: list[str]  # right after the last rerank returned
    threads_left_later: list[str]  # once the proxy has closed and 2 s have passed
    tasks_left: int
    sockets_left: int | None  # None where open sockets cannot be counted
    calls_open_at_end: int  # requests the proxy still had in flight when the last rerank returned
    seconds: float

    @property
    def within_bound(self) -> int:
        return sum(r.end <= r.bound for r in self.reranks)

    @property
    def calls_after_cancel(self) -> int:
        return sum(t > r.cancelled_at for r in self.reranks if r.cancelled_at is not None for t in r.calls)

    @property
    def calls_after_return(self) -> int:
        return sum(t > r.end for r in self.reranks for t in r.calls)

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.reranks)

    @property
    def duplicated(self) -> int:
        return sum(r.duplicated for r in self.reranks)

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.reranks:
            key = f"{r.kind}: {r.outcome}" + (" after its cancellation" if r.outcome == "ok" and r.cancelled_at else "")
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def rows(self) -> list[tuple[str, str, str]]:
        """(figure, value, what it must be)."""
        late = sorted((r.end - r.bound for r in self.reranks if r.end > r.bound), reverse=True)
        sockets = "n/a" if self.sockets_left is None else str(self.sockets_left)
        unstoppable = f"<= {self.plan.max_concurrency}, in slots"  # sync calls abandoned at their timeout run on
        return [
            ("reranks ended within their bound", f"{self.within_bound}/{len(self.reranks)}"
             + (f" (worst {late[0]:.1f} s late)" if late else ""), "all"),
            ("most calls in flight, at the proxy / at the stub",
             f"{self.peak_proxy} / {self.peak_stub}", f"<= {self.plan.max_concurrency}"),
            ("longest stretch above max_concurrency at the proxy", f"{self.longest_proxy * 1000:.1f} ms",
             f"< {self.plan.lag * 1000:.0f} ms (lag)"),
            (f"stretches above max_concurrency (> {self.plan.lag:g} s), proxy / stub",
             f"{self.above_proxy} / {self.above_stub}", "0"),
            ("calls started after a cancellation", str(self.calls_after_cancel), "0"),
            ("calls started after their rerank returned", str(self.calls_after_return), "0"),
            ("calls still open at the proxy when the last rerank returned", str(self.calls_open_at_end), unstoppable),
            ("threads left when the last rerank returned", str(len(self.threads_left)), unstoppable),
            ("threads left 2 s after the proxy closed", str(len(self.threads_left_later)), "0"),
            ("event-loop tasks left", str(self.tasks_left), "0"),
            ("sockets left (clients closed)", sockets, "0"),
            ("nodes lost / duplicated", f"{self.lost} / {self.duplicated}", "0 / 0"),
        ]

    def table(self) -> str:
        width = max(len(name) for name, _, _ in self.rows())
        lines = [f"{'figure':<{width}}  {'value':<24}  must be", "-" * (width + 36)]
        lines += [f"{name:<{width}}  {value:<24}  {must}" for name, value, must in self.rows()]
        lines += ["", "outcomes: " + ", ".join(f"{k} {v}" for k, v in self.outcomes().items()),
                  f"requests: {self.requests}; faults injected: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())),
                  f"soak took {self.seconds:.1f} s"]
        if self.threads_left:
            lines.append("threads left: " + ", ".join(sorted(self.threads_left)))
        return "\n".join(lines)


_CURRENT: contextvars.ContextVar[Rerank | None] = contextvars.ContextVar("soak_rerank", default=None)


def _note_request() -> None:
    """An httpx request hook: the request starts now, for the rerank whose context started it."""
    rerank = _CURRENT.get()
    if rerank is not None:
        rerank.calls.append(time.monotonic())


async def _anote_request(request: httpx.Request) -> None:
    _note_request()


def _open_sockets() -> int | None:
    try:
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in os.listdir("/proc/self/fd"))
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return len(psutil.Process().net_connections(kind="all"))


def _nodes(rng: random.Random, n: int, count: int) -> list[NodeWithScore]:
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(count)]
    return [NodeWithScore(node=TextNode(text=t, id_=f"r{n}-p{i}"), score=1.0 - i / 100) for i, t in enumerate(texts)]


def _check(rerank: Rerank, result: Any) -> None:
    ids = [node.node.node_id for node in result.nodes]
    rerank.lost, rerank.duplicated = len(set(rerank.ids) - set(ids)), len(ids) - len(set(ids))


def _jobs(plan: Plan) -> tuple[list[tuple], list[tuple]]:
    """Every rerank's kind, query, nodes and pause/deadline, drawn from the seed before anything runs."""
    rng = random.Random(plan.seed)
    tasks, threads = [], []
    for n in range(plan.task_reranks + plan.thread_reranks):
        nodes = _nodes(rng, n, rng.randint(*plan.passages))
        query = f"rerank {n}: {rng.choice(WORDS)} {rng.choice(WORDS)}?"
        ids = [node.node.node_id for node in nodes]
        if n < plan.task_reranks:
            kind = rng.choice(("plain", "deadline", "cancel"))
            tasks.append((Rerank(kind, ids), query, nodes, rng.uniform(0.05, 2 * plan.timeout)))
        else:
            threads.append((Rerank("thread", ids), query, nodes))
    return tasks, threads


async def _one_task(reranker: Any, rerank: Rerank, query: str, nodes: list, pause: float, plan: Plan) -> None:
    loop = asyncio.get_running_loop()
    _CURRENT.set(rerank)  # this task's context: the rerank's own tasks and calls inherit it
    rerank.start = time.monotonic()
    rerank.bound = rerank.start + plan.worst_case()

    def cancelled() -> None:
        rerank.cancelled_at = time.monotonic()
        rerank.bound = rerank.cancelled_at + plan.grace

    try:
        if rerank.kind == "plain":
            _check(rerank, await reranker.arerank(query, nodes))
        elif rerank.kind == "deadline":
            mark = loop.call_later(pause, cancelled)  # fires just before wait_for's own timer, set right after
            try:
                _check(rerank, await asyncio.wait_for(reranker.arerank(query, nodes), pause))
            finally:
                mark.cancel()
        else:
            task = asyncio.ensure_future(reranker.arerank(query, nodes))
            await asyncio.wait({task}, timeout=pause)
            if not task.done():
                cancelled()
                task.cancel()
            _check(rerank, await task)  # the result, if the rerank ignored its cancellation
        rerank.outcome = "ok"
    except asyncio.TimeoutError:
        rerank.outcome = "deadline"
    except asyncio.CancelledError:
        if rerank.cancelled_at is None:  # the soak's own stop: it outlived every bound
            rerank.outcome = "hung"
            raise
        rerank.outcome = "cancelled"
    except Exception as exc:  # noqa: BLE001 - counted and shown
        rerank.outcome = type(exc).__name__
    finally:
        rerank.end = time.monotonic()


async def _run_tasks(reranker: Any, jobs: list, plan: Plan, client: httpx.AsyncClient) -> int:
    """Run the asyncio reranks, ``tasks`` at a time; the number of this loop's tasks still alive afterwards."""
    slots = asyncio.Semaphore(plan.tasks)

    async def limited(*job: Any) -> None:
        async with slots:
            await _one_task(reranker, *job, plan)

    tasks = [asyncio.ensure_future(limited(*job)) for job in jobs]
    _, hung = await asyncio.wait(tasks, timeout=plan.longest())
    for task in hung:  # only if a rerank outlived every bound: it is cancelled and counted as late
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)
    left = len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])
    await client.aclose()
    return left


def _run_threads(reranker: Any, jobs: list, plan: Plan) -> list[threading.Thread]:
    work: queue.Queue = queue.Queue()
    for job in jobs:
        work.put(job)

    def worker() -> None:
        while True:
            try:
                rerank, query, nodes = work.get_nowait()
            except queue.Empty:
                return
            _CURRENT.set(rerank)
            rerank.start = time.monotonic()
            rerank.bound = rerank.start + plan.worst_case()
            try:
                _check(rerank, reranker.rerank(query, nodes))
                rerank.outcome = "ok"
            except Exception as exc:  # noqa: BLE001 - counted and shown
                rerank.outcome = type(exc).__name__
            finally:
                rerank.end = time.monotonic()

    workers = [threading.Thread(target=worker, name=f"soak-{i}", daemon=True) for i in range(plan.threads)]
    for thread in workers:
        thread.start()
    return workers


def soak(plan: Plan) -> Figures:
    """Run the soak and count what happened."""
    from llama_index.llms.openai_like import OpenAILike

    from llama_rerank import LikelihoodRerank

    task_jobs, thread_jobs = _jobs(plan)
    sockets_before = _open_sockets()
    async_client = httpx.AsyncClient(event_hooks={"request": [_anote_request]})  # closed in its event loop
    with httpx.Client(event_hooks={"request": [lambda request: _note_request()]}) as sync_client, \
            StubServer("openai-chat") as stub, \
            FaultProxy(stub.origin, seed=plan.seed, faults=plan.faults, max_faults=plan.max_faults,
                       duration=plan.fault_seconds, slowest=plan.slowest) as proxy:
        llm = OpenAILike(model=stub.profile.model, api_base=proxy.url, api_key="k", is_chat_model=True,
                         context_window=8192, http_client=sync_client, async_http_client=async_client)
        deadline = {} if plan.deadline is None else {"deadline": plan.deadline}  # the option is newer than the soak
        reranker = LikelihoodRerank(llm=llm, top_n=plan.passages[1], window_size=plan.window_size,
                                    max_concurrency=plan.max_concurrency, timeout=plan.timeout,
                                    max_retries=plan.max_retries, **deadline)
        threads_before = {t.ident for t in threading.enumerate()}
        started = time.monotonic()
        workers = _run_threads(reranker, thread_jobs, plan)
        tasks_left = asyncio.run(_run_tasks(reranker, task_jobs, plan, async_client))
        for thread in workers:
            thread.join(timeout=max(0.0, started + plan.longest() - time.monotonic()))
        seconds = time.monotonic() - started
        threads_left = [t.name for t in threading.enumerate() if t.ident not in threads_before]
        open_at_end = sum(call.end is None for call in proxy.calls)
        proxy.close()  # ends any fault still running
        time.sleep(2.0)
        threads_later = [t.name for t in threading.enumerate() if t.ident not in threads_before]
    sockets_after = _open_sockets()
    calls = [c for c in proxy.calls if c.end is not None]
    peak_proxy, above_proxy, longest_proxy = above([(c.start, c.end) for c in calls], plan.max_concurrency, plan.lag)
    peak_stub, above_stub, _ = above([c.upstream for c in calls if c.upstream], plan.max_concurrency, plan.lag)
    return Figures(
        plan, [job[0] for job in task_jobs + thread_jobs], len(proxy.calls), dict(proxy.injected),
        peak_proxy, above_proxy, longest_proxy, peak_stub, above_stub, threads_left, threads_later, tasks_left,
        None if sockets_before is None or sockets_after is None else sockets_after - sockets_before,
        open_at_end, seconds,
    )


def small(seed: int = 2) -> Plan:
    """A soak small enough for the test suite. Against the code before the execution-model fix, seed 2 showed both
    calls retried after a cancellation and sync calls beyond the budget in each of 4 runs."""
    return dataclasses.replace(Plan(seed=seed), task_reranks=30, thread_reranks=12, threads=3)
