"""The fault soak, small: concurrent reranks with cancellations and deadlines through a fault-injecting proxy.

What the soak counts is in tests/soak.py; the full-size run and its figures are in docs/RELIABILITY.md
(``python benchmarks/fault_soak.py``).
"""

import pytest

from fault_proxy import above
from soak import small, soak


def test_above_counts_stretches_over_the_limit_longer_than_the_lag():
    calls = [(0.0, 1.0), (0.5, 2.0), (0.99, 1.5), (1.2, 1.4), (3.0, 4.0), (3.98, 5.0), (3.99, 4.5)]
    assert above(calls, limit=2, grace=0.05) == (3, 1)  # 1.2-1.4; 0.99-1.0 and 3.99-4.0 are too short to count
    assert above(calls, limit=1, grace=0.05) == (3, 2)  # 0.5-1.5 and 3.98-4.5


@pytest.fixture(scope="module")
def figures():
    return soak(small(seed=0))


def test_the_soak_ran_its_faults(figures):
    assert len(figures.reranks) == 38 and all(r.outcome for r in figures.reranks)
    assert {"latency", "trickle", "reset", "half"} <= set(figures.faults), figures.faults
    assert {r.outcome for r in figures.reranks if r.kind == "cancel"} >= {"cancelled"}
    assert {r.outcome for r in figures.reranks if r.kind == "deadline"} >= {"deadline"}


def test_every_rerank_ends_within_its_bound(figures):
    late = [(r.kind, r.outcome, round(r.end - r.bound, 2)) for r in figures.reranks if r.end > r.bound]
    assert late == []
    assert not [r for r in figures.reranks if r.outcome not in ("ok", "cancelled", "deadline")]


def test_no_call_starts_after_a_cancellation_or_after_its_rerank(figures):
    assert (figures.calls_after_cancel, figures.calls_after_return) == (0, 0)


def test_calls_in_flight_never_exceed_max_concurrency(figures):
    assert (figures.above_proxy, figures.above_stub) == (0, 0), figures.table()


def test_nothing_is_left_behind(figures):
    assert (figures.threads_left_later, figures.tasks_left, figures.sockets_left) == ([], 0, 0), figures.table()


def test_no_node_is_lost_or_duplicated(figures):
    assert (figures.lost, figures.duplicated) == (0, 0)
