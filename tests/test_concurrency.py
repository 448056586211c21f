"""One concurrency budget per reranker: every concurrent rerank on an instance shares ``max_concurrency``."""

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import make_nodes
from fakes import Reply, ScriptedLLM, passages
from llama_rerank import LikelihoodRerank
from llama_rerank.concurrency import CallLimit

QUERIES = 12


def _slow(prompt, call):
    return Reply("\n".join(f"[{i}] likely" for i in range(1, len(passages(prompt)) + 1)), delay=0.2)


def _reranker(llm, **options):
    return LikelihoodRerank(llm=llm, window_size=2, max_concurrency=3, top_n=6, **options)


def _check(results, llm):
    assert len(results) == QUERIES and all(len(r) == 6 for r in results)
    assert len(llm.prompts) == QUERIES * 3  # three windows per query
    assert llm.max_in_flight == 3  # never more than the budget, and the budget is used in full


def test_concurrent_queries_on_threads_share_one_budget():
    llm = ScriptedLLM(_slow)
    reranker, nodes = _reranker(llm), make_nodes([f"passage {i}" for i in range(6)])
    with ThreadPoolExecutor(max_workers=QUERIES) as pool:
        results = list(pool.map(lambda q: reranker.postprocess_nodes(nodes, query_str=f"q{q}"), range(QUERIES)))
    _check(results, llm)


async def test_concurrent_async_queries_share_one_budget():
    llm = ScriptedLLM(_slow)
    reranker, nodes = _reranker(llm), make_nodes([f"passage {i}" for i in range(6)])
    results = await asyncio.gather(*(reranker.apostprocess_nodes(nodes, query_str=f"q{q}") for q in range(QUERIES)))
    _check(results, llm)


def test_threads_and_several_event_loops_share_one_budget():
    llm = ScriptedLLM(_slow)
    reranker, nodes = _reranker(llm), make_nodes([f"passage {i}" for i in range(6)])

    def one(q):
        if q % 2:  # half the queries each in an event loop of their own, the other half on plain threads
            return asyncio.run(reranker.apostprocess_nodes(nodes, query_str=f"q{q}"))
        return reranker.postprocess_nodes(nodes, query_str=f"q{q}")

    with ThreadPoolExecutor(max_workers=QUERIES) as pool:
        results = list(pool.map(one, range(QUERIES)))
    _check(results, llm)


def test_a_new_max_concurrency_takes_effect_and_copies_get_their_own_budget():
    llm = ScriptedLLM(_slow)
    reranker, nodes = _reranker(llm), make_nodes([f"passage {i}" for i in range(6)])
    reranker.rerank("q", nodes)  # the limit of 3 now exists and has been used
    assert llm.max_in_flight == 3
    reranker.max_concurrency = 1
    llm.max_in_flight = 0
    reranker.rerank("q", nodes)
    assert llm.max_in_flight == 1
    alone = LikelihoodRerank(max_concurrency=2)  # (the scripted LLM itself cannot be deep-copied)
    limit = alone.resources.limit
    twin = copy.deepcopy(alone)
    assert twin.resources.limit is not limit and twin.resources.limit.size == 2 and alone.resources.limit is limit


# the limit on its own ----------------------------------------------------------------------------------------------


def test_limit_holds_across_loops_on_several_threads_and_serves_in_arrival_order():
    limit, lock = CallLimit(2), threading.Lock()
    held, most, order = [0], [0], []

    async def one(name):
        slot = await limit.acquire()
        with lock:
            held[0] += 1
            most[0] = max(most[0], held[0])
            order.append(name)
        await asyncio.sleep(0.02)
        with lock:
            held[0] -= 1
        slot.release()

    holder = asyncio.new_event_loop()  # holds two slots; everyone below queues behind them
    first = [holder.run_until_complete(limit.acquire()) for _ in range(2)]
    threads = []
    for i in range(6):  # each in an event loop of its own, on a thread of its own
        threads.append(threading.Thread(target=asyncio.run, args=(one(i),)))
        threads[-1].start()
        while limit.waiting < i + 1:  # wait until it is queued, so the arrival order is known
            threading.Event().wait(0.005)
    for slot in first:  # released from another thread than the loops waiting for them
        slot.release()
    for t in threads:
        t.join()
    holder.close()
    assert most[0] == 2 and sorted(order) == list(range(6))
    assert set(order[:2]) == {0, 1}  # the two first in line were served first
    assert limit.in_use == 0 and limit.waiting == 0


async def test_a_cancelled_waiter_does_not_leak_a_slot():
    limit = CallLimit(1)
    slot = await limit.acquire()
    waiting = asyncio.ensure_future(limit.acquire())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    slot.release()
    slot.release()  # a second release changes nothing
    await asyncio.wait_for(limit.acquire(), 1)  # the slot came back
    assert limit.in_use == 1


async def test_a_slot_handed_to_a_task_cancelled_meanwhile_passes_on():
    limit = CallLimit(1)
    slot = await limit.acquire()
    first = asyncio.ensure_future(limit.acquire())
    second = asyncio.ensure_future(limit.acquire())
    await asyncio.sleep(0.01)
    slot.release()  # granted to ``first`` ...
    first.cancel()  # ... which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)
    assert limit.in_use == 1 and limit.waiting == 0


def test_a_slot_held_by_a_closed_event_loop_is_taken_back():
    limit = CallLimit(1)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(limit.acquire())  # held by ``loop`` ...
    loop.close()  # ... which is closed without giving it back
    asyncio.run(asyncio.wait_for(limit.acquire(), 5))
    assert limit.in_use == 1


def test_limit_needs_a_slot():
    with pytest.raises(ValueError, match="at least one slot"):
        CallLimit(0)


def test_a_sync_rerank_that_blocks_an_event_loop_does_not_wait_for_that_loops_tasks():
    # The loop's own task holds every shared slot and needs the loop to give them back; a sync rerank on the loop's
    # thread (a blocking call inside async code) must not queue behind it, or neither could ever finish.
    llm = ScriptedLLM(_slow)
    reranker, nodes = _reranker(llm), make_nodes([f"passage {i}" for i in range(6)])
    outcome = {}

    async def main():
        task = asyncio.ensure_future(reranker.arerank("async", nodes))
        await asyncio.sleep(0.05)  # the task now holds the three slots
        outcome["sync"] = reranker.rerank("sync", nodes)
        outcome["async"] = await task

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "deadlock: the sync rerank waited for slots its own blocked loop holds"
    assert len(outcome["sync"].nodes) == len(outcome["async"].nodes) == 6
