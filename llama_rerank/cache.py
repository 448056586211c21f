"""The judgement cache: a window judged once is not sent to the LLM again, and nothing else is served.

Reuse is per window: a window's judgements are stored under :func:`judgement_key`, the hash of everything that
changes them: the model (its class, name and API base) and every option a request to it carries (each field of the
LLM's working copy but credentials and transport settings, so temperature, top_logprobs, logprobs,
``additional_kwargs`` such as seed or top_p, reasoning effort; and what the reranker adds to each request: the
answer's token limit, reasoning effort and room, a temperature the provider forced, structured output), the label
scale, the scoring mode, the passage budget, the follow-up calls, and the window's first prompt as rendered (the
template, the query and the passage texts in order). The key is sorted JSON, escaped to ASCII (any text can be
keyed, lone surrogates too), so every process computes the same one. Per-candidate reuse across different windows
was not chosen: a label is read in the context of the other passages, and whether reusing it elsewhere changes
quality has not been measured.

Stores (``LikelihoodRerank(cache=...)``):

- ``"memory"``: an LRU of :data:`MEMORY_WINDOWS` windows in this process (``cachetools``);
- a file path: an SQLite file in WAL mode, each write one atomic statement, so threads, tasks and processes can
  share it; a lock held by another writer (or another thread's call) is waited for at most :data:`SQLITE_BUSY_S` s;
- any LlamaIndex ``BaseKVStore`` (``llama-index-storage-kvstore-redis``, ``-postgres``, ``-mongodb``...): a cache
  shared by every replica of an app, in the collection :data:`COLLECTION`. Each call runs on a worker thread and
  is given up after :data:`STORE_WAIT_S` s (a Redis that stops answering, a client without a socket timeout); at
  most :data:`STORE_THREADS` such threads exist at once per cache, however long the store hangs.

:class:`JudgementCache` wraps a store: only windows whose every candidate got a label from an answer are stored
(never a fallback, never a score that is not finite). An entry is checked when read: exactly one judgement per
passage of the window, each a label of this scale with its value (or, scored from logprobs, a finite score within
the scale's range); anything else is a miss with a warning. A store that fails (unreachable, locked, corrupt, too
slow) is a miss with one warning, and is left alone for :data:`COOL_DOWN_S` s, so a broken store costs one wait
per cool-down, not one per window.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from cachetools import LRUCache
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.llms import LLM
from llama_index.core.storage.kvstore.types import BaseKVStore

from llama_rerank.adapters import Adapter
from llama_rerank.labels import LabelScale
from llama_rerank.types import Judgement

logger = logging.getLogger(__name__)

MEMORY_WINDOWS = 10_000
COLLECTION = "llama_rerank_judgements"
CACHEABLE = ("label", "logprobs")  # judgement statuses read from an answer; "unparsed"/"failed" are fallbacks
KEY_VERSION = 2  # bumped when what the key covers changes, so older entries are never read
STORE_WAIT_S = 2.0  # a KV store call that has not answered by then is a miss (or an unwritten window)
STORE_THREADS = 4  # most KV store calls running at once per cache, those given up on included
SQLITE_BUSY_S = 1.0  # how long an SQLite call waits for another writer's lock
COOL_DOWN_S = 30.0  # a store that failed is not used again for this long
# LLM fields that do not change what the model answers; credentials stay out of the key
TRANSPORT_FIELDS = frozenset({"api_key", "timeout", "request_timeout", "max_retries", "reuse_client", "default_headers",
                              "http_client", "async_http_client", "azure_ad_token_provider", "use_azure_ad",
                              "callback_manager"})  # fmt: skip
Spec = Any  # None, "memory", a str or os.PathLike path, or a BaseKVStore


class Store(Protocol):
    """Where cached windows live: JSON-able dicts by key."""

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, value: dict) -> None: ...


class MemoryStore:
    """An LRU of at most ``size`` windows in this process, safe for threads."""

    def __init__(self, size: int = MEMORY_WINDOWS) -> None:
        self.size = size
        self._lru: LRUCache[str, dict] = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._lru.get(key)

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._lru[key] = value


class SQLiteStore:
    """One SQLite file in WAL mode, shared by processes; in this one, a connection that runs one statement at a
    time (opening one per thread made new threads wait on the locks of those closing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _execute(self, sql: str, args: tuple[str, ...]) -> tuple[str] | None:
        if not self._lock.acquire(timeout=SQLITE_BUSY_S):
            raise TimeoutError(f"another call on this SQLite file has taken over {SQLITE_BUSY_S:g} s")
        try:
            if self._db is None:
                db = sqlite3.connect(self.path, timeout=SQLITE_BUSY_S, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")  # autocommit (isolation_level=None): each write is atomic
                db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self._db = db
            return self._db.execute(sql, args).fetchone()
        finally:
            self._lock.release()

    def get(self, key: str) -> dict | None:
        row = self._execute("SELECT value FROM judgements WHERE key = ?", (key,))
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        self._execute("INSERT OR REPLACE INTO judgements (key, value) VALUES (?, ?)", (key, json.dumps(value)))


class KVStore:
    """A LlamaIndex ``BaseKVStore``, in the collection :data:`COLLECTION`; each call bounded in time."""

    def __init__(self, store: BaseKVStore) -> None:
        self.store = store
        self._threads = threading.BoundedSemaphore(STORE_THREADS)

    def get(self, key: str) -> dict | None:
        return self._bounded(lambda: self.store.get(key, collection=COLLECTION))

    def put(self, key: str, value: dict) -> None:
        self._bounded(lambda: self.store.put(key, value, collection=COLLECTION))

    def _bounded(self, call: Callable[[], Any]) -> Any:
        """``call()`` on a daemon thread, given up after :data:`STORE_WAIT_S` s. A thread given up on keeps its
        place among the :data:`STORE_THREADS` until its call returns, so a store that hangs cannot pile them up."""
        deadline = time.monotonic() + STORE_WAIT_S
        if not self._threads.acquire(timeout=STORE_WAIT_S):
            raise TimeoutError(f"{STORE_THREADS} earlier calls to the store have not returned")
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = call()
            except BaseException as exc:  # noqa: BLE001 - handed back to the waiting caller
                box["error"] = exc
            finally:
                self._threads.release()
                done.set()

        threading.Thread(target=run, daemon=True, name="llama-rerank-cache").start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"no answer within {STORE_WAIT_S:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]


def check_spec(spec: Spec) -> Spec:
    """``spec`` if it names a cache; a clear error otherwise (a misspelt ``"memory"``, a folder that is missing)."""
    if spec is None or spec == "memory" or isinstance(spec, BaseKVStore):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.suffix and len(path.parts) == 1 and difflib.get_close_matches(str(spec), ["memory"], cutoff=0.7):
            raise ValueError(f"cache={spec!r}: did you mean 'memory'? (any other text is an SQLite file path)")
        if path.is_dir() or not path.parent.is_dir():
            raise ValueError(f"cache={spec!r}: give a file path in an existing folder for the SQLite cache")
        return spec
    raise TypeError(f"cache must be None, 'memory', a file path or a LlamaIndex BaseKVStore, not {type(spec).__name__}")


def open_store(spec: Spec) -> Store:
    """The store a checked ``spec`` names."""
    if spec == "memory":
        return MemoryStore()
    if isinstance(spec, BaseKVStore):
        return KVStore(spec)
    return SQLiteStore(spec)


def _stable(value: Any) -> Any:
    """JSON for what ``json`` cannot write, the same in every process (no object ids): an enum's value; a
    function's or class's qualified name; for anything else, its type's."""
    if isinstance(value, Enum):
        return value.value
    named = value if hasattr(value, "__qualname__") else type(value)
    return f"{named.__module__}.{named.__qualname__}"


_ENDPOINT_NAMES: dict[str, str] = {}  # API base -> a stable name (see name_endpoint)


def name_endpoint(api_base: str, name: str) -> None:
    """Key what is judged through ``api_base`` under ``name`` instead of the address: the bundled model's server
    gets a new port every run (``llama_rerank.runtime.server.local_llm`` names it), and its judgements must still be
    found by the next process. Only an address the caller knows to serve that model is named."""
    _ENDPOINT_NAMES[api_base.rstrip("/")] = name


def endpoint(llm: LLM) -> str | None:
    """Where ``llm`` is served, as a stable value: its API base (or Azure endpoint), or the name given to it."""
    base = getattr(llm, "api_base", None) or getattr(llm, "azure_endpoint", None)
    return _ENDPOINT_NAMES.get(str(base).rstrip("/"), base) if base else None


def model_key(llm: LLM) -> dict[str, Any]:
    """The model as a stable value: its class, model name and :func:`endpoint`, and every other field of the LLM
    except :data:`TRANSPORT_FIELDS` (so each request option it sends: temperature, top_logprobs,
    ``additional_kwargs``...). Not built from any message text."""
    cls = type(llm)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "model": llm.metadata.model_name,
        "api_base": endpoint(llm),
        "fields": llm.model_dump(exclude=set(TRANSPORT_FIELDS) | {"api_base", "azure_endpoint"}),
    }


def cache_scope(adapter: Adapter, scale: LabelScale, scoring: str, max_passage_tokens: int, followups: int) -> str:
    """What, besides the window's prompt and answer budget, decides a judgement: the model and its request options
    as the provider has been seen to accept them, the scale, how answers are read and scored, and the budgets."""
    return json.dumps(
        {
            "version": KEY_VERSION,
            "model": model_key(adapter.llm),
            # what the reranker adds to every request: the token limit's name and reasoning room, the reasoning
            # effort, a temperature the provider forced, structured output
            "request": adapter.options(0, {}),
            "scale": [list(pair) for pair in zip(scale.labels, scale.values)],
            "scoring": scoring,
            "max_passage_tokens": max_passage_tokens,
            "followup_calls": followups,
        },
        sort_keys=True,
        default=_stable,
    )


def judgement_key(scope: str, prompt: Sequence[ChatMessage] | str, max_tokens: int) -> str:
    """sha256 of the scope, the window's rendered prompt (each message's role and text, in order) and its answer
    budget; the JSON is ASCII (``\\uXXXX`` escapes), so any text, lone surrogates included, can be keyed."""
    text = prompt if isinstance(prompt, str) else [[str(m.role.value), m.content or ""] for m in prompt]
    return hashlib.sha256(json.dumps([scope, text, max_tokens]).encode("ascii")).hexdigest()


def check_judgement(judgement: Judgement, scale: LabelScale) -> None:
    """Raise ``ValueError`` unless ``judgement`` is one this scale could have produced from an answer."""
    label, score, status = judgement.label, judgement.score, judgement.status
    if status not in CACHEABLE:
        raise ValueError(f"status {status!r} is not a judgement read from an answer")
    if not isinstance(label, str) or label not in scale.labels:
        raise ValueError(f"label {label!r} is not on the scale {list(scale.labels)}")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise ValueError(f"score {score!r} is not a finite number")
    if status == "label" and score != scale.score(label):
        raise ValueError(f"score {score!r} is not the value of {label!r} ({scale.score(label)!r})")
    if not scale.values[0] <= score <= scale.values[-1]:
        raise ValueError(f"score {score!r} is outside the scale's range [{scale.values[0]}, {scale.values[-1]}]")


def read_entry(value: Any, size: int, scale: LabelScale) -> list[Judgement]:
    """The judgements of a stored window of ``size`` passages; ``ValueError`` saying what is wrong otherwise."""
    rows = value.get("judgements") if isinstance(value, dict) else None
    if not isinstance(rows, list) or len(rows) != size:
        found = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise ValueError(f"{found} judgements stored for a window of {size}")
    if not all(isinstance(row, list) and len(row) == 3 for row in rows):
        raise ValueError("a judgement is not [label, score, status]")
    judgements = [Judgement(*row) for row in rows]
    for judgement in judgements:
        check_judgement(judgement, scale)
    return judgements


class JudgementCache:
    """A store behind the rules above: complete, checked windows only; a failing store is a logged miss."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.store = open_store(spec)
        self.name = type(spec).__name__ if isinstance(spec, BaseKVStore) else str(spec)
        self._lock = threading.Lock()
        self._resume_at = 0.0  # time.monotonic() before which the store is left alone, after a failure

    def __reduce__(self) -> tuple[type, tuple[Spec]]:
        """A copied or unpickled reranker opens the same spec again (connections and locks are not copied)."""
        return type(self), (self.spec,)

    def get(self, key: str, size: int, scale: LabelScale) -> list[Judgement] | None:
        """The ``size`` judgements stored under ``key``, or None (a miss; an unusable entry or a failing store is
        logged)."""
        if time.monotonic() < self._resume_at:
            return None
        try:
            value = self.store.get(key)
            return None if value is None else read_entry(value, size, scale)
        except ValueError as exc:  # the entry does not decode, or is not a window this configuration could judge
            logger.warning("judgement cache %s: entry %s unusable (%s); judging the window anew", self.name, key, exc)
        except Exception as exc:  # noqa: BLE001 - a cache never fails a rerank
            self._failed("unreadable", exc)
        return None

    def put(self, key: str, judgements: Sequence[Judgement], scale: LabelScale) -> None:
        """Store a window's judgements if each was read from an answer and fits ``scale``; a failure is logged."""
        if any(j.status not in CACHEABLE for j in judgements) or time.monotonic() < self._resume_at:
            return
        try:
            for judgement in judgements:
                check_judgement(judgement, scale)
        except ValueError as exc:
            logger.warning("judgement cache %s: window not stored (%s)", self.name, exc)
            return
        try:
            self.store.put(key, {"judgements": [[j.label, j.score, j.status] for j in judgements]})
        except Exception as exc:  # noqa: BLE001 - a cache never fails a rerank
            self._failed("write failed", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        """Leave the store alone for :data:`COOL_DOWN_S` s; warn once however many calls failed together."""
        with self._lock:
            now = time.monotonic()
            first = now >= self._resume_at
            self._resume_at = now + COOL_DOWN_S
        if first:
            logger.warning(
                "judgement cache %s %s (%s: %s); windows are judged anew and not stored for the next %g s",
                self.name, what, type(exc).__name__, exc, COOL_DOWN_S,
            )  # fmt: skip
