"""The judgement cache: a window judged once makes no second LLM call, whatever store holds it."""

import asyncio
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from llama_index.core.prompts import PromptTemplate
from llama_index.core.storage.kvstore import SimpleKVStore
from llama_index.llms.openai_like import OpenAILike

from conftest import make_nodes
from fakes import Reply, ScriptedLLM, label_by_keyword, tokens_with_logprobs
from llama_rerank import LikelihoodRerank
from llama_rerank import cache as cache_module
from llama_rerank.cache import COLLECTION, JudgementCache
from llama_rerank.errors import LLMConfigError
from llama_rerank.labels import LabelScale
from llama_rerank.types import Judgement
from openai_stub import StubServer

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
    return LikelihoodRerank(llm=llm, cache=cache, **{"window_size": 2, "top_n": 5, **options})


def cache_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "llama_rerank.cache"]


def returns(fn, within=30.0):
    """``fn()``, run on a daemon thread: the test fails (instead of hanging) when it has not returned ``within`` s."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised in the test below
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still waiting after {within} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


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
    assert MemoryStore().size == MEMORY_WINDOWS


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
    "follow-up calls": lambda r: setattr(r, "followup_calls", 0) or ("q", TEXTS),
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


# Two rerankers differing in one request option share one store: the second makes its own LLM call. The real
# openai client (LlamaIndex's OpenAILike) against the stub server speaking llama.cpp's dialect, which accepts each.

WIRE_TEXTS = ["Espresso needs about 25 seconds.", "Oat milk foams well.", "Grind finer when espresso runs fast."]


def wire_llm(url, **options):
    settings = {"model": "qwen", "api_base": url, "api_key": "k", "is_chat_model": True, "context_window": 8192,
                "logprobs": True, "top_logprobs": 5, "temperature": 0.0}  # fmt: skip
    return OpenAILike(**{**settings, **options})


def wire_rerank(llm, store, **options):
    reranker = LikelihoodRerank(llm=llm, cache=store, window_size=3, top_n=3, max_concurrency=1, **options)
    return reranker.rerank("espresso extraction time", make_nodes(WIRE_TEXTS))


REQUEST_CHANGES = {  # LLM options, reranker options
    "temperature": ({"temperature": 1.0}, {}),
    "top_logprobs": ({"top_logprobs": 1}, {}),
    "logprobs off": ({"logprobs": False}, {}),
    "answer token limit": ({}, {"tokenizer": lambda text: text.split()}),  # short passages: only the budget changes
    "seed": ({"additional_kwargs": {"seed": 7}}, {}),
    "top_p": ({"additional_kwargs": {"top_p": 0.5}}, {}),
    "reasoning effort": ({"reasoning_effort": "low"}, {}),
    "model": ({"model": "another-model"}, {}),
    "structured output": ({}, {"structured_output": True}),
}


@pytest.mark.parametrize("change", list(REQUEST_CHANGES))
def test_rerankers_differing_in_one_request_option_do_not_share_judgements(change):
    store = SimpleKVStore()
    llm_options, options = REQUEST_CHANGES[change]
    with StubServer("llamacpp") as stub:
        assert wire_rerank(wire_llm(stub.url), store).usage.llm_calls == 1
        twin = wire_rerank(wire_llm(stub.url), store)  # the same configuration, its own objects: served
        assert twin.usage.cache_hits == 3 and len(stub.chat_requests) == 1
        other = wire_rerank(wire_llm(stub.url, **llm_options), store, **options)
        assert other.usage.cache_hits == 0 and len(stub.chat_requests) == 2, change
        assert wire_rerank(wire_llm(stub.url, **llm_options), store, **options).usage.cache_hits == 3


def test_another_api_base_does_not_share_judgements():
    store = SimpleKVStore()
    with StubServer("llamacpp") as stub, StubServer("llamacpp") as elsewhere:
        wire_rerank(wire_llm(stub.url), store)
        assert wire_rerank(wire_llm(elsewhere.url), store).usage.cache_hits == 0
        assert len(stub.chat_requests) == 1 and len(elsewhere.chat_requests) == 1


def test_the_bundled_models_judgements_outlive_its_servers_port(tmp_path):
    """Each run of the bundled model gets a server on a new port: the cache keys it by name, not address."""
    from llama_rerank.runtime.server import local_llm

    store = tmp_path / "judgements.sqlite"
    with StubServer("llamacpp") as first, StubServer("llamacpp") as next_run:
        wire_rerank(local_llm(api_base=first.url), store)
        assert wire_rerank(local_llm(api_base=next_run.url), store).usage.cache_hits == 3
        assert len(first.chat_requests) == 1 and len(next_run.chat_requests) == 0
        assert wire_rerank(local_llm(api_base=next_run.url, model="another-gguf"), store).usage.cache_hits == 0


def test_the_key_does_not_depend_on_the_order_options_were_given_in():
    store = SimpleKVStore()
    with StubServer("llamacpp") as stub:
        wire_rerank(wire_llm(stub.url, additional_kwargs={"seed": 1, "top_p": 0.9}), store)
        again = wire_rerank(wire_llm(stub.url, additional_kwargs={"top_p": 0.9, "seed": 1}), store)
    assert again.usage.cache_hits == 3 and len(stub.chat_requests) == 1


def _wire_worker(url: str, path: str) -> int:
    return wire_rerank(wire_llm(url, additional_kwargs={"seed": 1, "top_p": 0.9}), path).usage.llm_calls


@pytest.mark.slow  # a spawned interpreter imports LlamaIndex: several seconds
def test_another_process_computes_the_same_key(tmp_path):
    path = str(tmp_path / "judgements.db")
    with StubServer("llamacpp") as stub:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert pool.apply(_wire_worker, (stub.url, path)) == 1
        again = wire_rerank(wire_llm(stub.url, additional_kwargs={"top_p": 0.9, "seed": 1}), path)
    assert again.usage.cache_hits == 3 and len(stub.chat_requests) == 1


# any text can be keyed ---------------------------------------------------------------------------------------------

LONE_SURROGATE = json.loads('"caf\\ud83d latte"')  # what a badly cut UTF-16 text decodes to


@pytest.mark.parametrize("mode", MODES)
def test_a_lone_surrogate_is_keyed_like_any_text(spec, mode):
    texts = [f"wing {LONE_SURROGATE}", LONE_SURROGATE, *TEXTS[2:]]
    llm = ScriptedLLM(SCRIPT)
    reranker = _reranker(llm, spec)
    first = rerank(reranker, LONE_SURROGATE, texts, mode=mode)
    assert first.usage.llm_calls == 3
    assert reranker.estimate(LONE_SURROGATE, make_nodes(texts)).cache_hits == 5
    again = rerank(reranker, LONE_SURROGATE, texts, mode=mode)
    assert again.usage.cache_hits == 5 and outcome(again) == outcome(first) and len(llm.prompts) == 3


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


# a broken store is a miss with one warning, and is left alone for a while ---------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_corrupt_sqlite_file_is_a_miss_with_one_warning(tmp_path, mode, caplog):
    path = tmp_path / "judgements.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    llm = ScriptedLLM(SCRIPT)
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        result = rerank(_reranker(llm, str(path), max_concurrency=1), mode=mode)
    assert outcome(result) == outcome(rerank(_reranker(ScriptedLLM(SCRIPT), None)))
    assert result.usage.cache_hits == 0 and len(llm.prompts) == 3
    [warning] = cache_warnings(caplog)  # not one per window: the store is left alone after its first failure
    assert "unreadable (DatabaseError" in warning and "not stored for the next 30 s" in warning


class Unreachable(SimpleKVStore):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def get(self, key, collection="data"):
        self.calls += 1
        raise ConnectionError("store unreachable")

    def put(self, key, val, collection="data"):
        self.calls += 1
        raise ConnectionError("store unreachable")


@pytest.mark.parametrize("mode", MODES)
def test_an_unreachable_kv_store_is_a_miss_with_one_warning(mode, caplog):
    llm, store = ScriptedLLM(SCRIPT), Unreachable()
    reranker = _reranker(llm, store, max_concurrency=1)
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        result = rerank(reranker, mode=mode)
        asked = store.calls  # at most once per window: the windows may ask at once
        rerank(reranker, "another query", mode=mode)
    assert len(result.nodes) == 5 and len(llm.prompts) == 6
    assert 1 <= asked <= 3 and store.calls == asked  # after a failure, no window waits for the store (cool-down)
    assert cache_warnings(caplog) == [
        "judgement cache Unreachable unreadable (ConnectionError: store unreachable); windows are judged anew and "
        "not stored for the next 30 s"
    ]


class FailsOnce(SimpleKVStore):
    def __init__(self):
        super().__init__()
        self.failed = False

    def get(self, key, collection="data"):
        if not self.failed:
            self.failed = True
            raise ConnectionError("a blip")
        return super().get(key, collection)


def test_a_store_is_used_again_after_the_cool_down(monkeypatch, caplog):
    monkeypatch.setattr(cache_module, "COOL_DOWN_S", 0.0)
    llm, store = ScriptedLLM(SCRIPT), FailsOnce()
    reranker = _reranker(llm, store, max_concurrency=1)
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        rerank(reranker)  # the first read fails; once the cool-down is over, every window is stored
    assert "unreadable (ConnectionError: a blip)" in cache_warnings(caplog)[0]
    assert rerank(reranker).usage.cache_hits == 5 and len(llm.prompts) == 3


# an entry is checked when read --------------------------------------------------------------------------------------


def _set(index, value):
    def corrupt(rows):
        rows[0][index] = value
        return {"judgements": rows}

    return corrupt


CORRUPTIONS = {
    "score above 1": _set(1, 7.5),
    "score below the scale": (lambda rows: {"judgements": [["unlikely", -0.1, "logprobs"]] + rows[1:]}),
    "NaN score": _set(1, math.nan),
    "infinite score": _set(1, math.inf),
    "score as text": _set(1, "1.0"),
    "score as a bool": _set(1, True),
    "label not on the scale": _set(0, "bogus label"),
    "no label": _set(0, None),
    "label with another value": (lambda rows: {"judgements": [["very likely", 0.5, "label"]] + rows[1:]}),
    "a fallback": _set(2, "failed"),
    "a passage missing": (lambda rows: {"judgements": rows[:-1]}),
    "a passage too many": (lambda rows: {"judgements": rows + rows[:1]}),
    "a row that is not one": (lambda rows: {"judgements": ["very likely"] + rows[1:]}),
    "no judgements": (lambda rows: {"labels": rows}),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_an_entry_this_configuration_could_not_have_made_is_a_miss_with_a_warning(corruption, caplog):
    store, llm = SimpleKVStore(), ScriptedLLM(SCRIPT)
    reranker = _reranker(llm, store, window_size=5)  # one window, one entry
    first = rerank(reranker)
    [(key, value)] = store.get_all(collection=COLLECTION).items()
    store.put(key, CORRUPTIONS[corruption]([list(row) for row in value["judgements"]]), collection=COLLECTION)
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        again = rerank(reranker)
    assert again.usage.cache_hits == 0 and len(llm.prompts) == 2 and outcome(again) == outcome(first)
    [warning] = cache_warnings(caplog)
    assert f"entry {key} unusable" in warning and "judging the window anew" in warning
    assert rerank(reranker).usage.cache_hits == 5 and len(llm.prompts) == 2  # judged anew, stored over it


def test_an_sqlite_row_that_does_not_decode_is_a_miss_and_the_store_stays_in_use(tmp_path, caplog):
    path = str(tmp_path / "judgements.db")
    llm = ScriptedLLM(SCRIPT)
    reranker = _reranker(llm, path, max_concurrency=1)
    rerank(reranker)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE judgements SET value = 'not json' WHERE rowid = 1")
    db.close()
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        assert rerank(reranker).usage.cache_hits == 3  # one window judged anew; the others still come from the file
    [warning] = cache_warnings(caplog)
    assert "unusable (JSONDecodeError" in warning or "unusable (Expecting value" in warning


def test_a_score_that_is_not_finite_is_never_stored(caplog):
    cache, scale = JudgementCache("memory"), LabelScale.from_mapping({"unlikely": 0.0, "likely": 0.5, "very likely": 1.0})
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        for score in (math.nan, math.inf, 1.5):
            cache.put(f"key {score}", [Judgement("likely", 0.5, "label"), Judgement("likely", score, "logprobs")], scale)
    assert all(cache.get(f"key {score}", 2, scale) is None for score in (math.nan, math.inf, 1.5))
    assert len(cache_warnings(caplog)) == 3
    cache.put("fine", [Judgement("likely", 0.5, "label"), Judgement("likely", 0.62, "logprobs")], scale)
    assert cache.get("fine", 2, scale) == [Judgement("likely", 0.5, "label"), Judgement("likely", 0.62, "logprobs")]


# a store that takes too long ------------------------------------------------------------------------------------------


class Hanging(SimpleKVStore):
    """A KV store whose calls never answer until released: an unreachable Redis client without a socket timeout."""

    def __init__(self):
        super().__init__()
        self.released = threading.Event()
        self.calls = 0

    def get(self, key, collection="data"):
        self.calls += 1
        self.released.wait()
        return super().get(key, collection)

    def put(self, key, val, collection="data"):
        self.calls += 1
        self.released.wait()
        super().put(key, val, collection)


@pytest.fixture
def hanging(monkeypatch):
    monkeypatch.setattr(cache_module, "STORE_WAIT_S", 0.2)
    store = Hanging()
    yield store
    store.released.set()


def _cache_threads(settle_to=None):
    """Threads running KV store calls; with ``settle_to``, first wait (10 s at most) until only that many are left."""
    deadline = time.monotonic() + 10
    while True:
        count = sum(t.name == "llama-rerank-cache" for t in threading.enumerate())
        if settle_to is None or count <= settle_to or time.monotonic() > deadline:
            return count
        time.sleep(0.01)


@pytest.mark.parametrize("mode", MODES)
def test_a_kv_store_that_never_answers_is_a_miss_after_a_short_wait(hanging, mode, caplog):
    llm = ScriptedLLM(SCRIPT)
    reranker = _reranker(llm, hanging, max_concurrency=1)
    with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
        result = returns(lambda: rerank(reranker, mode=mode))
        asked = hanging.calls  # at most once per window: the windows may ask at once
        again = returns(lambda: rerank(reranker, "another query", mode=mode))
    assert outcome(result) == outcome(rerank(_reranker(ScriptedLLM(SCRIPT), None)))
    assert again.usage.llm_calls == 3 and len(llm.prompts) == 6
    assert 1 <= asked <= 3 and hanging.calls == asked  # after the first wait, nothing waits for it again (cool-down)
    assert cache_warnings(caplog) == [
        "judgement cache Hanging unreadable (TimeoutError: no answer within 0.2 s); windows are judged anew and not "
        "stored for the next 30 s"
    ]
    fresh = _reranker(ScriptedLLM(SCRIPT), hanging)  # a cache of its own, not resting: estimate() waits briefly too
    assert returns(lambda: fresh.estimate("q", make_nodes(TEXTS))).llm_calls == 3 and hanging.calls > asked


def test_calls_given_up_on_do_not_pile_up(hanging, monkeypatch):
    monkeypatch.setattr(cache_module, "COOL_DOWN_S", 0.0)  # try the store on every window
    assert _cache_threads(settle_to=0) == 0  # those of earlier tests were released
    reranker = _reranker(ScriptedLLM(SCRIPT), hanging, max_concurrency=4)
    for query in ("q1", "q2", "q3"):
        returns(lambda: rerank(reranker, query))
    assert hanging.calls == cache_module.STORE_THREADS and _cache_threads() == cache_module.STORE_THREADS
    hanging.released.set()
    assert _cache_threads(settle_to=0) == 0  # released, every call given up on returns and its thread ends


def _hold_write_lock(path):
    """Another process holding the SQLite file's write lock until its stdin closes."""
    script = ("import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
              "db.execute('BEGIN IMMEDIATE'); db.execute(\"INSERT INTO judgements VALUES ('x', '{}')\"); "
              "print('locked', flush=True); sys.stdin.read()")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", script, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("mode", MODES)
def test_a_write_lock_held_by_another_process_is_waited_for_briefly(tmp_path, mode, caplog):
    path = str(tmp_path / "judgements.db")
    rerank(_reranker(ScriptedLLM(SCRIPT), path))  # the file exists, in WAL mode
    holder = _hold_write_lock(path)
    try:
        llm = ScriptedLLM(SCRIPT)
        reranker = _reranker(llm, path, max_concurrency=1)
        with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
            result = returns(lambda: rerank(reranker, "another query", mode=mode), within=20)  # 30 s per write before
            assert returns(lambda: rerank(reranker, mode=mode), within=20).usage.cache_hits == 0  # the store rests
    finally:
        holder.communicate("")
    assert result.usage.llm_calls == 3 and len(llm.prompts) == 6
    [warning] = cache_warnings(caplog)  # async windows write at once: one waits for SQLite, the others for it
    assert "write failed (OperationalError: database is locked)" in warning or "taken over 1 s" in warning

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
        opened = reranker.resources.cache
        for twin in (copy.deepcopy(reranker), pickle.loads(pickle.dumps(reranker))):
            assert twin.resources.cache is not opened and twin.resources.cache.spec == spec


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


def test_a_redis_server_that_stops_answering_is_a_miss_after_a_short_wait(redis_url, monkeypatch, caplog):
    from llama_index.storage.kvstore.redis import RedisKVStore

    monkeypatch.setattr(cache_module, "STORE_WAIT_S", 0.5)
    url, process = redis_url
    llm = ScriptedLLM(SCRIPT)
    reranker = _reranker(llm, RedisKVStore(redis_uri=url), max_concurrency=1)  # redis-py: no socket timeout
    rerank(reranker)
    process.send_signal(signal.SIGSTOP)  # the connection stays open and nothing answers
    try:
        with caplog.at_level(logging.WARNING, logger="llama_rerank.cache"):
            result = returns(lambda: rerank(reranker, "another query"))
    finally:
        process.send_signal(signal.SIGCONT)
    assert result.usage.cache_hits == 0 and len(result.nodes) == 5 and len(llm.prompts) == 6
    assert cache_warnings(caplog) == [
        "judgement cache RedisKVStore unreadable (TimeoutError: no answer within 0.5 s); windows are judged anew and "
        "not stored for the next 30 s"
    ]
