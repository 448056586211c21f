"""The judgement cache: a window judged once makes no second LLM call, whatever store holds it."""

import asyncio
import logging
import multiprocessing
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from llama_index.core.prompts import PromptTemplate
from llama_index.core.storage.kvstore import SimpleKVStore

from conftest import make_nodes
from fakes import Reply, ScriptedLLM, label_by_keyword, tokens_with_logprobs
from llama_rerank import LikelihoodRerank
from llama_rerank.cache import COLLECTION
from llama_rerank.errors import LLMConfigError

MODES = ["sync", "async"]
TEXTS = ["wing passage", "flap passage", "jet passage", "rocket passage", "plate passage"]
SCRIPT = label_by_keyword({"wing": "very likely", "flap": "likely"})


def rerank(reranker, query="q", texts=TEXTS, mode="sync"):
    nodes = make_nodes(texts)
    if mode == "sync":
        return reranker.rerank(query, nodes)
    return asyncio.run(reranker.arerank(query, nodes))


def outcome(result):
    return [(n.node.node_id, n.node.metadata["rerank_label"], n.score) for n in result.nodes]


def _reranker(llm, cache, **options):
    return LikelihoodRerank(llm=llm, cache=cache, window_size=2, top_n=5, **options)


@pytest.fixture(params=["memory", "sqlite", "kvstore"])
def spec(request, tmp_path):
    return {"memory": "memory", "sqlite": str(tmp_path / "judgements.db"), "kvstore": SimpleKVStore()}[request.param]


@pytest.mark.parametrize("mode", MODES)
def test_a_window_judged_once_makes_no_second_call(spec, mode):
    llm = ScriptedLLM(SCRIPT)
    reranker = _reranker(llm, spec)
    first = rerank(reranker, mode=mode)
    assert len(llm.prompts) == 3 and first.usage.cache_hits == 0
    again = rerank(reranker, mode=mode)
    assert len(llm.prompts) == 3  # no new call
    assert again.usage.cache_hits == 5 and again.usage.llm_calls == 0 and again.usage.prompt_tokens == 0
    assert outcome(again) == outcome(first)


def test_a_store_outlives_the_reranker_that_filled_it(tmp_path):
    path = str(tmp_path / "judgements.db")
    rerank(_reranker(ScriptedLLM(SCRIPT), path))
    llm = ScriptedLLM(SCRIPT)
    assert rerank(_reranker(llm, path)).usage.cache_hits == 5 and llm.prompts == []


def test_logprob_scores_come_back_from_the_cache():
    reply = "[1] very likely\n[2] unlikely"
    alternatives = {"very": {"very": -0.1, "likely": -2.5, "unlikely": -3.0}, "unlikely": {"unlikely": -0.2, "likely": -1.7}}
    llm = ScriptedLLM(lambda prompt, call: Reply(reply, logprobs=tokens_with_logprobs(reply, alternatives)))
    reranker = _reranker(llm, "memory", scoring="logprobs")
    first = rerank(reranker, texts=TEXTS[:2])
    again = rerank(reranker, texts=TEXTS[:2])
    assert len(llm.prompts) == 1 and outcome(again) == outcome(first)
    assert 0 < first.nodes[0].score < 1 and again.usage.logprob_scored == 2


def test_the_memory_cache_keeps_the_most_recently_used_windows():
    from llama_rerank.cache import MEMORY_WINDOWS, MemoryStore

    store = MemoryStore(size=2)
    store.put("a", {"judgements": []})
    store.put("b", {"judgements": []})
    store.get("a")
    store.put("c", {"judgements": []})
    assert store.get("b") is None and store.get("a") and store.get("c")
    assert MemoryStore()._lru.maxsize == MEMORY_WINDOWS


# what the key covers -----------------------------------------------------------------------------------------------


def _other_template():
    return PromptTemplate("Query: {query}\nLabels: {labels}\nJudge {num} passages.\n{passages}\nAnswer [i] label per line:")


CHANGES = {
    "query": lambda r: ("another query", TEXTS),
    "passage order": lambda r: ("q", TEXTS[::-1]),
    "a passage's text": lambda r: ("q", ["wing passage!"] + TEXTS[1:]),
    "model name": lambda r: setattr(r.llm, "model_name", "other") or ("q", TEXTS),
    "model class": lambda r: setattr(r, "llm", type("OtherLLM", (ScriptedLLM,), {})(SCRIPT)) or ("q", TEXTS),
    "prompt template": lambda r: r.update_prompts({"rerank_prompt": _other_template()}) or ("q", TEXTS),
    "label scale": lambda r: setattr(r, "label_scale", {"unlikely": 0.0, "likely": 0.6, "very likely": 1.0}) or ("q", TEXTS),
    "scoring": lambda r: setattr(r, "scoring", "label") or ("q", TEXTS),
    "passage budget": lambda r: setattr(r, "max_passage_tokens", 32) or ("q", TEXTS),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_key_covers_everything_that_changes_a_judgement(change):
    llm = ScriptedLLM(SCRIPT)
    reranker = _reranker(llm, "memory")
    rerank(reranker)
    query, texts = CHANGES[change](reranker)
    result = rerank(reranker, query, texts)
    assert result.usage.cache_hits < 5, change  # the same passages, judged under something else, are not reused
    assert rerank(reranker, query, texts).usage.cache_hits == 5  # ... and are stored in turn


def test_what_the_requests_ask_for_is_part_of_the_key():  # (only OpenAI-compatible classes send them: test_wire.py)
    from llama_rerank.cache import cache_scope

    reranker = LikelihoodRerank(llm=ScriptedLLM(SCRIPT))
    asks = [(False, False), (True, False), (False, True)]  # logprobs (as the provider accepts them), structured output
    assert len({cache_scope(reranker.llm, reranker.scale, "auto", 256, *ask) for ask in asks}) == 3


def test_windows_shared_between_queries_candidate_lists_are_reused():
    llm = ScriptedLLM(SCRIPT)
    reranker = _reranker(llm, "memory")
    rerank(reranker, texts=TEXTS)
    result = rerank(reranker, texts=TEXTS[:2] + ["new passage"])
    assert result.usage.cache_hits == 2 and len(llm.prompts) == 4  # the first window again; the second is new


# only successful judgements are kept --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_fallbacks_are_never_cached(mode, caplog):
    replies = iter([ConnectionError("down"), "[1] likely", "[1] likely\n[2] likely"])
    llm = ScriptedLLM(lambda prompt, call: next(replies))
    reranker = _reranker(llm, "memory", max_retries=0, followup_calls=0)
    with caplog.at_level(logging.WARNING):
        failed = rerank(reranker, texts=TEXTS[:2], mode=mode)
        unparsed = rerank(reranker, texts=TEXTS[:2], mode=mode)  # labels the first passage only
    assert failed.usage.failed_windows == 1 and unparsed.usage.unparsed == 1
    judged = rerank(reranker, texts=TEXTS[:2], mode=mode)
    assert judged.usage.cache_hits == 0 and judged.usage.llm_calls == 1 and len(llm.prompts) == 3
    assert rerank(reranker, texts=TEXTS[:2], mode=mode).usage.cache_hits == 2


@pytest.mark.parametrize("mode", MODES)
def test_a_permanent_error_is_raised_through_the_cache(mode):
    class Unauthorized(Exception):
        status_code = 401

    reranker = _reranker(ScriptedLLM(lambda prompt, call: Unauthorized("bad key")), "memory")
    with pytest.raises(LLMConfigError):
        rerank(reranker, mode=mode)


# a broken store is a miss with a warning ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_corrupt_sqlite_file_is_a_miss_with_a_warning(tmp_path, mode, caplog):
    path = tmp_path / "judgements.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    llm = ScriptedLLM(SCRIPT)
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        result = rerank(_reranker(llm, str(path)), mode=mode)
    assert outcome(result) == outcome(rerank(_reranker(ScriptedLLM(SCRIPT), None)))
    assert result.usage.cache_hits == 0 and len(llm.prompts) == 3
    assert "unreadable (DatabaseError" in caplog.text and "write failed" in caplog.text


def test_an_entry_of_the_wrong_shape_is_a_miss(caplog):
    store = SimpleKVStore()
    llm = ScriptedLLM(SCRIPT)
    reranker = _reranker(llm, store)
    rerank(reranker)
    for key in store.get_all(collection=COLLECTION):
        store.put(key, {"judgements": [["likely", 0.5, "failed"]]}, collection=COLLECTION)
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        assert rerank(reranker).usage.cache_hits == 0
    assert len(llm.prompts) == 6 and "judging the window anew" in caplog.text


class Unreachable(SimpleKVStore):
    def get(self, key, collection="data"):
        raise ConnectionError("store unreachable")

    def put(self, key, val, collection="data"):
        raise ConnectionError("store unreachable")


@pytest.mark.parametrize("mode", MODES)
def test_an_unreachable_kv_store_is_a_miss_with_a_warning(mode, caplog):
    llm = ScriptedLLM(SCRIPT)
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        result = rerank(_reranker(llm, Unreachable()), mode=mode)
    assert len(result.nodes) == 5 and len(llm.prompts) == 3
    assert "judgement cache Unreachable unreadable (ConnectionError: store unreachable)" in caplog.text


# bad options are refused at construction ---------------------------------------------------------------------------


def test_a_cache_option_that_names_no_cache_is_refused(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'memory'"):
        LikelihoodRerank(cache="memroy")
    with pytest.raises(ValueError, match="existing folder"):
        LikelihoodRerank(cache=str(tmp_path / "missing" / "judgements.db"))
    with pytest.raises(ValueError, match="existing folder"):
        LikelihoodRerank(cache=str(tmp_path))
    with pytest.raises(TypeError, match="BaseKVStore, not dict"):
        LikelihoodRerank(cache={})
    assert LikelihoodRerank(cache=tmp_path / "memory.db").to_dict()["cache"] == str(tmp_path / "memory.db")
    assert LikelihoodRerank(cache=SimpleKVStore()).to_dict()["cache"] is None


def test_a_copied_reranker_opens_its_cache_again(tmp_path):
    import copy
    import pickle

    for spec in ("memory", str(tmp_path / "judgements.db")):
        reranker = LikelihoodRerank(cache=spec)
        opened = reranker._judgement_cache
        for twin in (copy.deepcopy(reranker), pickle.loads(pickle.dumps(reranker))):
            assert twin._judgement_cache is not opened and twin._judgement_cache.spec == spec


# concurrency on one SQLite file --------------------------------------------------------------------------------------


def _slow_script(prompt, call):
    return Reply(SCRIPT(prompt, call), delay=0.01)


def test_threads_and_tasks_share_one_sqlite_file(tmp_path):
    path = str(tmp_path / "judgements.db")
    llm = ScriptedLLM(_slow_script)
    reranker = _reranker(llm, path, max_concurrency=8)
    queries = [f"query {q % 10}" for q in range(40)]  # each query four times

    def on_thread(query):
        return outcome(reranker.rerank(query, make_nodes(TEXTS)))

    async def in_tasks():
        return [outcome(r) for r in await asyncio.gather(*(reranker.arerank(q, make_nodes(TEXTS)) for q in queries))]

    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(on_thread, queries))
    calls = len(llm.prompts)  # 30 windows; a few more if two threads judged one window before either stored it
    assert 30 <= calls < 120
    tasked = asyncio.run(in_tasks())
    assert tasked == threaded and len(llm.prompts) == calls  # every task found its windows stored
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM judgements").fetchone()[0] == 30  # 10 queries x 3 windows
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert rerank(_reranker(ScriptedLLM(SCRIPT), path), "query 3").usage.cache_hits == 5


def _process_worker(path: str, first: int) -> list:
    reranker = _reranker(ScriptedLLM(_slow_script), path, max_concurrency=4)
    return [outcome(reranker.rerank(f"query {q}", make_nodes(TEXTS))) for q in range(first, first + 12)]


def test_processes_share_one_sqlite_file(tmp_path):
    path = str(tmp_path / "judgements.db")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_process_worker, [(path, 0), (path, 4), (path, 8)])  # overlapping queries
    assert results[0][4:] == results[1][:8] and results[1][4:] == results[2][:8]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM judgements").fetchone()[0] == 20 * 3
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    llm = ScriptedLLM(SCRIPT)
    assert all(rerank(_reranker(llm, path), f"query {q}").usage.cache_hits == 5 for q in range(20)) and not llm.prompts


# a real Redis server through LlamaIndex's Redis KV store --------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path):
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed: .ci/run installs it (apt-get install -y redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("mode", MODES)
def test_replicas_share_judgements_through_redis(redis_url, mode):
    from llama_index.storage.kvstore.redis import RedisKVStore

    url, _ = redis_url
    first = ScriptedLLM(SCRIPT)
    judged = rerank(_reranker(first, RedisKVStore(redis_uri=url)), mode=mode)
    replica = ScriptedLLM(SCRIPT)  # another instance with its own client: a second replica of the app
    reused = rerank(_reranker(replica, RedisKVStore(redis_uri=url)), mode=mode)
    assert len(first.prompts) == 3 and replica.prompts == []
    assert reused.usage.cache_hits == 5 and outcome(reused) == outcome(judged)


def test_a_redis_server_that_goes_away_is_a_miss_with_a_warning(redis_url, caplog):
    from llama_index.storage.kvstore.redis import RedisKVStore

    url, process = redis_url
    reranker = _reranker(ScriptedLLM(SCRIPT), RedisKVStore(redis_uri=url))
    rerank(reranker)
    process.terminate()
    process.wait(10)
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        result = rerank(reranker)
    assert result.usage.cache_hits == 0 and result.usage.llm_calls == 3
    assert "judgement cache RedisKVStore unreadable (ConnectionError" in caplog.text
