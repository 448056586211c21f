"""``LikelihoodRerank``: the LlamaIndex node postprocessor users put in ``node_postprocessors=[...]``.

The LlamaIndex face only: the Fields and their validation, the prompt mixin, the rerank events and callback, and
``_postprocess_nodes``/``_apostprocess_nodes``. A rerank's nodes are prepared and turned back into scored copies by
:class:`~llama_rerank.nodes.Run`, and judged by a :class:`~llama_rerank.judge.Judge` built from the Fields. What an
instance builds from its Fields (token counter, LLM adapter, call limit, cache store) is kept by one mechanism,
``_Derived``, and can be read through :attr:`LikelihoodRerank.resources`.
"""

from __future__ import annotations

import difflib
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Sequence, Tuple, TypeVar

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    SerializeAsAny,
    field_serializer,
    field_validator,
    model_validator,
)
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.llms import LLM
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.prompts import BasePromptTemplate, ChatPromptTemplate, PromptTemplate
from llama_index.core.prompts.mixin import PromptDictType, PromptMixin, PromptMixinType
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.storage.kvstore.types import BaseKVStore
from llama_index.core.settings import Settings

from llama_rerank.batch import OnResult, arun_batch, check_batch, run_batch
from llama_rerank.adapters import Adapter, adapter_for
from llama_rerank.budget import Encode, resolve_encoder
from llama_rerank.cache import JudgementCache, cache_scope, check_spec
from llama_rerank.concurrency import CallLimit
from llama_rerank.judge import Judge
from llama_rerank.labels import DEFAULT_SCALE, LabelScale, normalise_label
from llama_rerank.llm import LLMCaller
from llama_rerank.nodes import METADATA_KEYS, Ranking, Run
from llama_rerank.prompts import DEFAULT_RERANK_PROMPT
from llama_rerank.types import RerankEstimate, RerankUsage

dispatcher = get_dispatcher(__name__)

PROMPT_KEY = "rerank_prompt"
__all__ = ["METADATA_KEYS", "LikelihoodRerank", "RerankResult", "Resources"]  # METADATA_KEYS: the keys output nodes carry


@dataclass
class RerankResult:
    """The reranked nodes (best first, at most ``top_n``) and what producing them cost."""

    nodes: List[NodeWithScore]
    usage: RerankUsage


class LikelihoodRerank(PromptMixin, BaseNodePostprocessor):
    """Listwise LLM reranker: the LLM labels each candidate ``unlikely`` / ``likely`` / ``very likely``.

    Several candidates go in each LLM call (``window_size``); windows run concurrently. Scores come from the
    label's value, or from the label probabilities when the LLM returns logprobs. A candidate is never dropped
    because of the LLM: unreadable answers and failed calls leave it in retrieval order with a neutral score.
    Options set after construction are checked as at construction. ``to_dict()`` saves the options but not the LLM:
    ``LikelihoodRerank.from_dict(data, llm=llm)``.

    >>> engine = index.as_query_engine(similarity_top_k=20,
    ...                                node_postprocessors=[LikelihoodRerank(llm=llm, top_n=5)])  # doctest: +SKIP
    """

    llm: LLM | None = Field(
        default=None, description="The LLM that judges the candidates; None: Settings.llm, looked up when first used."
    )
    rerank_prompt: SerializeAsAny[BasePromptTemplate] = Field(
        default_factory=lambda: DEFAULT_RERANK_PROMPT,
        description="The listwise prompt; variables {query}, {num}, {labels}, {passages} (see llama_rerank.prompts).",
    )
    top_n: int = Field(default=5, ge=1, description="How many nodes to return, best first.")
    window_size: int = Field(default=10, ge=1, description="Most candidates per LLM call (fewer when the context window is full).")
    label_scale: Dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_SCALE),
        description="Label -> score in [0, 1]; at least two distinct labels. Default unlikely=0, likely=0.5, very likely=1.",
    )
    scoring: Literal["auto", "label", "logprobs"] = Field(
        default="auto",
        description="'logprobs': expected score under the label probabilities; 'label': the label's value; "
        "'auto': logprobs when the reply carries them and they align with its text, else the label.",
    )
    max_concurrency: int = Field(
        default=4, ge=1, description="Most LLM calls in flight at once, shared by every concurrent rerank on this instance."
    )
    max_passage_tokens: int = Field(default=256, ge=16, description="Each passage is cut to this many tokens, with a marker.")
    followup_calls: int = Field(default=1, ge=0, description="Extra calls, each for just the candidates an answer left unlabelled.")
    max_retries: int = Field(default=2, ge=0, description="Retries (with backoff) of a failed or timed-out LLM call.")
    timeout: float | None = Field(default=120.0, gt=0, description="Seconds one LLM call may take; None waits forever.")
    deadline: float | None = Field(
        default=None, gt=0, description="Seconds one whole rerank may take: then the windows still running are "
        "cancelled and their candidates keep retrieval order, as after a failed call (RerankLLMError with "
        "on_error='raise'). None: bounded only by timeout, retries and max_concurrency (docs/RELIABILITY.md).",
    )  # fmt: skip
    on_error: Literal["fallback", "raise"] = Field(
        default="fallback",
        description="After the retries: 'fallback' keeps that window in retrieval order (warning logged); 'raise' raises RerankLLMError.",
    )
    min_score: float | None = Field(default=None, ge=0, le=1, description="Opt-in cutoff: drop judged candidates scoring below this.")
    min_label: str | None = Field(default=None, description="Opt-in cutoff by label: drop judged candidates scoring below its value.")
    retrieval_weight: float = Field(
        default=0.0, ge=0, le=1,
        description="Score fusion: final = (1 - w) * LLM score + w * retrieval signal, so a weak LLM refines the "
        "first-stage order instead of replacing it. 0 = LLM score alone.",
    )  # fmt: skip
    retrieval_signal: Literal["rank", "score"] = Field(
        default="rank", description="What fusion mixes in: 'rank' (1 for the first candidate .. 0 for the last) or "
        "'score' (retrieval scores min-max normalised over the candidates).",
    )  # fmt: skip
    normalize: bool = Field(
        default=False, description="Min-max normalise the LLM scores over each query's candidates before fusion, so "
        "retrieval_weight means the same whatever range a weak LLM's scores span.",
    )  # fmt: skip
    reverse_pass: bool = Field(
        default=False, description="Judge every window a second time with its passages in reverse order and average "
        "the two scores, cancelling the LLM's bias for or against a position in the prompt. Twice the LLM calls. "
        "Measured on the bundled local model, it did not help (docs/EVALUATION.md); off by default.",
    )  # fmt: skip
    structured_output: bool = Field(
        default=False, description="Ask for a JSON answer constrained by a schema (one label per passage id, an enum "
        "of the scale's labels) through response_format; OpenAI-compatible LLM classes only (OpenAI, OpenAILike, "
        "AzureOpenAI: vLLM, llama.cpp, Ollama and OpenAI itself constrain decoding to it). Logprob scoring still works.",
    )  # fmt: skip
    cache: Any | None = Field(
        default=None, description="Judgement cache: None; 'memory' (an LRU of 10,000 windows); a file path (an SQLite "
        "file, shared by threads and processes); or a LlamaIndex BaseKVStore (e.g. Redis, shared by every replica). "
        "A window judged before makes no LLM call; see llama_rerank.cache.",
    )  # fmt: skip
    tokenizer: Callable[[str], Sequence[Any]] | None = Field(
        default=None, exclude=True, description="Token counter for budgets; default: the LLM's own if exposed, else cl100k."
    )

    model_config = ConfigDict(validate_assignment=True)  # reranker.top_n = 0 fails there, as at construction

    _derived: "_Derived" = PrivateAttr(default_factory=lambda: _Derived())
    _last_usage: RerankUsage | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_options(cls, data: Any) -> Any:
        """A misspelt option is an error naming the closest one, not a silent default (as in LlamaIndex's LLMRerank)."""
        if isinstance(data, dict):
            for name in data:
                if name not in cls.model_fields and name != "class_name":
                    close = difflib.get_close_matches(name, list(cls.model_fields), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; options: {', '.join(cls.model_fields)}"
                    raise TypeError(f"LikelihoodRerank: unknown option {name!r}{hint}")
        return data

    @field_validator("rerank_prompt", mode="before")
    @classmethod
    def _prompt_from_dict(cls, value: Any) -> Any:
        """Rebuild a prompt that ``to_dict()`` wrote (a PromptTemplate or a ChatPromptTemplate) for ``from_dict``."""
        if not isinstance(value, dict):
            return value
        options = {"metadata": dict(value.get("metadata") or {}), "template_var_mappings": value.get("template_var_mappings"),
                   **(value.get("kwargs") or {})}  # fmt: skip
        options["prompt_type"] = options["metadata"].get("prompt_type", "custom")
        if "message_templates" in value:
            return ChatPromptTemplate([ChatMessage.model_validate(m) for m in value["message_templates"]], **options)
        if "template" in value:
            return PromptTemplate(value["template"], **options)
        raise ValueError("rerank_prompt: a dict must be a dumped PromptTemplate ('template') or ChatPromptTemplate ('message_templates')")

    @field_validator("llm", mode="before")
    @classmethod
    def _llm_not_from_a_dump(cls, value: Any) -> Any:
        """``to_dict()`` writes an LLM's settings, not the LLM: ``from_dict`` needs it passed back."""
        if isinstance(value, dict):
            raise ValueError(
                f"got the settings of an LLM ({value.get('class_name', '?')}) written by to_dict(), which cannot "
                "be rebuilt into an LLM (its key and clients are not saved); pass the LLM back: "
                "LikelihoodRerank.from_dict(data, llm=my_llm)"
            )
        return value

    @field_validator("label_scale")
    @classmethod
    def _check_scale(cls, value: Dict[str, float], info: ValidationInfo) -> Dict[str, float]:
        """A scale that cannot work fails at construction or assignment; so does a new one without ``min_label``."""
        scale = _scale(tuple(value.items()))
        min_label = info.data.get("min_label")  # set only when assigning: at construction min_label comes later
        if min_label is not None and normalise_label(min_label) not in scale.labels:
            raise ValueError(
                f"min_label {min_label!r} is not on the new label scale {list(scale.labels)}: set min_label=None "
                "first, then label_scale, then a min_label of the new scale"
            )
        return value

    @field_validator("min_label")
    @classmethod
    def _check_min_label(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and "label_scale" in info.data:  # absent when label_scale itself failed
            _floor(_scale(tuple(info.data["label_scale"].items())), value)
        return value

    @field_validator("cache")
    @classmethod
    def _check_cache(cls, value: Any) -> Any:
        return check_spec(value)

    @field_serializer("cache")
    def _dump_cache(self, value: Any) -> str | None:
        """'memory' and paths go into ``to_dict()``; a KV store object cannot, so it is dumped as None."""
        return None if value is None or isinstance(value, BaseKVStore) else str(value)

    def __copy__(self) -> "LikelihoodRerank":
        """A shallow copy (``model_copy()``) builds its own limit and store too, as a deep copy does."""
        twin = super().__copy__()
        twin._derived = _Derived()
        return twin

    @classmethod
    def class_name(cls) -> str:
        return "LikelihoodRerank"

    def __repr__(self) -> str:
        llm = "Settings.llm" if self.llm is None else f"{type(self.llm).__name__}({self.llm.metadata.model_name!r})"
        return (
            f"LikelihoodRerank(llm={llm}, top_n={self.top_n}, "
            f"window_size={self.window_size}, scale=[{self.scale}], scoring={self.scoring!r}, "
            f"max_concurrency={self.max_concurrency}, on_error={self.on_error!r})"
        )

    @property
    def scale(self) -> LabelScale:
        """The validated label scale, worst label first (derived from ``label_scale`` each time, cached)."""
        return _scale(tuple(self.label_scale.items()))

    @property
    def _llm(self) -> LLM:
        """The judging LLM: ``llm``, or ``Settings.llm`` when that is None (resolved here, on use)."""
        return self.llm if self.llm is not None else Settings.llm

    @property
    def resources(self) -> "Resources":
        """What this instance builds from its fields (token counter, LLM adapter, call limit, cache store), for
        inspection and tests; each part is built when first read."""
        return Resources(self)

    @property
    def last_usage(self) -> RerankUsage | None:
        """Usage of the most recently finished rerank on this instance (use :meth:`rerank` for per-call usage)."""
        return self._last_usage

    def _get_prompts(self) -> PromptDictType:
        return {PROMPT_KEY: self.rerank_prompt}

    def _get_prompt_modules(self) -> PromptMixinType:
        return {}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        if PROMPT_KEY in prompts:
            self.rerank_prompt = prompts[PROMPT_KEY]

    # -- the work -----------------------------------------------------------------------------------------------

    @dispatcher.span
    def rerank(self, query: str | QueryBundle, nodes: Sequence[NodeWithScore]) -> RerankResult:
        """Rerank ``nodes`` for ``query``; returns the nodes and this call's usage."""
        with self._run(query, nodes) as (run, judge):
            if run.windows:
                run.judgements.update(judge.judge(run.query, run.windows, run.usage))
        return RerankResult(run.output, run.usage)

    @dispatcher.span
    async def arerank(self, query: str | QueryBundle, nodes: Sequence[NodeWithScore]) -> RerankResult:
        """Async :meth:`rerank`: LLM calls are awaited concurrently, at most ``max_concurrency`` at once."""
        with self._run(query, nodes) as (run, judge):
            if run.windows:
                run.judgements.update(await judge.ajudge(run.query, run.windows, run.usage))
        return RerankResult(run.output, run.usage)

    @dispatcher.span
    def rerank_batch(
        self, queries: Sequence[str | QueryBundle], node_lists: Sequence[Sequence[NodeWithScore]],
        progress: bool | None = None, on_result: OnResult | None = None,
    ) -> List[RerankResult]:  # fmt: skip
        """One :class:`RerankResult` per query, in order; queries run concurrently within ``max_concurrency``.

        ``progress``: a progress bar on stderr; None shows one for batches of 5 queries or more. ``on_result``:
        called with (position, result) as each query finishes, on the calling thread. An exception a rerank
        raises (``LLMConfigError``; ``RerankLLMError`` with ``on_error="raise"``) or Ctrl-C stops the batch and propagates.
        """
        check_batch(queries, node_lists, _require_query)
        return run_batch(self.arerank, queries, node_lists, progress, on_result)

    @dispatcher.span
    async def arerank_batch(
        self, queries: Sequence[str | QueryBundle], node_lists: Sequence[Sequence[NodeWithScore]],
        progress: bool | None = None, on_result: OnResult | None = None,
    ) -> List[RerankResult]:  # fmt: skip
        """Async :meth:`rerank_batch` (``on_result`` runs in the event loop)."""
        check_batch(queries, node_lists, _require_query)
        return await arun_batch(self.arerank, queries, node_lists, progress, on_result)

    def estimate(
        self, query: str | QueryBundle, nodes: Sequence[NodeWithScore], prices: Mapping[str, float] | None = None
    ) -> RerankEstimate:
        """Windows, LLM calls and prompt/answer tokens :meth:`rerank` would use on these nodes, without calling the
        LLM; with ``prices`` (``{"prompt": ..., "completion": ...}`` per million tokens), the cost as well.

        Follow-up calls, retries and a reasoning model's hidden thinking tokens are not foreseen; windows already in
        the judgement cache cost nothing.
        """
        if prices is not None and (set(prices) != {"prompt", "completion"} or min(prices.values()) < 0):
            raise ValueError(
                f"prices: give {{'prompt': ..., 'completion': ...}} per million tokens, both >= 0; got {prices!r}"
            )
        judge = self._judge()
        run = self._prepare(_require_query(query), nodes, judge)
        estimate = judge.estimate(run.query, run.windows, self.structured_output)
        if prices is not None:
            tokens = estimate.prompt_tokens * prices["prompt"] + estimate.completion_tokens * prices["completion"]
            estimate.cost = tokens / 1e6
        return estimate

    def _postprocess_nodes(self, nodes: List[NodeWithScore], query_bundle: QueryBundle | None = None) -> List[NodeWithScore]:
        return self.rerank(_require_query(query_bundle), nodes).nodes

    async def _apostprocess_nodes(
        self, nodes: List[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> List[NodeWithScore]:
        return (await self.arerank(_require_query(query_bundle), nodes)).nodes

    @contextmanager
    def _run(self, query: str | QueryBundle, nodes: Sequence[NodeWithScore]) -> Iterator[Tuple[Run, Judge]]:
        """Prepare a run, emit the rerank events and callback around its judging, and finish it."""
        judge = self._judge()
        run = self._prepare(_require_query(query), nodes, judge)
        model = self._llm.metadata.model_name
        dispatcher.event(ReRankStartEvent(query=run.query, nodes=run.nodes, top_n=self.top_n, model_name=model))
        payload = {EventPayload.NODES: run.nodes, EventPayload.MODEL_NAME: model,
                   EventPayload.QUERY_STR: run.query, EventPayload.TOP_K: self.top_n}  # fmt: skip
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            yield run, judge
            run.finish(self._ranking())
            self._last_usage = run.usage
            event.on_end(payload={EventPayload.NODES: run.output})
        dispatcher.event(ReRankEndEvent(nodes=run.output))

    def _prepare(self, query: str, nodes: Sequence[NodeWithScore], judge: Judge) -> Run:
        """The run's candidates and windows, packed to what the judge's prompt leaves of the context window."""
        window_size, context_window = self.window_size, self._llm.metadata.context_window
        return Run(query, nodes, judge.encode, self.max_passage_tokens, window_size,
                   lambda: judge.passage_budget(query, window_size, context_window))  # fmt: skip

    def _judge(self) -> Judge:
        llm, resources = self._llm, self.resources
        adapter, encode = resources.adapter, resources.encode
        return Judge(
            caller=LLMCaller(adapter, encode, self.max_retries, self.timeout),
            template=self.rerank_prompt,
            is_chat=llm.metadata.is_chat_model,
            scale=self.scale,
            scoring=self.scoring,
            followups=self.followup_calls,
            on_error=self.on_error,
            limit=resources.limit,
            encode=encode,
            reverse_pass=self.reverse_pass,
            deadline=self.deadline,
            cache=resources.cache,
            cache_scope=cache_scope(adapter, self.scale, self.scoring, self.max_passage_tokens, self.followup_calls),
        )

    def _ranking(self) -> Ranking:
        return Ranking(self.top_n, self._cutoff(), self.retrieval_weight, self.retrieval_signal, self.normalize,
                       textless_score=self.scale.values[0])  # fmt: skip

    def _cutoff(self) -> float | None:
        """The score below which judged candidates are dropped (a subclass hook: ``CalibratedRerank`` cuts later)."""
        floors = [v for v in (self.min_score, _floor(self.scale, self.min_label)) if v is not None]
        return max(floors) if floors else None

    @classmethod
    def from_settings(cls, path: str, llm: LLM | None = None, **overrides: Any) -> "LikelihoodRerank":
        """The reranker a ``settings.json`` written by ``llama-rerank tune`` describes (``overrides`` win); with a
        calibration in it, scores are probabilities and ``min_score`` is one (:mod:`llama_rerank.tune.calibration`)."""
        from llama_rerank.tune.settings import load

        return load(path, llm, **overrides)


Built = TypeVar("Built")


class Resources:
    """What a reranker builds from its fields, read when first used (not configuration): each part is built once
    (:class:`_Derived`) and built anew when a field it comes from changes."""

    def __init__(self, reranker: LikelihoodRerank) -> None:
        self._reranker = reranker

    @property
    def encode(self) -> Encode:
        """The token counter budgets use: ``tokenizer``, else the LLM's own, else cl100k; it never raises."""
        llm, tokenizer = self._reranker._llm, self._reranker.tokenizer
        return self._reranker._derived.get("encode", (llm, tokenizer), lambda: resolve_encoder(llm, tokenizer))

    @property
    def adapter(self) -> Adapter:
        """How the LLM is called, and what it was seen to accept and adapted (kept until ``llm`` or
        ``structured_output`` changes)."""
        llm, structured = self._reranker._llm, self._reranker.structured_output
        return self._reranker._derived.get("adapter", (llm, structured), lambda: adapter_for(llm, structured))

    @property
    def limit(self) -> CallLimit:
        """The one limit on LLM calls in flight every rerank on this instance shares; a new one when
        ``max_concurrency`` changes (calls already holding a slot of the old one finish under it)."""
        size = self._reranker.max_concurrency
        return self._reranker._derived.get("limit", (size,), lambda: CallLimit(size))

    @property
    def cache(self) -> JudgementCache | None:
        """The judgement store ``cache`` names, opened once (again when ``cache`` is set to something else)."""
        spec = self._reranker.cache
        return None if spec is None else self._reranker._derived.get("cache", (spec,), lambda: JudgementCache(spec))


class _Derived:
    """What a reranker builds from its fields when first used (token counter, LLM adapter, call limit, cache
    store): each built once, under a lock, since the first reranks may start together on several threads and
    loops, and built anew when the fields it came from change. Copies and unpickled rerankers start empty and
    build their own (locks, clients and connections are not copied)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._built: Dict[str, Tuple[Tuple[Any, ...], Any]] = {}

    def get(self, name: str, inputs: Tuple[Any, ...], build: Callable[[], Built]) -> Built:
        """The object ``name`` built from ``inputs`` (objects compared by identity, numbers by value)."""
        with self._lock:
            held = self._built.get(name)
            if held is None or not all(a is b or (type(a) is int and a == b) for a, b in zip(held[0], inputs)):
                held = self._built[name] = (inputs, build())
            return held[1]

    def __reduce__(self) -> Tuple[type, Tuple[()]]:
        return type(self), ()


@lru_cache(maxsize=32)
def _scale(items: Tuple[Tuple[str, float], ...]) -> LabelScale:
    return LabelScale.from_mapping(dict(items))


def _floor(scale: LabelScale, min_label: str | None) -> float | None:
    """The score of ``min_label`` on ``scale`` (None for no cutoff); an error if the scale has no such label."""
    if min_label is None:
        return None
    if normalise_label(min_label) not in scale.labels:
        raise ValueError(f"min_label {min_label!r} is not on the label scale {list(scale.labels)}: use one of its labels, or None")
    return scale.score(min_label)


def _require_query(query: str | QueryBundle | None) -> str:
    text = query.query_str if isinstance(query, QueryBundle) else query
    if not text or not text.strip():
        raise ValueError("LikelihoodRerank needs a query: pass query_str=... or a QueryBundle with a non-empty query_str")
    return text


