"""An evaluation run: index the corpus in Chroma, retrieve top K per query, rerank with each system, cache results.

**Index.** Each corpus document is split into chunks (``SentenceSplitter``, 256 tokens, overlap 32) stored as nodes
with id ``{corpus id}#{chunk number}`` and ``metadata["corpus_id"]`` (hidden from the LLM and the embedding). The
collection ``eval`` records a fingerprint of the corpus, chunking and embedding model, and its chunk count: a store
holding that corpus is reused (an interrupted build is completed), a store holding another corpus is refused.

**Rerank.** All systems see the same K first-stage chunks and the same LLM. A system's order is completed with
every candidate it did not return, in first-stage order (LLMRerank keeps only the documents it judges relevant;
RankGPT may drop some), so metrics compare rankings of the same candidates; a system that raises on a query counts
one failure and keeps the first-stage order. ``LikelihoodRerank`` systems rerank all the queries as one batch
(``rerank_batch``: queries overlap within its ``max_concurrency``; an ``LLMConfigError`` stops the run) and their
LLM calls and tokens are the reranker's own per-query usage; the other systems run query by query, counted by a
LlamaIndex ``TokenCountingHandler`` on the LLM's callback manager (both take token counts from the provider's usage
when it reports one). Latency is the first-stage retrieval plus the system's reranking, per query; for a batch,
while other queries overlap it.

**Resume.** Each (system config, LLM, query, candidate ids, system prompts) result is appended to ``results.jsonl`` in the cache
folder and flushed as soon as it is ready, so an interrupted run loses at most the queries in progress and a rerun sends only what
is missing to the LLM. Unreadable lines (a torn last line) are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any, Callable, Collection, Mapping, Sequence

from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.callbacks import TokenCountingHandler
from llama_index.core.llms import LLM
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, TextNode
from tqdm import tqdm

from llama_rerank import pipeline, store as stores
from llama_rerank.errors import StoreError
from llama_rerank.eval import EvalError, systems
from llama_rerank.eval.datasets import Dataset, load_dataset, select_queries
from llama_rerank.eval.metrics import doc_ranking
from llama_rerank.postprocessor import LikelihoodRerank, RerankResult
from llama_rerank.types import RerankEstimate

logger = logging.getLogger(__name__)

COLLECTION = "eval"
CHUNK_SIZE, CHUNK_OVERLAP = 256, 32
EMBED_BATCH = 128
CACHE_FILE = "results.jsonl"


@dataclass
class QueryResult:
    """One system on one query: corpus ids best first, what it cost, and the error if the system raised."""

    ranking: list[str]
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    appended: int = 0  # candidates the system did not return, put after its own order
    error: str | None = None


@dataclass
class EvalRun:
    """What ``evaluate`` did: the dataset, the settings used, and ``results[system][query id]``."""

    dataset: Dataset
    config: dict[str, Any]
    results: dict[str, dict[str, QueryResult]]


# -- the index ------------------------------------------------------------------------------------------------


def corpus_nodes(dataset: Dataset) -> list[TextNode]:
    """The corpus as chunk nodes ``{corpus id}#{n}`` carrying ``metadata["corpus_id"]``; empty documents have none."""
    splitter = SentenceSplitter(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP)
    hidden = ["corpus_id"]
    return [
        TextNode(id_=f"{doc_id}#{n}", text=chunk, metadata={"corpus_id": doc_id},
                 excluded_embed_metadata_keys=hidden, excluded_llm_metadata_keys=hidden)  # fmt: skip
        for doc_id, text in dataset.corpus.items()
        if text.strip()
        for n, chunk in enumerate(splitter.split_text(text))
    ]


def fingerprint(dataset: Dataset, embed_model: BaseEmbedding) -> str:
    """sha256 of the corpus (ids and texts), the chunking and the embedding model's name."""
    digest = hashlib.sha256(f"{embed_model.model_name}\0{CHUNK_SIZE}\0{CHUNK_OVERLAP}\0".encode())
    for doc_id in sorted(dataset.corpus):
        digest.update(f"{doc_id}\0{dataset.corpus[doc_id]}\0".encode())
    return digest.hexdigest()


def default_store(dataset: Dataset, fp: str) -> Path:
    """Where a corpus's index lives when no store is given: a folder per corpus and fingerprint in the user data dir."""
    return pipeline.DATA_DIR / "eval" / f"{dataset.name}-{fp[:12]}"


def build_index(dataset: Dataset, location: str | Path, embed_model: BaseEmbedding, progress: bool = True) -> VectorStoreIndex:
    """The corpus index in ``location``: reused when complete, completed when interrupted, refused if foreign."""
    fp = fingerprint(dataset, embed_model)
    try:
        coll = stores.open_collection(location, COLLECTION, embed_model, create=False)
    except StoreError:  # none yet (or another embedding model's, which opening it to write below reports)
        coll = None
    if coll is not None:
        meta = coll.metadata or {}
        if meta.get("corpus_fingerprint") != fp:
            raise StoreError(
                f"{location} holds an index of another corpus or embedding model (fingerprint "
                f"{str(meta.get('corpus_fingerprint'))[:12]}, this is {fp[:12]}): give another --store or delete it"
            )
        if coll.count() == meta.get("corpus_chunks"):
            return stores.load_index(location, embed_model, collection=COLLECTION)
    nodes = corpus_nodes(dataset)
    coll = stores.open_collection(
        location, COLLECTION, embed_model, create=True, metadata={"corpus_fingerprint": fp, "corpus_chunks": len(nodes)}
    )
    done = set(coll.get(include=[])["ids"])
    todo = [node for node in nodes if node.node_id not in done]
    if done:
        logger.warning("completing the interrupted index in %s: %d of %d chunks to go", location, len(todo), len(nodes))
    batches = [todo[i : i + EMBED_BATCH] for i in range(0, len(todo), EMBED_BATCH)]
    for batch in tqdm(batches, desc=f"index {dataset.name}", unit="batch", disable=not progress):
        stores.write_nodes(coll, batch, embed_model)
    return stores.load_index(location, embed_model, collection=COLLECTION)


# -- the cache ------------------------------------------------------------------------------------------------


def prompt_texts(reranker: BaseNodePostprocessor | None) -> dict[str, str]:
    """A system's swappable prompts as text, by key (none for the first stage, nor for LLMRerank, which has none)."""
    own = getattr(reranker, "get_prompts", None)
    return {k: v.get_template() for k, v in own().items()} if own is not None else {}


def cache_key(
    system: str, llm_name: str, query: str, candidate_ids: Sequence[str], prompts: Mapping[str, str] | None = None
) -> str:
    """The result's key: the system's effective spec, the LLM, the query, the candidates, and the system's prompts
    (:func:`prompt_texts`; a changed default prompt is a new result)."""
    data = json.dumps([system, llm_name, query, list(candidate_ids), dict(prompts or {})], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()


class ResultCache:
    """Append-only JSONL of finished results by key; each ``put`` is flushed, unreadable lines are skipped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: dict[str, QueryResult] = {}
        self._file: IO[str] | None = None  # opened by the first put: reading the cache writes nothing
        names = [f.name for f in fields(QueryResult)]
        self._torn = False
        if path.exists():
            data = path.read_bytes()
            self._torn = bool(data) and not data.endswith(b"\n")
            for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
                try:
                    record = json.loads(line)
                    self.results[record["key"]] = QueryResult(**{k: record[k] for k in names})
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s:%d: unreadable cache line skipped", path, n)

    def get(self, key: str) -> QueryResult | None:
        return self.results.get(key)

    def put(self, key: str, result: QueryResult, **labels: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            if self._torn:  # a run was killed mid-line: start the next record on its own line
                self._file.write("\n")
        self.results[key] = result
        self._file.write(json.dumps({"key": key, **labels, **asdict(result)}, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# -- the run --------------------------------------------------------------------------------------------------


def rerank_query(
    reranker: BaseNodePostprocessor | None, query: str, candidates: list[NodeWithScore], counter: TokenCountingHandler | None
) -> QueryResult:
    """Rerank one query's candidates; the order is completed with dropped candidates, an exception is recorded."""
    if counter is not None:
        counter.reset_counts()
    started = time.perf_counter()
    returned: list[NodeWithScore] = []
    error = None
    if reranker is not None:
        try:
            returned = reranker.postprocess_nodes(candidates, query_str=query)
        except Exception as exc:  # noqa: BLE001 - a baseline failing on the weak model's output is a result
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("%s failed on query %r: %s", type(reranker).__name__, query[:60], error)
            returned = []
    latency = time.perf_counter() - started
    ranking, appended = completed(candidates, returned)
    return QueryResult(
        ranking=ranking,
        llm_calls=len(counter.llm_token_counts) if counter else 0,
        prompt_tokens=counter.prompt_llm_token_count if counter else 0,
        completion_tokens=counter.completion_llm_token_count if counter else 0,
        latency_s=latency,
        appended=appended if reranker is not None else 0,
        error=error,
    )


def completed(candidates: list[NodeWithScore], returned: list[NodeWithScore]) -> tuple[list[str], int]:
    """Corpus ids in the system's order, then those of the candidates it did not return; and how many those were."""
    ids = list(dict.fromkeys(n.node.node_id for n in returned))
    by_id = {n.node.node_id: n for n in candidates}
    ids = [i for i in ids if i in by_id]
    kept = set(ids)
    appended = [n.node.node_id for n in candidates if n.node.node_id not in kept]
    return doc_ranking([by_id[i].node.metadata["corpus_id"] for i in ids + appended]), len(appended)


def rerank_batch(
    reranker: LikelihoodRerank,
    query_ids: Sequence[str],
    queries: dict[str, str],
    retrieved: dict[str, tuple[list[NodeWithScore], float]],
    save: Callable[[str, QueryResult], None],
    progress: bool,
) -> None:
    """Rerank the queries concurrently within the reranker's budget, saving each result as its query finishes.

    Counts come from each rerank's own usage; latency is the query's own wall time while the others overlap it.
    """
    lock = threading.Lock()

    def done(position: int, reranked: RerankResult) -> None:
        query_id, usage = query_ids[position], reranked.usage
        ranking, appended = completed(retrieved[query_id][0], reranked.nodes)
        result = QueryResult(
            ranking, usage.llm_calls, usage.prompt_tokens, usage.completion_tokens, usage.wall_time_s, appended
        )
        with lock:  # results arrive on the batch's threads
            save(query_id, result)

    node_lists = [retrieved[query_id][0] for query_id in query_ids]
    reranker.rerank_batch([queries[q] for q in query_ids], node_lists, progress=progress, on_result=done)


def portable(path: str | Path) -> str:
    """``path`` as results record it: relative to the working directory when under it, else the folder's name
    (an absolute path would name the machine the run was made on)."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.name


@dataclass
class _Plan:
    """What ``evaluate`` and ``estimate`` share: the dataset, the queries, each system's reranker, every query's
    first-stage candidates (and the time they took), and each system's result-cache key per query."""

    dataset: Dataset
    config: dict[str, Any]
    query_ids: list[str]
    llm: LLM | None
    rerankers: dict[str, BaseNodePostprocessor | None]
    retrieved: dict[str, tuple[list[NodeWithScore], float]]
    keys: dict[str, dict[str, str]]
    cache: ResultCache

    def todo(self, spec: str) -> list[str]:
        """The queries whose result for system ``spec`` is not in the cache yet."""
        return [query_id for query_id in self.query_ids if self.cache.get(self.keys[spec][query_id]) is None]


def _plan(
    path: str | Path,
    system_specs: Sequence[str],
    *,
    top_k: int = 20,
    top_n: int = 10,
    split: str | None = None,
    queries_split: str = "all",
    limit_queries: int | None = None,
    seed: int = 0,
    exclude_queries: Collection[str] = (),
    llm_spec: str = "local",
    store: str | Path | None = None,
    cache: str | Path | None = None,
    embed_model: BaseEmbedding | None = None,
    llm: LLM | None = None,
    progress: bool = True,
    serve: bool = True,
    reranker_settings: Mapping[str, Any] | None = None,
) -> _Plan:
    """Load the dataset, index it (or reuse its index), build the systems and retrieve every query's candidates."""
    if top_k < 1 or top_n < 1:
        raise EvalError(f"--top-k and --top-n must be at least 1, got {top_k} and {top_n}")
    for spec in system_specs:
        systems.parse_spec(spec)
    dataset = load_dataset(path, split)
    query_ids = select_queries(dataset, queries_split, limit_queries, seed, exclude_queries)
    embed_model = embed_model or pipeline.default_embedding()
    fp = fingerprint(dataset, embed_model)
    location = str(store or default_store(dataset, fp))
    remote = location.startswith(("http://", "https://"))
    cache_dir = Path(cache) if cache else (pipeline.DATA_DIR / "eval-cache" if remote else Path(location) / "eval-cache")
    index = build_index(dataset, location, embed_model, progress)
    if llm is None and any(systems.needs_llm(s) for s in system_specs):
        llm = pipeline.make_llm(llm_spec, serve=serve)
    # the likelihood systems' options: a tune's settings.json (`eval --settings`), else those that go with --llm
    defaults = dict(reranker_settings) if reranker_settings is not None else pipeline.reranker_defaults(llm_spec)
    rerankers = {spec: systems.build(spec, llm, top_k, defaults) for spec in system_specs}
    llm_name = f"{llm_spec}|{llm.metadata.model_name}" if llm is not None else ""
    config = {
        "path": portable(path), "format": dataset.format, "split": dataset.split, "queries_split": queries_split,
        "limit_queries": limit_queries, "seed": seed, "excluded_queries": len(exclude_queries), "queries": len(query_ids),
        "systems": list(system_specs),
        "top_k": top_k, "top_n": top_n, "likelihood_defaults": defaults, "llm": llm_spec if llm is not None else None,
        "llm_model": llm.metadata.model_name if llm is not None else None, "embed_model": embed_model.model_name,
        "chunk_size": CHUNK_SIZE, "chunk_overlap": CHUNK_OVERLAP, "corpus_fingerprint": fp,
    }  # fmt: skip
    retriever = index.as_retriever(similarity_top_k=top_k)
    embed_model.get_query_embedding("warm up")  # load the model before the first timed retrieval
    retrieved: dict[str, tuple[list[NodeWithScore], float]] = {}
    for query_id in tqdm(query_ids, desc=f"retrieve {dataset.name}", unit="query", disable=not progress):
        started = time.perf_counter()
        candidates = retriever.retrieve(dataset.queries[query_id])
        retrieved[query_id] = (candidates, time.perf_counter() - started)
    keys: dict[str, dict[str, str]] = {}
    for spec, reranker in rerankers.items():
        system, name, prompts = systems.effective(spec, defaults), llm_name if reranker is not None else "", prompt_texts(reranker)
        keys[spec] = {
            query_id: cache_key(system, name, dataset.queries[query_id], [n.node.node_id for n in retrieved[query_id][0]], prompts)
            for query_id in query_ids
        }  # fmt: skip
    return _Plan(dataset, config, query_ids, llm, rerankers, retrieved, keys, ResultCache(cache_dir / CACHE_FILE))


def evaluate(path: str | Path, system_specs: Sequence[str], **options: Any) -> EvalRun:
    """Evaluate ``system_specs`` on the dataset at ``path``; ``llm`` overrides ``make_llm(llm_spec)``.

    Options: ``top_k`` (20), ``top_n`` (10), ``split``, ``queries_split``, ``limit_queries``, ``seed``,
    ``exclude_queries``, ``llm_spec`` ("local"), ``store``, ``cache``, ``embed_model``, ``llm``, ``progress``.
    """
    plan = _plan(path, system_specs, **options)
    queries, cached, llm = plan.dataset.queries, plan.cache, plan.llm
    progress = options.get("progress", True)
    results: dict[str, dict[str, QueryResult]] = {spec: {} for spec in system_specs}
    counter = TokenCountingHandler() if llm is not None else None
    if llm is not None:
        llm.callback_manager.add_handler(counter)
    try:
        for spec, reranker in plan.rerankers.items():
            keys, todo = plan.keys[spec], plan.todo(spec)

            def save(query_id: str, result: QueryResult) -> None:
                result.latency_s += plan.retrieved[query_id][1]
                cached.put(keys[query_id], result, system=spec, query_id=query_id)

            if isinstance(reranker, LikelihoodRerank):
                rerank_batch(reranker, todo, queries, plan.retrieved, save, progress)
            else:
                for query_id in tqdm(todo, desc=spec, unit="query", disable=not progress):
                    save(query_id, rerank_query(reranker, queries[query_id], plan.retrieved[query_id][0], counter))
            results[spec] = {query_id: cached.get(keys[query_id]) for query_id in plan.query_ids}
    finally:
        cached.close()
        if llm is not None:
            llm.callback_manager.remove_handler(counter)
    return EvalRun(plan.dataset, plan.config, results)


def estimate(
    path: str | Path, system_specs: Sequence[str], prices: Mapping[str, float] | None = None, **options: Any
) -> dict[str, tuple[int, RerankEstimate | None]]:
    """What ``evaluate`` with the same arguments would send to the LLM, without calling it (nor, for
    ``llm_spec="local"``, starting the bundled model): per system, the queries not yet in the result cache and
    ``LikelihoodRerank.estimate`` summed over them (``None`` for systems it cannot foresee: LLMRerank, RankGPT;
    a zero estimate for the first stage). The corpus is indexed and the queries retrieved, as ``evaluate`` does.
    """
    plan = _plan(path, system_specs, serve=False, **options)
    out: dict[str, tuple[int, RerankEstimate | None]] = {}
    for spec, reranker in plan.rerankers.items():
        todo = plan.todo(spec)
        total: RerankEstimate | None = RerankEstimate(cost=0.0 if prices is not None else None)
        if isinstance(reranker, LikelihoodRerank):
            for query_id in todo:
                total.add(reranker.estimate(plan.dataset.queries[query_id], plan.retrieved[query_id][0], prices))
        elif reranker is not None:
            total = None
        out[spec] = (len(todo), total)
    return out
