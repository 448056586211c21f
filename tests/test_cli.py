"""The `llama-rerank` command's fast paths: ingest, errors as `TypeName: message` with exit status 1."""

import pytest

from llama_rerank import LlamaRerankError
from llama_rerank.cli import format_report, main
from llama_rerank.pipeline import QueryReport, make_llm
from llama_rerank.types import RerankUsage
from conftest import make_nodes


def test_ingest_prints_a_report(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Wing loading sets the stall speed.", encoding="utf-8")
    assert main(["ingest", str(tmp_path / "docs"), "--store", str(tmp_path / "store")]) == 0
    assert "1 added" in capsys.readouterr().out
    assert main(["ingest", str(tmp_path / "docs"), "--store", str(tmp_path / "store")]) == 0
    assert "1 unchanged" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ingest", "/nonexistent/folder"], "StoreError: /nonexistent/folder is not a folder"),
        (["query", "hello", "--store", "{tmp}/never"], "StoreError: no collection 'llama_rerank'"),
    ],
)
def test_errors_are_one_line_and_exit_1(argv, message, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    assert message in capsys.readouterr().err


def test_llm_choices_fail_clearly(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(LlamaRerankError, match="OPENAI_API_KEY"):
        make_llm("openai:gpt-4o-mini")
    with pytest.raises(LlamaRerankError, match="unknown --llm 'gpt4'"):
        make_llm("gpt4")
    llm = make_llm("http://127.0.0.1:9/v1", model="qwen")
    assert llm.model == "qwen" and llm.logprobs is True and llm.metadata.is_chat_model


def test_report_shows_both_orders_side_by_side():
    first = make_nodes(["alpha passage", "beta passage"])
    reranked = [n.model_copy() for n in reversed(first)]
    for rank, node in zip((2, 1), reranked):
        node.node = node.node.model_copy(update={"metadata": {"rerank_label": "likely", "retrieval_rank": rank}})
    usage = RerankUsage(llm_calls=1, prompt_tokens=120, completion_tokens=9)
    text = format_report(QueryReport("q?", first, reranked, "the answer", usage, {"retrieve": 0.1, "rerank": 2.0, "answer": 1.0}))
    lines = text.splitlines()
    row1 = next(line for line in lines if line.startswith(" 1 "))
    assert "alpha passage" in row1.split("|")[0] and "beta passage" in row1.split("|")[1]
    assert "likely" in row1 and "Answer:" in text and "prompt tokens 120" in text
