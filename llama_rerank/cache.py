"""The judgement cache: a window judged once is not sent to the LLM again.

Reuse is per window: a window's judgements are stored under :func:`judgement_key`, the hash of everything that
changes them (the model's class, name and API base, the label scale, the scoring mode, the passage budget,
structured output, and the window's first prompt as rendered, which holds the template text, the query and the
passage texts in order). Per-candidate reuse across different windows was not chosen: a label is read in the
context of the other passages, and whether reusing it elsewhere changes quality has not been measured.

Stores (``LikelihoodRerank(cache=...)``):

- ``"memory"``: an LRU of :data:`MEMORY_WINDOWS` windows in this process (``cachetools``);
- a file path: an SQLite file in WAL mode, one connection per thread, each write one atomic statement, so
  threads, tasks and processes can share it;
- any LlamaIndex ``BaseKVStore`` (``llama-index-storage-kvstore-redis``, ``-postgres``, ``-mongodb``...): a cache
  shared by every replica of an app, in the collection :data:`COLLECTION`.

:class:`JudgementCache` wraps a store: only windows whose every candidate got a label are stored (never a
fallback), and a store that cannot be read or written (unreachable, corrupt, full) is a miss with a warning,
never a failed rerank.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from cachetools import LRUCache
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.llms import LLM
from llama_index.core.storage.kvstore.types import BaseKVStore

from llama_rerank.labels import LabelScale
from llama_rerank.providers import model_identity
from llama_rerank.types import Judgement

logger = logging.getLogger(__name__)

MEMORY_WINDOWS = 10_000
COLLECTION = "llama_rerank_judgements"
CACHEABLE = ("label", "logprobs")  # judgement statuses read from an answer; "unparsed"/"failed" are fallbacks
Spec = Any  # None, "memory", a str or os.PathLike path, or a BaseKVStore


class Store(Protocol):
    """Where cached windows live: JSON-able dicts by key."""

    def get(self, key: str) -> Optional[dict]: ...

    def put(self, key: str, value: dict) -> None: ...


class MemoryStore:
    """An LRU of at most ``size`` windows in this process, safe for threads."""

    def __init__(self, size: int = MEMORY_WINDOWS) -> None:
        self._lru: LRUCache[str, dict] = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            return self._lru.get(key)

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._lru[key] = value


class SQLiteStore:
    """One SQLite file (WAL, a connection per thread), shared by threads, tasks and processes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # autocommit: each write is atomic
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._local.db = db
        return db

    def get(self, key: str) -> Optional[dict]:
        row = self._db().execute("SELECT value FROM judgements WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        self._db().execute("INSERT OR REPLACE INTO judgements (key, value) VALUES (?, ?)", (key, json.dumps(value)))


class KVStore:
    """A LlamaIndex ``BaseKVStore``, in the collection :data:`COLLECTION`."""

    def __init__(self, store: BaseKVStore) -> None:
        self.store = store

    def get(self, key: str) -> Optional[dict]:
        return self.store.get(key, collection=COLLECTION)

    def put(self, key: str, value: dict) -> None:
        self.store.put(key, value, collection=COLLECTION)


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


def cache_scope(
    llm: LLM, scale: LabelScale, scoring: str, max_passage_tokens: int, logprobs: bool, structured: bool
) -> str:
    """What, besides the prompt, decides a judgement: the model, the scale, how answers are read and scored, and
    what the requests ask for (logprobs, structured output) as the provider has been seen to accept them."""
    return json.dumps(
        [model_identity(llm), list(zip(scale.labels, scale.values)), scoring, max_passage_tokens, logprobs, structured]
    )


def judgement_key(scope: str, prompt: Sequence[ChatMessage] | str) -> str:
    """sha256 of the scope and the window's rendered prompt (each message's role and text, in order)."""
    text = prompt if isinstance(prompt, str) else [[str(m.role.value), m.content or ""] for m in prompt]
    return hashlib.sha256(json.dumps([scope, text], ensure_ascii=False).encode()).hexdigest()


class JudgementCache:
    """A store behind the rules above: complete successful windows only; any store error is a logged miss."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.store = open_store(spec)
        self.name = type(spec).__name__ if isinstance(spec, BaseKVStore) else str(spec)

    def __reduce__(self) -> tuple[type, tuple[Spec]]:
        """A copied or unpickled reranker opens the same spec again (connections and locks are not copied)."""
        return type(self), (self.spec,)

    def get(self, key: str, size: int) -> Optional[list[Judgement]]:
        """The ``size`` judgements stored under ``key``, or None (a miss, or an unreadable entry: logged)."""
        try:
            value = self.store.get(key)
            if value is None:
                return None
            judgements = [Judgement(label, float(score), status) for label, score, status in value["judgements"]]
            if len(judgements) != size or any(j.status not in CACHEABLE for j in judgements):
                raise ValueError(f"{len(judgements)} judgements stored for a window of {size}")
            return judgements
        except Exception as exc:  # noqa: BLE001 - a cache never fails a rerank
            logger.warning(
                "judgement cache %s unreadable (%s: %s); judging the window anew", self.name, type(exc).__name__, exc
            )
            return None

    def put(self, key: str, judgements: Sequence[Judgement]) -> None:
        """Store a window's judgements if each was read from an answer; a failed write is logged."""
        if any(j.status not in CACHEABLE for j in judgements):
            return
        try:
            self.store.put(key, {"judgements": [[j.label, j.score, j.status] for j in judgements]})
        except Exception as exc:  # noqa: BLE001 - a cache never fails a rerank
            logger.warning(
                "judgement cache %s: write failed (%s: %s); the window is not kept", self.name, type(exc).__name__, exc
            )

