"""The LangChain document compressor: a scripted LangChain chat model and a scripted LlamaIndex LLM (sync and
async), LangChain's real ChatOpenAI against the stub OpenAI-compatible server (logprobs, provider profiles, the
error policy), and, marked slow, a ContextualCompressionRetriever over langchain-chroma with the bundled
embeddings judged by ChatOpenAI pointed at the bundled llama.cpp server."""

from __future__ import annotations

import asyncio
import copy
import logging
import sys
from typing import Any, List

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.retrievers import BaseRetriever
from langchain_openai import ChatOpenAI

from fakes import ScriptedLLM, label_by_keyword
from llama_rerank import LikelihoodRerank, LLMConfigError
from llama_rerank._extras import MissingExtraError
from llama_rerank.langchain import LangChainChatLLM, LikelihoodRerankCompressor, RerankOptions
from openai_stub import ERRORS, PROFILES, StubServer

QUERY = "espresso extraction time"
TEXTS = ["The weather in Lisbon is mild.", "Espresso needs about 25 seconds.", "Oat milk foams well.",
         "Grind finer when espresso runs fast.", "Descale the boiler monthly.", "Tamp evenly."]  # fmt: skip
RELEVANT = {TEXTS[1], TEXTS[3]}  # the stub's judge and KEYWORDS: a passage sharing "espresso" with the query
KEYWORDS = {"Espresso": "very likely", "espresso": "very likely", "milk": "likely"}
MODES = ["sync", "async"]


class KeywordChatModel(BaseChatModel):
    """A LangChain chat model that labels each passage of the prompt by keyword (tests/fakes.label_by_keyword)."""

    calls: List[str] = []
    paths: List[str] = []  # "sync" or "async": which of LangChain's paths each call took

    @property
    def _llm_type(self) -> str:
        return "keyword"

    def _answer(self, messages: List[BaseMessage], path: str) -> ChatResult:
        prompt = "\n".join(m.text for m in messages)
        self.calls.append(prompt)
        self.paths.append(path)
        reply = label_by_keyword(KEYWORDS)(prompt, len(self.calls))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=reply))])

    def _generate(self, messages: List[BaseMessage], stop: List[str] | None = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:  # fmt: skip
        return self._answer(messages, "sync")

    async def _agenerate(self, messages: List[BaseMessage], stop: List[str] | None = None, run_manager: Any = None,
                         **kwargs: Any) -> ChatResult:  # fmt: skip
        return self._answer(messages, "async")


class MeteredChatModel(KeywordChatModel):
    """The keyword model reporting token usage as a provider does (one token per character, to be easy to check)."""

    def _answer(self, messages: List[BaseMessage], path: str) -> ChatResult:
        prompt, reply = "\n".join(m.text for m in messages), super()._answer(messages, path).generations[0].message.text
        usage = {"input_tokens": len(prompt), "output_tokens": len(reply), "total_tokens": len(prompt) + len(reply)}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=reply, usage_metadata=usage))])


def documents() -> list[Document]:
    return [Document(page_content=t, metadata={"source": f"doc{i}"}, id=f"d{i}") for i, t in enumerate(TEXTS)]


class FixedRetriever(BaseRetriever):
    def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
        return documents()


async def compress(compressor, docs, mode, query=QUERY):
    if mode == "sync":
        return compressor.compress_documents(docs, query)
    return await compressor.acompress_documents(docs, query)


def chat_openai(stub, **options):
    settings = {"model": stub.profile.model, "base_url": stub.url, "api_key": "k", "logprobs": True,
                "top_logprobs": 5, "temperature": 0}  # fmt: skip
    return ChatOpenAI(**{**settings, **options})


def top(docs, n=2):
    return {d.page_content for d in docs[:n]}


# -- the compressor with scripted models ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_ranks_and_carries_the_scores_in_copies(mode):
    chat = KeywordChatModel()
    docs = documents()
    before = copy.deepcopy(docs)
    out = await compress(LikelihoodRerankCompressor(chat, top_n=4, window_size=3), docs, mode)
    assert len(out) == 4 and top(out) == RELEVANT and len(chat.calls) == 2, "two windows of three"
    assert chat.paths == [mode, mode], "acompress_documents awaits the chat model (no thread fallback)"
    assert out[2].page_content == TEXTS[2] and out[2].metadata["rerank_label"] == "likely"
    first = out[0]
    assert first.id == "d1" and first.metadata["source"] == "doc1", "the document's own id and metadata are kept"
    assert first.metadata["retrieval_rank"] == 2
    assert first.metadata["rerank_label"] == "very likely" and first.metadata["rerank_score"] == 1.0
    scores = [d.metadata["relevance_score"] for d in out]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 and scores[-1] == 0.0
    assert docs == before and all(o is not d for o in out for d in docs), "the inputs are never changed"


@pytest.mark.parametrize("mode", MODES)
async def test_a_llamaindex_llm_judges_as_well(mode):
    llm = ScriptedLLM(label_by_keyword(KEYWORDS))
    out = await compress(LikelihoodRerankCompressor(llm, top_n=2), documents(), mode)
    assert top(out) == RELEVANT and len(llm.prompts) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_an_empty_list_returns_empty_without_an_llm_call(mode):
    chat = KeywordChatModel()
    assert await compress(LikelihoodRerankCompressor(chat), [], mode) == []
    assert chat.calls == []


@pytest.mark.parametrize("mode", MODES)
async def test_nothing_is_lost_same_ids_same_texts_and_empty_content(mode):
    docs = [*documents(), Document(page_content=TEXTS[1], id="d1"), Document(page_content="", metadata={"k": 1})]
    out = await compress(LikelihoodRerankCompressor(KeywordChatModel(), top_n=len(docs)), docs, mode)
    assert sorted(d.metadata["retrieval_rank"] for d in out) == list(range(1, len(docs) + 1)), "each document once"
    assert out[-1].metadata["k"] == 1 and out[-1].metadata["rerank_label"] is None, "the textless one comes last"
    assert [d.metadata["retrieval_rank"] for d in out[:3]] == [2, 4, 7], "ties keep retrieval order"


@pytest.mark.parametrize("mode", MODES)
async def test_an_unreadable_answer_keeps_retrieval_order(mode, caplog):
    llm = ScriptedLLM(lambda prompt, call: "I cannot tell.")
    out = await compress(LikelihoodRerankCompressor(llm, top_n=len(TEXTS)), documents(), mode)
    assert [d.page_content for d in out] == TEXTS and {d.metadata["rerank_label"] for d in out} == {None}
    assert "no readable label" in caplog.text


def test_options_are_the_rerankers_and_checked_the_same_way():
    compressor = LikelihoodRerankCompressor(KeywordChatModel(), top_n=3, min_label="likely", window_size=2)
    out = compressor.compress_documents(documents(), QUERY)
    assert [d.page_content for d in out] == [TEXTS[1], TEXTS[3], TEXTS[2]], "the cutoff dropped the unlikely ones"
    assert compressor.reranker.window_size == 2
    with pytest.raises(TypeError, match="unknown option 'top_k'; did you mean 'top_n'"):
        LikelihoodRerankCompressor(KeywordChatModel(), top_k=3)
    with pytest.raises(ValueError, match="min_label 'maybe' is not on the label scale"):
        LikelihoodRerankCompressor(KeywordChatModel(), min_label="maybe")


@pytest.mark.parametrize("mode", MODES)
async def test_the_judgement_cache_saves_the_second_call(mode):
    chat = KeywordChatModel()
    compressor = LikelihoodRerankCompressor(chat, top_n=3, cache="memory")
    first = await compress(compressor, documents(), mode)
    again = await compress(compressor, documents(), mode)
    assert len(chat.calls) == 1 and compressor.reranker.last_usage.cache_hits == len(TEXTS)
    assert [d.metadata for d in again] == [d.metadata for d in first]


def test_fusion_reads_the_first_stage_score_from_the_named_metadata_key():
    docs = [Document(page_content=t, metadata={"score": s}) for t, s in [(TEXTS[1], 0.1), (TEXTS[3], 0.9)]]
    options = {"retrieval_weight": 0.5, "retrieval_signal": "score"}
    out = LikelihoodRerankCompressor(KeywordChatModel(), retrieval_score_key="score", **options).compress_documents(docs, QUERY)
    assert [d.page_content for d in out] == [TEXTS[3], TEXTS[1]], "equal labels: the higher retrieval score wins"
    assert out[0].metadata["retrieval_score"] == 0.9 and out[0].metadata["relevance_score"] == 1.0
    assert out[1].metadata["relevance_score"] == 0.5
    bad = [Document(page_content="x", metadata={"score": "high"})]
    with pytest.raises(ValueError, match=r"document 0: metadata\['score'\] = 'high' is not a number"):
        LikelihoodRerankCompressor(KeywordChatModel(), retrieval_score_key="score").compress_documents(bad, QUERY)


def test_what_cannot_judge_is_refused_at_construction():
    with pytest.raises(TypeError, match="LangChain chat model .* or a LlamaIndex LLM, got str"):
        LikelihoodRerankCompressor("gpt-4.1-mini")
    with pytest.raises(TypeError, match=r"not a runnable made with \.bind\(\)"):
        LikelihoodRerankCompressor(KeywordChatModel().bind(stop=["x"]))
    with pytest.raises(ValueError, match="structured_output=True needs a LlamaIndex OpenAI-compatible LLM"):
        LikelihoodRerankCompressor(KeywordChatModel(), structured_output=True)


def test_a_contextual_compression_retriever_uses_it_sync_and_async():
    retriever = ContextualCompressionRetriever(
        base_compressor=LikelihoodRerankCompressor(KeywordChatModel(), top_n=2), base_retriever=FixedRetriever()
    )
    assert top(retriever.invoke(QUERY)) == top(asyncio.run(retriever.ainvoke(QUERY))) == RELEVANT


class Runs(BaseCallbackHandler):
    """What a tracer records: each run's kind and parent, and each LLM run's token usage."""

    def __init__(self) -> None:
        self.kind: dict = {}
        self.parent: dict = {}
        self.tokens: dict = {}

    def on_retriever_start(self, serialized: Any, query: str, *, run_id: Any, parent_run_id: Any = None, **kwargs: Any) -> None:
        self.kind[run_id], self.parent[run_id] = "retriever", parent_run_id

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: Any, parent_run_id: Any = None, **kwargs: Any) -> None:
        self.kind[run_id], self.parent[run_id] = "chat", parent_run_id

    def on_llm_end(self, response: Any, *, run_id: Any, **kwargs: Any) -> None:
        self.tokens[run_id] = response.generations[0][0].message.usage_metadata


@pytest.mark.parametrize("mode", MODES)
def test_a_tracer_sees_each_llm_run_under_the_retrievers_run_with_its_tokens(mode):
    runs = Runs()
    compressor = LikelihoodRerankCompressor(MeteredChatModel(), top_n=2, window_size=2, max_concurrency=3)
    retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=FixedRetriever())
    config = {"callbacks": [runs]}
    out = retriever.invoke(QUERY, config) if mode == "sync" else asyncio.run(retriever.ainvoke(QUERY, config))
    assert top(out) == RELEVANT
    (outer,) = [run for run, kind in runs.kind.items() if kind == "retriever" and runs.parent[run] is None]
    chats = [run for run, kind in runs.kind.items() if kind == "chat"]
    assert len(chats) == 3 and all(runs.parent[run] == outer for run in chats), "three windows, each under the retriever"
    assert sum(runs.tokens[run]["input_tokens"] for run in chats) == compressor.reranker.last_usage.prompt_tokens > 0


def test_options_are_typed_as_the_rerankers_and_top_n_is_the_rerankers():
    assert set(RerankOptions.__annotations__) == set(LikelihoodRerank.model_fields) - {"llm", "callback_manager"}
    compressor = LikelihoodRerankCompressor(KeywordChatModel(), top_n=3)
    assert compressor.top_n == 3
    compressor.top_n = 1
    assert compressor.reranker.top_n == 1 and len(compressor.compress_documents(documents(), QUERY)) == 1
    with pytest.raises(ValueError, match="top_n\n  Input should be greater than or equal to 1"):
        compressor.top_n = 0


def test_the_adapter_reports_the_chat_models_name_and_context_window():
    llm = LangChainChatLLM(ChatOpenAI(model="local", api_key="x", base_url="http://127.0.0.1:9/v1",
                                      profile={"max_input_tokens": 4096}))  # fmt: skip
    assert llm.metadata.model_name == "local" and llm.metadata.context_window == 4096 and llm.metadata.is_chat_model
    assert LangChainChatLLM(KeywordChatModel()).metadata.context_window == 3900  # LlamaIndex's default


def test_without_the_extra_the_error_names_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "llama_rerank.langchain")
    monkeypatch.setitem(sys.modules, "langchain_core", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'llama-rerank\[langchain\]'"):
        import llama_rerank.langchain  # noqa: F401


# -- LangChain's ChatOpenAI at the wire (tests/openai_stub.py) ------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("profile", ["openai-chat", "vllm", "ollama", "llamacpp"])
async def test_chat_openai_logprobs_give_expected_value_scores(profile, mode, caplog):
    with StubServer(profile) as stub:
        compressor = LikelihoodRerankCompressor(chat_openai(stub), top_n=len(TEXTS), window_size=3)
        out = await compress(compressor, documents(), mode)
    assert top(out) == RELEVANT and len(stub.chat_requests) == 2
    assert compressor.reranker.last_usage.logprob_scored == len(TEXTS)
    assert 0.5 < out[0].metadata["rerank_score"] < 1, "an expected value, not the label's 1.0"
    assert out[0].metadata["relevance_score"] == out[0].metadata["rerank_score"]
    assert compressor.reranker.last_usage.prompt_tokens > 0 and "WARNING" not in caplog.text


async def test_chat_openai_on_a_server_that_ignores_logprobs_scores_by_label_and_says_so_once(caplog):
    with StubServer("ollama-old") as stub:
        out = LikelihoodRerankCompressor(chat_openai(stub), window_size=3).compress_documents(documents(), QUERY)
    assert top(out) == RELEVANT and out[0].metadata["rerank_score"] == 1.0, "the label's value"
    assert caplog.text.count("asked for logprobs but returned none") == 1


@pytest.mark.parametrize("profile", ["thinking", "thinking-reasoning-content"])
async def test_chat_openai_with_a_thinking_model_reads_the_answer_not_the_reasoning(profile):
    """The stub's reasoning holds decoy labels opposite to the answer."""
    with StubServer(profile) as stub:
        out = LikelihoodRerankCompressor(chat_openai(stub, logprobs=None, top_logprobs=None),
                                         top_n=len(TEXTS)).compress_documents(documents(), QUERY)  # fmt: skip
    assert {d.page_content for d in out if d.metadata["rerank_label"] == "very likely"} == RELEVANT


async def test_chat_openai_with_a_reasoning_model():
    """gpt-5-mini through ChatOpenAI without logprobs (which such a model refuses) works; with them it is loud."""
    with StubServer("openai-reasoning") as stub:
        out = LikelihoodRerankCompressor(chat_openai(stub, logprobs=None, top_logprobs=None, temperature=None),
                                         top_n=2).compress_documents(documents(), QUERY)  # fmt: skip
        assert top(out) == RELEVANT
        with pytest.raises(LLMConfigError, match="HTTP 400.*'logprobs'"):
            LikelihoodRerankCompressor(chat_openai(stub, temperature=None)).compress_documents(documents(), QUERY)


@pytest.mark.parametrize("mode", MODES)
async def test_a_bad_key_is_loud_whatever_on_error_says(mode):
    with StubServer("openai-chat", api_key="right") as stub:
        compressor = LikelihoodRerankCompressor(chat_openai(stub, api_key="wrong"), on_error="fallback")
        with pytest.raises(LLMConfigError, match=f"'gpt-4.1-mini' \\(LangChainChatLLM at {stub.url}\\).*HTTP 401.*API key"):
            await compress(compressor, documents(), mode)
    assert len(stub.chat_requests) == 1, "never retried"


@pytest.mark.parametrize("mode", MODES)
async def test_a_503_is_retried_by_the_reranker_alone_then_falls_back(mode, caplog):
    with StubServer("openai-chat", script=[ERRORS[503]] * 3) as stub:
        chat = chat_openai(stub, max_retries=3)
        # one window (with two, the other's request may come between this one's retries and take a scripted 503)
        compressor = LikelihoodRerankCompressor(chat, top_n=len(TEXTS), window_size=len(TEXTS), max_retries=2)
        with caplog.at_level(logging.WARNING):
            out = await compress(compressor, documents(), mode)
    assert len(stub.chat_requests) == 3, "three tries (no client retries)"
    assert [d.page_content for d in out] == TEXTS, "kept in retrieval order"
    assert sorted(d.page_content for d in out) == sorted(TEXTS), "nothing is lost"
    assert "keep retrieval order" in caplog.text and compressor.reranker.last_usage.failed_windows == 1
    assert chat.max_retries == 3 and chat.root_client.max_retries == 3, "the user's chat model keeps its setting"


async def test_a_single_503_is_retried_and_the_ranking_holds():
    with StubServer("openai-chat", script=[ERRORS[503]]) as stub:
        out = LikelihoodRerankCompressor(chat_openai(stub), top_n=2).compress_documents(documents(), QUERY)
    assert top(out) == RELEVANT and len(stub.chat_requests) == 2


# -- for real: ContextualCompressionRetriever, langchain-chroma, bundled embeddings and llama.cpp server -------------


@pytest.fixture(scope="module")
def demo_vectorstore(tmp_path_factory):
    from langchain_chroma import Chroma
    from langchain_core.embeddings import Embeddings

    from llama_rerank.pipeline import demo_corpus
    from llama_rerank.runtime import LocalEmbedding

    class BundledEmbeddings(Embeddings):
        """The bundled ONNX MiniLM (a LlamaIndex embedding) as LangChain Embeddings."""

        def __init__(self) -> None:
            self.model = LocalEmbedding()

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return self.model.get_text_embedding_batch(texts)

        def embed_query(self, text: str) -> list[float]:
            return self.model.get_query_embedding(text)

    folder, queries = demo_corpus()
    docs = [Document(page_content=p.read_text(encoding="utf-8"), metadata={"file": p.name}) for p in sorted(folder.glob("*.md"))]
    store = Chroma("demo", embedding_function=BundledEmbeddings(), persist_directory=str(tmp_path_factory.mktemp("lc-chroma")))
    store.add_documents(docs)
    return store, queries


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_contextual_compression_retriever_with_chroma_and_the_bundled_llm(demo_vectorstore, mode):
    from llama_rerank.runtime.server import get_server

    store, queries = demo_vectorstore
    chat = ChatOpenAI(base_url=get_server().address + "/v1", api_key="x", model="local", logprobs=True, top_logprobs=5,
                      temperature=0)  # fmt: skip
    compressor = LikelihoodRerankCompressor(chat, top_n=4, window_size=3, max_passage_tokens=64, timeout=900)
    retriever = ContextualCompressionRetriever(base_compressor=compressor,
                                               base_retriever=store.as_retriever(search_kwargs={"k": 6}))  # fmt: skip
    query = queries[0]["query"] if mode == "sync" else queries[1]["query"]
    first_stage = store.as_retriever(search_kwargs={"k": 6}).invoke(query)
    out = retriever.invoke(query) if mode == "sync" else await retriever.ainvoke(query)
    usage = compressor.reranker.last_usage
    assert len(out) == 4 and {d.metadata["file"] for d in out} <= {d.metadata["file"] for d in first_stage}
    assert usage.llm_calls >= 2 and usage.failed_windows == 0 and usage.logprob_scored > 0
    labels = compressor.reranker.scale.labels
    assert all(d.metadata["rerank_label"] in labels for d in out)
    scores = [d.metadata["relevance_score"] for d in out]
    assert scores == sorted(scores, reverse=True)
    assert any(s not in compressor.reranker.scale.values for s in scores), "logprob scores are expected values"
