"""LangChain: ``LikelihoodRerankCompressor``, the reranker as a document compressor (``pip install 'llama-rerank[langchain]'``).

It only translates, like rerankers' ``integrations/langchain.py``: documents become nodes, :class:`LikelihoodRerank`
ranks them (``rerank``, or ``arerank`` for ``acompress_documents``), and the ranked nodes become copies of the input
documents carrying the scores. A LangChain chat model judges through :class:`LangChainChatLLM`, which passes its
token logprobs (``ChatOpenAI(logprobs=True)``) and token counts on, and its errors through unchanged, so the
reranker's error policy holds: a 401 raises ``LLMConfigError``, a 503 is retried and then falls back. The
``callbacks`` a compressor is given (a ``ContextualCompressionRetriever`` gives its run's) reach the chat model's
calls, so a tracer sees each LLM run, with its token usage, under the retriever's run.

    >>> from langchain_classic.retrievers import ContextualCompressionRetriever  # doctest: +SKIP
    >>> retriever = ContextualCompressionRetriever(
    ...     base_compressor=LikelihoodRerankCompressor(ChatOpenAI(model="gpt-4.1-mini", logprobs=True, top_logprobs=5), top_n=5),
    ...     base_retriever=vectorstore.as_retriever(search_kwargs={"k": 20}))
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Literal, Sequence, TypedDict

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    LogProb,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms import LLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.core.storage.kvstore.types import BaseKVStore

from llama_rerank._extras import require
from llama_rerank.adapters import sampled_first, without_retries
from llama_rerank.postprocessor import METADATA_KEYS, LikelihoodRerank, RerankResult

require("langchain_core", "langchain")

from langchain_core.callbacks import Callbacks  # noqa: E402
from langchain_core.documents import BaseDocumentCompressor, Document  # noqa: E402
from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import BaseMessage, convert_to_messages  # noqa: E402
from langchain_core.runnables import RunnableConfig  # noqa: E402

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["LangChainChatLLM", "LikelihoodRerankCompressor", "RerankOptions"]

# The callbacks of the compressor call under way: the chat model's calls run on worker threads and tasks, which
# copy the context, so they find them here.
_callbacks: ContextVar[Callbacks] = ContextVar("llama_rerank_langchain_callbacks", default=None)


@contextmanager
def _passing(callbacks: Callbacks) -> Iterator[None]:
    """Within this block, the chat model's calls get ``callbacks``."""
    token = _callbacks.set(callbacks)
    try:
        yield
    finally:
        _callbacks.reset(token)


def _config() -> RunnableConfig | None:
    """The config for a chat model call: the compressor's callbacks, if it was given any (else LangChain's own
    context applies, as for any runnable)."""
    callbacks = _callbacks.get()
    return None if callbacks is None else {"callbacks": callbacks}


class LangChainChatLLM(CustomLLM):
    """A LangChain chat model as the LlamaIndex LLM the reranker calls (``invoke``/``ainvoke``).

    The reply's token logprobs (``response_metadata["logprobs"]["content"]``, OpenAI's shape, as ``ChatOpenAI``
    returns them with ``logprobs=True``) become LlamaIndex ``LogProb`` lists and its ``usage_metadata`` the token
    counts. Errors are not caught or wrapped. The context window is the chat model's ``profile["max_input_tokens"]``
    when LangChain knows it (set ``profile={"max_input_tokens": ...}`` on the chat model otherwise), else 3900.

    ChatOpenAI and its relatives (``AzureChatOpenAI``, any model built on ``BaseChatOpenAI``) retry inside their
    openai client; the adapter calls a copy whose clients do not, so the reranker's retries are the only ones and
    the user's chat model keeps its own setting. Other chat models keep their retries: set theirs to 0.
    """

    _chat: BaseChatModel = PrivateAttr()

    def __init__(self, chat: BaseChatModel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._chat = _without_client_retries(chat)

    @classmethod
    def class_name(cls) -> str:
        return "LangChainChatLLM"

    @property
    def chat_model(self) -> BaseChatModel:
        """The chat model this adapter calls (a copy of the user's whose client retries are off, where it has any)."""
        return self._chat

    @property
    def logprobs(self) -> bool:
        """Whether the chat model asks for logprobs (the reranker warns once if it asks and none come back)."""
        return bool(getattr(self._chat, "logprobs", False))

    @property
    def api_base(self) -> str | None:
        """The chat model's server (``ChatOpenAI``'s ``base_url``), where it has one: error messages name it."""
        return getattr(self._chat, "openai_api_base", None)

    @property
    def metadata(self) -> LLMMetadata:
        chat = self._chat
        profile = getattr(chat, "profile", None) or {}
        name = getattr(chat, "model_name", None) or getattr(chat, "model", None) or type(chat).__name__
        return LLMMetadata(
            context_window=profile.get("max_input_tokens") or DEFAULT_CONTEXT_WINDOW,
            is_chat_model=True,
            model_name=str(name),
        )

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return ChatResponse(**_reply(self._chat.invoke(_to_langchain(messages), _config(), **kwargs), chat=True))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return ChatResponse(**_reply(await self._chat.ainvoke(_to_langchain(messages), _config(), **kwargs), chat=True))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(**_reply(self._chat.invoke(prompt, _config(), **kwargs), chat=False))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(**_reply(await self._chat.ainvoke(prompt, _config(), **kwargs), chat=False))

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        raise NotImplementedError("LangChainChatLLM serves the reranker, which never streams; call the chat model itself")


def _without_client_retries(chat: BaseChatModel) -> BaseChatModel:
    """A copy of an openai-client chat model (``BaseChatOpenAI``: its root clients and their chat completions) whose
    clients do not retry (:func:`~llama_rerank.adapters.without_retries`); others as they are."""
    update: dict[str, Any] = {}
    for root, chat_completions in (("root_client", "client"), ("root_async_client", "async_client")):
        client = getattr(chat, root, None)
        quiet = without_retries(client)
        if quiet is not client:
            update[root], update[chat_completions] = quiet, quiet.chat.completions
    return chat.model_copy(update={"max_retries": 0, **update}) if update else chat


def _to_langchain(messages: Sequence[ChatMessage]) -> List[BaseMessage]:
    return convert_to_messages([{"role": m.role.value, "content": m.content or ""} for m in messages])


def _reply(message: BaseMessage, chat: bool) -> dict[str, Any]:
    """The fields of a LlamaIndex ``ChatResponse`` (``chat``) or ``CompletionResponse`` for a LangChain reply."""
    metadata = message.response_metadata or {}
    usage = getattr(message, "usage_metadata", None) or {}
    counts = {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")}
    text = message.text
    body = {"message": ChatMessage(role=MessageRole.ASSISTANT, content=text)} if chat else {"text": text}
    return {**body, "logprobs": _logprobs(metadata.get("logprobs")), "raw": metadata,
            "additional_kwargs": {k: v for k, v in counts.items() if v is not None}}  # fmt: skip


def _logprobs(logprobs: Any) -> List[List[LogProb]] | None:
    """OpenAI's ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`` (``ChatOpenAI`` keeps it as dicts) as
    LlamaIndex ``LogProb`` lists, the sampled token first (:func:`~llama_rerank.adapters.sampled_first`). ``None``
    for anything else."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not content or not all(isinstance(entry, dict) and "token" in entry and "logprob" in entry for entry in content):
        return None
    return sampled_first(content)


class RerankOptions(TypedDict, total=False):
    """The :class:`~llama_rerank.LikelihoodRerank` options a compressor takes: every one but ``llm`` (see the
    reranker's fields for what each does). Written out, not built from ``LikelihoodRerank.model_fields``: type
    checkers and editors see only a TypedDict declared in the source; tests/test_langchain.py keeps the names in
    step."""

    rerank_prompt: BasePromptTemplate
    top_n: int
    window_size: int
    label_scale: Dict[str, float]
    scoring: Literal["auto", "label", "logprobs"]
    max_concurrency: int
    max_passage_tokens: int
    followup_calls: int
    max_retries: int
    timeout: float | None
    deadline: float | None
    on_error: Literal["fallback", "raise"]
    min_score: float | None
    min_label: str | None
    retrieval_weight: float
    retrieval_signal: Literal["rank", "score"]
    normalize: bool
    reverse_pass: bool
    structured_output: bool
    cache: str | os.PathLike[str] | BaseKVStore | None
    tokenizer: Callable[[str], Sequence[Any]] | None


class LikelihoodRerankCompressor(BaseDocumentCompressor):
    """Listwise LLM reranking for LangChain: put it in a ``ContextualCompressionRetriever``.

    ``llm`` is a LangChain chat model (``BaseChatModel``) or a LlamaIndex ``LLM``; every other keyword is a
    :class:`~llama_rerank.LikelihoodRerank` option (typed by :class:`RerankOptions`: ``top_n``, ``window_size``,
    ``label_scale``, ``scoring``, ``min_score``/``min_label``, ``retrieval_weight``/``retrieval_signal``/``normalize``,
    ``cache``, ``max_concurrency``, ``on_error``, ...), checked the same way, at construction and when set on
    ``compressor.reranker`` (``compressor.top_n`` is a shortcut). The ``callbacks`` LangChain passes reach the chat
    model's calls. Returned documents are copies, best first, whose metadata adds
    ``relevance_score`` (the final score), ``rerank_label``, ``rerank_score`` (the LLM's own score),
    ``retrieval_rank`` (1-based input position) and ``retrieval_score``; the input documents are not changed.
    As in LlamaIndex nothing is lost: a failed or unreadable LLM answer leaves documents in retrieval order.
    """

    reranker: LikelihoodRerank = Field(description="The LlamaIndex reranker doing the work.")
    retrieval_score_key: str | None = Field(
        default=None, description="Metadata key holding each document's first-stage score, for "
        "retrieval_signal='score'; None: LangChain documents carry no score, and fusion uses the rank.",
    )  # fmt: skip

    def __init__(self, llm: Any, *, retrieval_score_key: str | None = None, **options: Unpack[RerankOptions]) -> None:
        if isinstance(llm, BaseChatModel):
            if options.get("structured_output"):
                raise ValueError(
                    "structured_output=True needs a LlamaIndex OpenAI-compatible LLM (OpenAI, OpenAILike); a LangChain "
                    "chat model answers in text, which the reranker reads (logprob scoring works with it)"
                )
            llm = LangChainChatLLM(llm)
        elif not isinstance(llm, LLM):
            raise TypeError(
                f"llm must be a LangChain chat model (BaseChatModel, e.g. ChatOpenAI) or a LlamaIndex LLM, got "
                f"{type(llm).__name__}; for logprobs pass the model itself, e.g. ChatOpenAI(logprobs=True, top_logprobs=5), "
                "not a runnable made with .bind()"
            )
        super().__init__(reranker=LikelihoodRerank(llm=llm, **options), retrieval_score_key=retrieval_score_key)

    @property
    def top_n(self) -> int:
        """How many documents come back, best first (the reranker's ``top_n``; settable, and checked)."""
        return self.reranker.top_n

    @top_n.setter
    def top_n(self, value: int) -> None:
        self.reranker.top_n = value

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Rerank ``documents`` for ``query``: at most ``top_n`` copies, best first, with the scores in metadata."""
        with _passing(callbacks):
            result = self.reranker.rerank(query, self._nodes(documents))
        return self._documents(documents, result)

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents`: the LLM calls are awaited concurrently (``max_concurrency``)."""
        with _passing(callbacks):
            result = await self.reranker.arerank(query, self._nodes(documents))
        return self._documents(documents, result)

    def _nodes(self, documents: Sequence[Document]) -> List[NodeWithScore]:
        """One node per document, identified by its position (so equal ids or texts are each kept); the LLM
        reads ``page_content`` alone."""
        return [NodeWithScore(node=TextNode(text=doc.page_content, id_=str(i)), score=self._score(doc, i))
                for i, doc in enumerate(documents)]  # fmt: skip

    def _score(self, doc: Document, position: int) -> float | None:
        if self.retrieval_score_key is None or doc.metadata.get(self.retrieval_score_key) is None:
            return None
        value = doc.metadata[self.retrieval_score_key]
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"document {position}: metadata[{self.retrieval_score_key!r}] = {value!r} is not a number; "
                "retrieval_score_key must name a numeric first-stage score"
            ) from None

    @staticmethod
    def _documents(documents: Sequence[Document], result: RerankResult) -> List[Document]:
        out = []
        for ranked in result.nodes:
            source = documents[int(ranked.node.node_id)]
            scores = {key: ranked.node.metadata[key] for key in METADATA_KEYS}
            out.append(source.model_copy(update={"metadata": {**source.metadata, "relevance_score": ranked.score, **scores}}))
        return out
