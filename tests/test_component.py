"""LikelihoodRerank as a LlamaIndex component: strict options, a serialisable prompt, Settings.llm, no stale state."""

import copy
import logging
import pickle

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.prompts import ChatPromptTemplate, PromptTemplate
from llama_index.core.settings import Settings

from conftest import make_nodes
from fakes import ScriptedLLM, label_by_keyword, passages
from llama_rerank import LikelihoodRerank


def _llm(rules=None):
    return ScriptedLLM(label_by_keyword(rules or {}, default="likely"))


# unknown options ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, hint", [("top_nn", "did you mean 'top_n'?"), ("labels", "did you mean 'label_scale'?"),
                                          ("zzzz", "options: callback_manager, llm, rerank_prompt")])  # fmt: skip
def test_unknown_option_is_a_type_error_naming_the_closest(option, hint):
    with pytest.raises(TypeError, match=f"unknown option '{option}'; {hint}"):
        LikelihoodRerank(llm=_llm(), **{option: 3})
    with pytest.raises(TypeError, match=f"unknown option '{option}'"):
        LikelihoodRerank.from_dict({"top_n": 2, option: 3}, llm=_llm())


# the prompt is a serialisable field --------------------------------------------------------------------------------


CUSTOM_TEXT = PromptTemplate("Q={query} N={num} L={labels}\n{passages}\nANSWER:")
CUSTOM_CHAT = ChatPromptTemplate([ChatMessage(role=MessageRole.SYSTEM, content="Be strict."),
                                  ChatMessage(role=MessageRole.USER, content="{query} | {num} | {labels}\n{passages}")])  # fmt: skip


@pytest.mark.parametrize("custom", [CUSTOM_TEXT, CUSTOM_CHAT], ids=["text", "chat"])
@pytest.mark.parametrize("how", ["dict", "json"])
def test_to_dict_from_dict_round_trips_a_custom_prompt(custom, how):
    original = LikelihoodRerank(llm=_llm(), top_n=2, window_size=3)
    original.update_prompts({"rerank_prompt": custom})
    llm = _llm()
    if how == "dict":
        copy = LikelihoodRerank.from_dict(original.to_dict(), llm=llm)
    else:
        copy = LikelihoodRerank.from_json(original.to_json(), llm=llm)
    assert copy.llm is llm and copy.top_n == 2 and copy.window_size == 3
    assert list(copy.get_prompts()) == ["rerank_prompt"] and type(copy.get_prompts()["rerank_prompt"]) is type(custom)
    copy.rerank("hello", make_nodes(["a", "b"]))
    original.rerank("hello", make_nodes(["a", "b"]))
    assert llm.prompts == original.llm.prompts
    assert llm.prompts[0].startswith(("Q=hello N=2", "Be strict.\nhello | 2"))


def test_default_prompt_survives_json_and_unset_llm_stays_unset():
    data = LikelihoodRerank().to_dict()
    assert data["llm"] is None and data["class_name"] == "LikelihoodRerank"
    copy = LikelihoodRerank.from_json(LikelihoodRerank(llm=_llm()).to_json(), llm=_llm())
    assert copy.get_prompts()["rerank_prompt"].get_template() == LikelihoodRerank(llm=_llm()).rerank_prompt.get_template()


# llm=None means Settings.llm, looked up when used ------------------------------------------------------------------


@pytest.fixture
def settings_llm(monkeypatch):
    """Settings.llm starts unset and unresolvable (resolving it fails the test); the returned function sets it."""

    def no_default(*args):
        raise AssertionError("Settings.llm was resolved")

    monkeypatch.setattr(Settings, "_llm", None)
    monkeypatch.setattr("llama_index.core.settings.resolve_llm", no_default)
    return lambda llm: monkeypatch.setattr(Settings, "_llm", llm)


def test_llm_none_uses_settings_llm_at_use_not_at_construction(settings_llm):
    reranker = LikelihoodRerank(top_n=1)  # Settings.llm unset and unresolvable: construction must not touch it
    assert reranker.llm is None and repr(reranker).startswith("LikelihoodRerank(llm=Settings.llm, top_n=1")
    first, second = _llm({"b": "very likely"}), _llm({"a": "very likely"})
    settings_llm(first)
    assert [n.node.get_content() for n in reranker.rerank("q", make_nodes(["a", "b"])).nodes] == ["b"]
    settings_llm(second)
    assert [n.node.get_content() for n in reranker.rerank("q", make_nodes(["a", "b"])).nodes] == ["a"]
    assert len(first.prompts) == 1 and len(second.prompts) == 1


def test_answer_step_uses_the_same_resolved_llm(settings_llm):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.schema import TextNode

    from llama_rerank.pipeline import run_query

    reranker = LikelihoodRerank(top_n=1)
    llm = ScriptedLLM(lambda p, c: "[1] likely" if "<passage" in p else "The answer.")
    settings_llm(llm)
    index = VectorStoreIndex([TextNode(text="Wing loading sets the stall speed.")], embed_model=MockEmbedding(embed_dim=8))
    report = run_query(index, reranker, "what sets the stall speed?", top_k=1)
    assert report.answer == "The answer." and len(llm.prompts) == 2


# derived state follows the fields ----------------------------------------------------------------------------------


def test_changing_label_scale_after_construction_changes_prompt_and_scores():
    llm = ScriptedLLM(label_by_keyword({"b": "somewhat likely"}, default="no"))
    reranker = LikelihoodRerank(llm=llm, top_n=2, followup_calls=0)
    reranker.label_scale = {"no": 0.0, "somewhat likely": 0.4, "yes": 1.0}
    result = reranker.rerank("q", make_nodes(["a", "b"])).nodes
    assert 'labels: "no", "somewhat likely", "yes"' in llm.prompts[0]
    assert [(n.node.get_content(), n.score) for n in result] == [("b", 0.4), ("a", 0.0)]
    assert str(reranker.scale) == "no=0, somewhat likely=0.4, yes=1"


def test_min_label_is_checked_against_the_current_scale():
    with pytest.raises(ValueError, match="min_label 'maybe' is not on the label scale"):
        LikelihoodRerank(llm=_llm(), min_label="maybe")
    with pytest.raises(ValueError, match="at least two labels"):
        LikelihoodRerank(llm=_llm(), label_scale={"only": 1.0})
    reranker = LikelihoodRerank(llm=_llm(), min_label="likely")
    with pytest.raises(ValueError, match=r"min_label 'likely' is not on the new label scale \['no', 'yes'\]: set min_label=None first"):
        reranker.label_scale = {"no": 0.0, "yes": 1.0}
    with pytest.raises(ValueError, match=r"min_label 'yes' is not on the label scale \['unlikely', 'likely', 'very likely'\]"):
        reranker.min_label = "yes"
    assert reranker.min_label == "likely" and reranker.scale.labels == ("unlikely", "likely", "very likely")  # unchanged
    reranker.min_label, reranker.label_scale, reranker.min_label = None, {"no": 0.0, "yes": 1.0}, "yes"  # the order that works
    reranker.llm = ScriptedLLM(label_by_keyword({"b": "yes"}, default="no"))
    assert [n.node.get_content() for n in reranker.rerank("q", make_nodes(["a", "b"])).nodes] == ["b"]


# assignments are checked like construction --------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, error, message", [
    ("top_n", 0, ValueError, "top_n\n  Input should be greater than or equal to 1"),
    ("retrieval_weight", 5, ValueError, "retrieval_weight\n  Input should be less than or equal to 1"),
    ("scoring", "logprob", ValueError, "scoring\n  Input should be 'auto', 'label' or 'logprobs'"),
    ("cache", 42, TypeError, "cache must be None, 'memory', a file path or a LlamaIndex BaseKVStore, not int"),
    ("cache", "memroy", ValueError, "did you mean 'memory'"),
    ("label_scale", {"only": 1.0}, ValueError, "at least two labels"),
    ("llm", "gpt-4.1-mini", ValueError, "llm\n  Input should be a valid dictionary or instance of LLM"),
])  # fmt: skip
def test_a_bad_assignment_fails_there_and_leaves_the_reranker_as_it_was(field, value, error, message):
    reranker = LikelihoodRerank(llm=_llm(), top_n=1)
    before = reranker.model_dump()
    with pytest.raises(error, match=message):
        setattr(reranker, field, value)
    assert reranker.model_dump() == before
    assert len(reranker.rerank("q", make_nodes(["a", "b"])).nodes) == 1


def test_from_dict_of_a_reranker_with_an_llm_names_the_fix():
    data = LikelihoodRerank(llm=_llm(), top_n=2).to_dict()
    with pytest.raises(ValueError, match=r"settings of an LLM \(custom_llm\) written by to_dict\(\).*LikelihoodRerank\.from_dict\(data, llm=my_llm\)"):
        LikelihoodRerank.from_dict(data)
    llm = _llm()
    again = LikelihoodRerank.from_dict(data, llm=llm)
    assert again.llm is llm and again.top_n == 2


class _CharLLM(ScriptedLLM):
    """An LLM exposing its own tokenizer (one token per character), as LlamaIndex's OpenAI class does."""

    @property
    def _tokenizer(self):
        return type("Chars", (), {"encode": staticmethod(list)})()


def test_changing_llm_after_construction_changes_the_token_counter():
    text = "wing loading " * 4
    reranker = LikelihoodRerank(llm=_llm(), max_passage_tokens=16)
    reranker.rerank("q", make_nodes([text]))
    assert passages(reranker.llm.prompts[0]) == ["source: doc0\n\n" + text.strip()]  # 12 cl100k tokens: fits
    reranker.llm = _CharLLM(label_by_keyword({}))
    assert len(reranker.resources.encode(text)) == len(text)
    reranker.rerank("q", make_nodes([text]))
    (cut,) = passages(reranker.llm.prompts[0])
    assert cut.endswith("[...truncated]") and len(cut) <= 16  # counted in characters now


def test_the_cache_store_follows_a_changed_cache_field(tmp_path):
    llm, nodes = _llm(), make_nodes(["a", "b"])
    reranker = LikelihoodRerank(llm=llm, cache="memory")
    reranker.rerank("q", nodes)
    reranker.rerank("q", nodes)
    assert len(llm.prompts) == 1, "the second rerank was served by the memory store"
    reranker.cache = str(tmp_path / "judgements.sqlite")
    reranker.rerank("q", nodes)
    assert len(llm.prompts) == 2, "a new store, not the memory one"
    reranker.cache = None
    reranker.rerank("q", nodes)
    assert len(llm.prompts) == 3 and reranker.resources.cache is None


def test_a_reranker_used_with_llamaindexs_openai_class_copies_and_pickles_without_a_word(caplog):
    from llama_index.llms.openai import OpenAI

    from openai_stub import StubServer

    nodes = make_nodes(["espresso shot", "green tea"])
    with StubServer("openai-chat") as stub:
        llm = OpenAI(model=stub.profile.model, api_base=stub.url, api_key="k", logprobs=True, top_logprobs=5, temperature=0)
        reranker = LikelihoodRerank(llm=llm, top_n=1, cache="memory")
        assert reranker.rerank("espresso", nodes).nodes[0].node.get_content() == "espresso shot"
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            copies = [pickle.loads(pickle.dumps(reranker)), copy.deepcopy(reranker), reranker.model_copy(deep=True)]
        assert caplog.records == [], "nothing dropped from the pickle with a warning on the root logger"
        for twin in copies:
            assert twin.rerank("espresso", nodes).nodes[0].node.get_content() == "espresso shot"
        assert len(stub.chat_requests) == 4, "each copy judged anew: its memory store is its own"
