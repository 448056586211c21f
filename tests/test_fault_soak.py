"""The fault soak, small: concurrent reranks with cancellations and deadlines through a fault-injecting proxy.

What the soak counts is in tests/soak.py; the full-size run and its figures are in docs/RELIABILITY.md
(``python benchmarks/fault_soak.py``). Each soak takes about 15 s and judges promptness by the clock (a cancelled
rerank must end within 0.5 s), so it is marked slow; the small pieces it relies on are tested fast.
"""

import asyncio
import dataclasses
import time

import openai
import pytest

from fault_proxy import FaultProxy, above
from openai_stub import StubServer
from soak import small, soak

MESSAGES = [{"role": "user", "content": 'Query: wings\n<passage id="1">\nwings\n</passage>'}]


@pytest.mark.parametrize("fault, error", [("reset", openai.APIConnectionError), ("half", openai.APIConnectionError),
                                          ("burst", openai.APIStatusError), ("latency", None), ("trickle", None)])
def test_each_fault_reaches_the_client_a_bounded_number_of_times(fault, error):
    with StubServer() as stub, FaultProxy(stub.origin, faults={fault: 1.0}, max_faults=2, slowest=0.2) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="k", max_retries=0)
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append(client.chat.completions.create(model=stub.profile.model, messages=MESSAGES).model)
            except openai.APIError as exc:
                outcomes.append(type(exc))
        client.close()
    faulted = outcomes[:2] if error is None else [o for o in outcomes[:2] if isinstance(o, type) and issubclass(o, error)]
    assert len(faulted) == 2 and outcomes[2] == stub.profile.model  # the third passes: the faults are spent
    assert [c.fault is not None for c in proxy.calls] == [True, True, False] and sum(proxy.injected.values()) == 2
    assert [c.query for c in proxy.calls] == ["wings"] * 3


def test_a_client_that_goes_away_ends_its_call_at_the_proxy():
    # seed 3 draws a pause of 16 s for the first request
    with StubServer() as stub, FaultProxy(stub.origin, faults={"latency": 1.0}, slowest=30.0, seed=3) as proxy:
        async def cancelled_call():
            client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.chat.completions.create(model=stub.profile.model, messages=MESSAGES), 0.2)
            await client.close()

        asyncio.run(cancelled_call())
        for _ in range(100):  # the proxy notices the closed connection on its own thread
            if proxy.calls and proxy.calls[0].end is not None:
                break
            time.sleep(0.05)
        call = proxy.calls[0]
        assert call.end is not None and call.upstream is None  # ended before the pause did, never forwarded


def test_above_counts_stretches_over_the_limit_longer_than_the_lag():
    calls = [(0.0, 1.0), (0.5, 2.0), (0.99, 1.5), (1.2, 1.4), (3.0, 4.0), (3.98, 5.0), (3.99, 4.5)]
    assert above(calls, limit=2, grace=0.05) == (3, 1, pytest.approx(0.2))  # 1.2-1.4; 0.99-1.0, 3.99-4.0 too short
    assert above(calls, limit=1, grace=0.05) == (3, 2, pytest.approx(1.0))  # 0.5-1.5 and 3.98-4.5


@pytest.fixture(scope="module", params=[None, 2.0], ids=["no deadline", "deadline=2"])
def figures(request):
    """The small soak, and again with the reranker's whole-rerank deadline (every rerank's bound is then 2.5 s)."""
    return soak(dataclasses.replace(small(), deadline=request.param))


@pytest.mark.slow
def test_the_soak_ran_its_faults(figures):
    assert len(figures.reranks) == 42 and all(r.outcome for r in figures.reranks)
    assert {"latency", "trickle", "reset", "half"} <= set(figures.faults), figures.faults
    assert {r.outcome for r in figures.reranks if r.kind == "cancel"} >= {"cancelled"}
    assert {r.outcome for r in figures.reranks if r.kind == "deadline"} >= {"deadline"}


@pytest.mark.slow
def test_every_rerank_ends_within_its_bound(figures):
    late = [(r.kind, r.outcome, round(r.end - r.bound, 2)) for r in figures.reranks if r.end > r.bound]
    assert late == []
    assert not [r for r in figures.reranks if r.outcome not in ("ok", "cancelled", "deadline")]


@pytest.mark.slow
def test_no_call_starts_after_a_cancellation_or_after_its_rerank(figures):
    assert (figures.calls_after_cancel, figures.calls_after_return) == (0, 0)


@pytest.mark.slow
def test_calls_in_flight_never_exceed_max_concurrency(figures):
    assert (figures.above_proxy, figures.above_stub) == (0, 0), figures.table()


@pytest.mark.slow
def test_nothing_is_left_behind(figures):
    assert (figures.threads_left_later, figures.tasks_left, figures.sockets_left) == ([], 0, 0), figures.table()


@pytest.mark.slow
def test_no_node_is_lost_or_duplicated(figures):
    assert (figures.lost, figures.duplicated) == (0, 0)
