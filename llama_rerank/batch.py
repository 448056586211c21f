"""Many queries at once: run one rerank per query concurrently, results in input order, with a progress bar.

The queries share the reranker's one concurrency budget (:mod:`llama_rerank.concurrency`), so a batch never has
more than ``max_concurrency`` LLM calls in flight, however many queries it holds. Each query degrades on its own
as a single rerank does (a transient failure keeps that query's retrieval order); an exception a rerank raises (a
permanent :class:`~llama_rerank.errors.LLMConfigError`, or ``on_error="raise"``), a cancellation or Ctrl-C stops
the batch: every query still running is cancelled, none starts another LLM call, and the exception propagates.
Both paths run the queries as tasks of one event loop (the sync one in a loop of its own, see
:mod:`llama_rerank.concurrency`). ``on_result`` sees each result as soon as its query finishes, in that loop, so a
caller can save work before a long batch ends.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Sequence, TypeVar

from llama_index.core.schema import NodeWithScore, QueryBundle

from llama_rerank.concurrency import all_or_none, run_blocking

PROGRESS_FROM = 5  # with progress=None, batches of at least this many queries show a progress bar

Result = TypeVar("Result")
OnResult = Callable[[int, Any], object]  # called with (position in the batch, result) as each query finishes


def check_batch(
    queries: Sequence[Any], node_lists: Sequence[Sequence[NodeWithScore]], check_query: Callable[[Any], object]
) -> None:
    """A clear error for a batch that cannot be run (``check_query`` vets each query), before any query starts."""
    if isinstance(queries, (str, QueryBundle)):
        raise TypeError("rerank_batch takes a list of queries (one per node list); for one query use rerank()")
    if len(queries) != len(node_lists):
        raise ValueError(
            f"rerank_batch got {len(queries)} queries and {len(node_lists)} node lists: give one node list per query"
        )
    for query in queries:
        check_query(query)


def _bar(total: int, progress: bool | None) -> Any:
    from tqdm import tqdm  # a dependency of llama-index-core; tqdm.auto warns in Jupyter without ipywidgets

    show = total >= PROGRESS_FROM if progress is None else progress
    return tqdm(total=total, desc="rerank", unit="query", disable=not show)


def run_batch(
    arerank: Callable[[Any, Sequence[NodeWithScore]], Awaitable[Result]],
    queries: Sequence[Any],
    node_lists: Sequence[Sequence[NodeWithScore]],
    progress: bool | None,
    on_result: OnResult | None = None,
) -> list[Result]:
    """Blocking :func:`arun_batch` (the LLM's sync methods, on threads)."""
    return run_blocking(arun_batch, arerank, queries, node_lists, progress, on_result)


async def arun_batch(
    arerank: Callable[[Any, Sequence[NodeWithScore]], Awaitable[Result]],
    queries: Sequence[Any],
    node_lists: Sequence[Sequence[NodeWithScore]],
    progress: bool | None,
    on_result: OnResult | None = None,
) -> list[Result]:
    """``arerank`` on each (query, nodes) pair as concurrent tasks; the shared budget paces their LLM calls."""
    if not queries:
        return []
    with _bar(len(queries), progress) as bar:

        async def one(position: int) -> Result:
            result = await arerank(queries[position], node_lists[position])
            _done(bar, on_result, position, result)
            return result

        return await all_or_none(one(i) for i in range(len(queries)))


def _done(bar: Any, on_result: OnResult | None, position: int, result: Any) -> None:
    if on_result is not None:
        on_result(position, result)
    bar.update()
