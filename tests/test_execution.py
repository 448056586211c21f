"""The caller is in charge: cancellation and Ctrl-C end a rerank at once and are never retried, a permanent error stops
every window, sync-only LLMs never block the event loop, and the concurrency limit holds even for calls that cannot
be stopped (abandoned at their timeout, or held by an event loop that was closed). Assertions are on what the LLM
saw (calls, calls in flight, their order), not on wall time."""

import asyncio
import contextlib
import gc
import signal
import threading
import time

import pytest
from llama_index.core.llms.custom import CustomLLM

from conftest import make_nodes
from fakes import Reply, ScriptedLLM, passages
from llama_rerank import LikelihoodRerank
from llama_rerank.errors import LLMConfigError, RerankLLMError

MODES = ["sync", "async"]


class SyncOnlyLLM(ScriptedLLM):
    """A custom LLM implementing only the sync methods: LlamaIndex's default async ones call them on the loop."""

    achat = CustomLLM.achat
    acomplete = CustomLLM.acomplete


class RateLimited(Exception):
    def __init__(self, seconds):
        super().__init__("429 Too Many Requests")
        self.retry_after = seconds


class Unauthorized(Exception):
    status_code = 401


def labels(prompt, call=0):
    return "\n".join(f"[{i}] likely" for i in range(1, len(passages(prompt)) + 1))


def rerank(reranker, mode, nodes, query="q"):
    if mode == "sync":
        return reranker.rerank(query, nodes)
    return asyncio.run(reranker.arerank(query, nodes))


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# -- cancellation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["wait_for", "cancel"])
async def test_a_cancelled_rerank_ends_at_once_and_is_never_retried(how, caplog):
    llm = ScriptedLLM(lambda p, c: Reply(labels(p), delay=3600))  # never answers
    reranker = LikelihoodRerank(llm=llm, window_size=3, timeout=1.0, max_retries=2)
    nodes = make_nodes([f"passage {i}" for i in range(6)])
    if how == "wait_for":
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reranker.arerank("q", nodes), 0.3)
    else:
        task = asyncio.ensure_future(reranker.arerank("q", nodes))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(llm.prompts) == 2 and llm.in_flight == 0  # both windows' calls were cancelled, not retried
    await asyncio.sleep(1.5)  # longer than a retry's backoff plus the call timeout
    assert len(llm.prompts) == 2, "nothing calls again in the background"
    assert "retrying" not in caplog.text
    assert reranker.resources.limit.in_use == 0


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="sends SIGINT to the main thread (POSIX)")
@pytest.mark.parametrize("windows", [1, 5])
def test_ctrl_c_during_a_sync_rerank_surfaces_at_once_and_starts_nothing(windows):
    gate = threading.Event()
    llm = ScriptedLLM(lambda p, c: gate.wait(30) and labels(p))  # answers only once the gate opens
    reranker = LikelihoodRerank(llm=llm, window_size=1, max_concurrency=2, timeout=60)
    nodes = make_nodes([f"passage {i}" for i in range(windows)])
    started = min(windows, 2)

    def press_ctrl_c():
        wait_until(lambda: llm.in_flight == started)
        time.sleep(0.2)  # let the main thread settle into waiting (an interrupt inside C code can upset CPython 3.11)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            reranker.rerank("q", nodes)
        assert llm.in_flight == started, "Ctrl-C surfaced while the calls were still running (nobody waited for them)"
    finally:
        gate.set()
    wait_until(lambda: llm.in_flight == 0)
    time.sleep(0.2)
    assert len(llm.prompts) == started, "no window started after Ctrl-C"
    wait_until(lambda: reranker.resources.limit.in_use == 0)  # the abandoned calls' threads gave their slots back


def test_ctrl_c_raised_inside_a_window_stops_the_rerank_and_frees_every_slot():
    """KeyboardInterrupt that reaches a task (here: the LLM call raises it) rather than the waiting loop."""
    gate = threading.Event()
    llm = ScriptedLLM(lambda p, c: KeyboardInterrupt() if c == 2 else (gate.wait(30) and labels(p)))
    reranker = LikelihoodRerank(llm=llm, window_size=1, max_concurrency=3, timeout=60)
    with pytest.raises(KeyboardInterrupt):
        reranker.rerank("q", make_nodes([f"passage {i}" for i in range(6)]))
    gate.set()
    wait_until(lambda: llm.in_flight == 0)
    time.sleep(0.2)
    assert len(llm.prompts) == 3, "no window started after Ctrl-C"
    wait_until(lambda: reranker.resources.limit.in_use == 0)


# -- a permanent error stops everything -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_permanent_error_stops_the_windows_not_yet_started(mode):
    llm = ScriptedLLM(lambda p, c: Unauthorized("bad key") if c == 0 else Reply(labels(p), delay=0.3))
    reranker = LikelihoodRerank(llm=llm, window_size=1, max_concurrency=2, top_n=12)
    nodes = make_nodes([f"passage {i}" for i in range(12)])

    async def in_a_loop_that_goes_on():
        with pytest.raises(LLMConfigError):
            await reranker.arerank("q", nodes)
        while reranker.resources.limit.in_use:  # a call dispatched beside the failing one records its prompt on its thread
            await asyncio.sleep(0.01)
        calls = len(llm.prompts)
        await asyncio.sleep(0.6)  # the caller's loop keeps running: windows left behind would call now
        return calls

    if mode == "sync":
        with pytest.raises(LLMConfigError):
            reranker.rerank("q", nodes)
        wait_until(lambda: reranker.resources.limit.in_use == 0)  # (as above: the abandoned call's thread)
        calls = len(llm.prompts)
        time.sleep(0.6)
    else:
        calls = asyncio.run(in_a_loop_that_goes_on())
    assert calls <= 3  # the failing window, the one in flight beside it, at most one more; not all 12
    assert len(llm.prompts) == calls, "no window calls after the error, in the background or later"


# -- sync-only LLMs and the event loop ------------------------------------------------------------------------------


async def test_an_llm_without_an_async_path_never_runs_on_the_event_loop():
    llm = SyncOnlyLLM(lambda p, c: Reply(labels(p), delay=0.3))
    reranker = LikelihoodRerank(llm=llm, window_size=1, max_concurrency=4, top_n=4)
    beats_during_calls = []

    async def heartbeat():
        while True:
            await asyncio.sleep(0.02)
            if llm.in_flight:
                beats_during_calls.append(llm.in_flight)

    beating = asyncio.ensure_future(heartbeat())
    result = await reranker.arerank("q", make_nodes([f"passage {i}" for i in range(4)]))
    beating.cancel()
    assert result.usage.llm_calls == 4 and result.usage.failed_windows == 0
    assert llm.max_in_flight == 4, "the windows ran concurrently"
    assert beats_during_calls, "the event loop kept running while the LLM worked"


# -- the limit holds for work that cannot be stopped ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_call_abandoned_at_its_timeout_keeps_its_slot_until_it_returns(mode):
    llm = SyncOnlyLLM(lambda p, c: Reply(labels(p), delay=0.6 if c < 4 else 0))  # the first four calls hang
    reranker = LikelihoodRerank(llm=llm, window_size=1, max_concurrency=2, timeout=0.15, max_retries=0, top_n=4)
    nodes = make_nodes([f"passage {i}" for i in range(4)])
    first = rerank(reranker, mode, nodes)
    assert first.usage.failed_windows == 4  # every call timed out ...
    assert llm.max_in_flight == 2  # ... and the abandoned ones kept counting against the limit
    second = rerank(reranker, mode, nodes)
    assert second.usage.failed_windows == 0 and llm.max_in_flight == 2


@pytest.mark.parametrize("mode", MODES)
def test_a_retry_after_wait_holds_no_slot(mode, monkeypatch):
    llm = ScriptedLLM(lambda p, c: RateLimited(5.0) if c == 0 else labels(p))
    waits = []

    async def sleep(seconds):  # the first window waits until the other window has been called (or 5 s)
        waits.append(seconds)
        for _ in range(500):
            if len(llm.prompts) > 1:
                return
            await asyncio.sleep(0.01)

    monkeypatch.setattr("llama_rerank.llm._sleep", sleep)
    reranker = LikelihoodRerank(llm=llm, window_size=1, max_concurrency=1, top_n=2)
    result = rerank(reranker, mode, make_nodes(["passage 0", "passage 1"]))
    assert waits == [5.0] and result.usage.retries == 1 and result.usage.failed_windows == 0
    order = [passages(p)[0].split("\n")[-1] for p in llm.prompts]
    assert order == ["passage 0", "passage 1", "passage 0"], "the other window ran while the first one waited"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_slot_held_by_an_event_loop_closed_mid_rerank_is_recovered():
    llm = ScriptedLLM(lambda p, c: Reply(labels(p), delay=3600 if c == 0 else 0))
    reranker = LikelihoodRerank(llm=llm, max_concurrency=1)
    nodes = make_nodes(["passage 0", "passage 1"])
    loop = asyncio.new_event_loop()
    loop.create_task(reranker.arerank("q", nodes))
    while not llm.in_flight:  # the rerank now holds the only slot, in a call that never ends
        loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()  # closed mid-rerank: nobody will ever give that slot back
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", reranker.rerank("q", nodes)), daemon=True)
    thread.start()
    thread.join(15)
    assert not thread.is_alive(), "the next rerank waited for a slot held by a closed event loop"
    assert outcome["result"].usage.failed_windows == 0
    for task in asyncio.all_tasks(loop):  # tear the dead rerank down now (LlamaIndex's spans complain: ignored)
        task._log_destroy_pending = False
        with contextlib.suppress(BaseException):
            task.get_coro().close()
    gc.collect()


# -- a deadline for the whole rerank --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_past_its_deadline_a_rerank_returns_what_it_has_and_the_rest_keeps_retrieval_order(mode, caplog):
    llm = ScriptedLLM(lambda p, c: Reply(labels(p).replace("likely", "very likely"), delay=0 if c == 0 else 5))
    reranker = LikelihoodRerank(llm=llm, window_size=2, max_concurrency=1, deadline=0.5, top_n=4)
    result = rerank(reranker, mode, make_nodes([f"passage {i}" for i in range(4)]))
    assert [n.node.metadata["rerank_label"] for n in result.nodes] == ["very likely", "very likely", None, None]
    assert [n.node.node_id for n in result.nodes] == ["n0", "n1", "n2", "n3"]
    assert result.usage.failed_windows == 1 and "deadline of 0.5 s passed" in caplog.text
    with pytest.raises(RerankLLMError, match="deadline"):
        rerank(reranker.model_copy(update={"on_error": "raise"}), mode, make_nodes([f"passage {i}" for i in range(4)]))


# -- over real HTTP -------------------------------------------------------------------------------------------------


async def test_a_rerank_cancelled_over_real_http_sends_no_further_request(caplog):
    """The real ``openai`` client: the cancelled requests are closed, and none is retried."""
    from llama_index.llms.openai_like import OpenAILike
    from openai_stub import StubServer, slow

    with StubServer("openai-chat", script=[slow(3), slow(3)]) as stub:
        llm = OpenAILike(model=stub.profile.model, api_base=stub.url, api_key="k", is_chat_model=True)
        reranker = LikelihoodRerank(llm=llm, window_size=3, max_concurrency=2, max_retries=2, timeout=30)
        task = asyncio.ensure_future(reranker.arerank("q", make_nodes([f"passage {i}" for i in range(6)])))
        for _ in range(1000):  # until both windows' requests have arrived
            if len(stub.chat_requests) == 2:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)
        assert len(stub.chat_requests) == 2, "one request per window, none after the cancellation"
    assert "retrying" not in caplog.text and reranker.resources.limit.in_use == 0
