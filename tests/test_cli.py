"""The `llama-rerank` command's fast paths: ingest, errors as `TypeName: message` with exit status 1, the query report
and the demo with a scripted LLM."""

import pytest

from llama_rerank import LikelihoodRerank, LlamaRerankError
from llama_rerank.cli import format_moves, format_report, main
from llama_rerank.pipeline import LOCAL_QUALITY_NOTE, QueryReport, demo_corpus, make_llm, reranker_defaults, score_legend
from llama_rerank.types import RerankUsage
from conftest import make_nodes
from fakes import ScriptedLLM, label_by_keyword, passages, query_of


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


def _report(labels, llm_scores, finals, was, answer="the answer", top_n=2, known="doc1"):
    """A report over passages 'alpha'.. whose first stage is in file order and whose reranked order is ``was``."""
    first = make_nodes([f"{word} passage" for word in ("alpha", "beta", "gamma", "delta")[: len(was)]])
    for node in first:
        node.node.metadata["file_name"] = node.node.metadata.pop("source")
    reranked = []
    for label, llm, final, rank in zip(labels, llm_scores, finals, was):
        node = first[rank - 1].model_copy()
        meta = {**node.node.metadata, "rerank_label": label, "rerank_score": llm, "retrieval_rank": rank}
        node.node = node.node.model_copy(update={"metadata": meta})
        node.score = final
        reranked.append(node)
    usage = RerankUsage(llm_calls=1, prompt_tokens=120, completion_tokens=9)
    return QueryReport("q?", first, reranked, answer, usage, {"retrieve": 0.1, "rerank": 2.0, "answer": 1.0}, top_n,
                       score_legend(LikelihoodRerank(llm=ScriptedLLM(lambda p, c: ""), **reranker_defaults("local"))),
                       known_answer=known)  # fmt: skip


def test_report_shows_both_orders_label_llm_and_final_score_with_a_legend():
    text = format_report(_report(["unlikely", "likely", "unlikely"], [0.05, 0.7, 0.01], [0.99, 0.6, 0.0], [1, 2, 3]))
    lines = text.splitlines()
    row1 = next(line for line in lines if line.startswith(" 1 "))
    left, right = row1.split("|")
    assert "alpha passage" in left and "1.000" in left
    assert right.split()[:4] == ["unlikely", "0.05", "0.99", "1"] and "alpha passage" in right
    legend = lines[lines.index(next(line for line in lines if line.startswith(" 3 "))) + 2]
    assert legend == ("label: what the model wrote; llm: its score, probability-weighted if logprobs came back; "
                      "final = 0.5 x llm (min-max normalised per query) + 0.5 x first-stage rank (1 first .. 0 last)")
    assert "Answer:" in text and "prompt tokens 120" in text


def test_report_marks_the_known_answer_and_where_the_answer_step_stops():
    text = format_report(_report(["likely", "unlikely", "unlikely"], [0.7, 0.1, 0.0], [0.9, 0.5, 0.1], [2, 1, 3]))
    lines = text.splitlines()
    assert [line.count("*") for line in lines if line[:3] in (" 1 ", " 2 ", " 3 ")] == [1, 1, 0]
    assert "*beta passage" in lines[4].split("|")[1] and "*beta passage" in lines[5].split("|")[0]
    assert lines[6].split("|")[1].strip() == "------------ the passages above went to the answer step"
    assert "* known answer passage (doc1): rank 2 before reranking, 1 after: up" in text
    no_answer = format_report(_report(["likely"] * 3, [0.5] * 3, [0.5] * 3, [1, 2, 3], answer=None, known=None))
    assert "answer step" not in no_answer and "*" not in no_answer and "known answer" not in no_answer


@pytest.mark.parametrize("settings, legend", [
    ({}, "final = llm"),
    ({"retrieval_weight": 0.3, "retrieval_signal": "score"}, "final = 0.7 x llm + 0.3 x first-stage score (min-max normalised)"),
])  # fmt: skip
def test_legend_follows_the_reranker_settings(settings, legend):
    assert score_legend(LikelihoodRerank(llm=ScriptedLLM(lambda p, c: ""), **settings)).endswith(legend)


def test_closing_line_counts_known_answers_moved_up_down_and_stayed():
    up = _report(["likely"] * 3, [0.5] * 3, [0.5] * 3, [2, 1, 3])
    down = _report(["likely"] * 3, [0.5] * 3, [0.5] * 3, [1, 3, 2], known="doc1")
    stayed = _report(["likely"] * 3, [0.5] * 3, [0.5] * 3, [1, 2, 3], known="doc0")
    missing = _report(["likely"] * 3, [0.5] * 3, [0.5] * 3, [1, 2, 3], known="doc9")
    assert [r.move for r in (up, down, stayed, missing)] == ["up", "down", "stayed", "not retrieved"]
    assert format_moves([up, down, stayed, missing, up]) == (
        "Known answer passages over 5 queries: moved up 2, down 1, stayed 1, not retrieved 1; "
        "at rank 1: 1 before reranking, 3 after."
    )


def test_demo_reports_where_each_known_answer_went_and_answers_from_the_top_n(tmp_path, monkeypatch, capsys):
    """The whole demo command on the bundled corpus (real embeddings and Chroma) with a scripted LLM judge."""
    _, queries = demo_corpus()
    answers = {q["query"]: q["answer_doc"] for q in queries[:3]}

    def judge(prompt, call):
        if "<passage" not in prompt:
            return "Stop at 55 to 60 °C."
        known = answers[query_of(prompt)]
        rule = {"plant-based": ("very likely", "unlikely"), "squealing": ("likely", "likely"), "backflush": ("unlikely", "very likely")}
        mine, others = next(labels for word, labels in rule.items() if word in prompt)
        return "\n".join(f"[{i}] {mine if known in text else others}" for i, text in enumerate(passages(prompt), start=1))

    llm = ScriptedLLM(judge)
    monkeypatch.setattr("llama_rerank.pipeline.make_llm", lambda spec, **kw: llm)
    assert main(["demo", "--queries", "3", "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "* known answer passage (28-steaming-oat-milk.md): rank 2 before reranking, 1 after: up" in out
    assert "* known answer passage (29-milk-screeching.md): rank 2 before reranking, 2 after: stayed" in out
    assert "* known answer passage (24-cleaning-without-three-way.md): rank 3 before reranking, 10 after: down" in out
    assert out.rstrip().endswith("Known answer passages over 3 queries: moved up 1, down 1, stayed 1; at rank 1: 0 before reranking, 1 after.")
    assert LOCAL_QUALITY_NOTE in " ".join(out.split())  # the bundled model's measured quality, said plainly
    assert out.count("The known answer passage says:") == 3 and queries[0]["answer_fact"][:40] in " ".join(out.split())
    answer_prompts = [p for p in llm.prompts if "<passage" not in p]
    assert len(answer_prompts) == 3 and all(p.count("file_name: ") == 3 for p in answer_prompts)  # --top-n 3 of 10
    assert all(p.endswith("Do not repeat the query.") and p.index("Query:") < p.index("file_name:") for p in answer_prompts)


def test_query_dry_run_prints_the_estimate_and_calls_nothing(tmp_path, monkeypatch, capsys):
    """Real embeddings and Chroma; the LLM is scripted and must see no prompt, and is built without starting a server."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(f"Note {i}: swept wings delay drag rise at speed {i * 100}.", encoding="utf-8")
    store = str(tmp_path / "store")
    assert main(["ingest", str(folder), "--store", store]) == 0
    llm, made = ScriptedLLM(label_by_keyword({"Note 1:": "very likely"})), []
    monkeypatch.setattr("llama_rerank.pipeline.make_llm", lambda spec, **kw: made.append(kw) or llm)
    capsys.readouterr()
    argv = ["query", "swept wings?", "--store", store, "--top-k", "6", "--window-size", "4"]
    assert main(argv + ["--dry-run", "--prices", "2,8"]) == 0
    out = capsys.readouterr().out
    assert llm.prompts == [] and made[-1]["serve"] is False
    assert out.startswith("Rerank estimate: 2 window(s), 2 LLM call(s), ") and "Nothing was sent to the LLM" in out
    prompt_tokens, completion_tokens = (int(out.split(f" {kind} tokens")[0].rsplit(" ", 1)[1]) for kind in ("prompt", "completion"))
    assert f"cost {(prompt_tokens * 2 + completion_tokens * 8) / 1e6:.4f}" in out
    assert main(argv + ["--no-answer"]) == 0  # the real rerank sends what the estimate counted
    assert len(llm.prompts) == 2 and made[-1]["serve"] is True


def test_prices_need_the_dry_run_and_a_valid_pair(capsys):
    with pytest.raises(SystemExit):
        main(["query", "q", "--prices", "1,2"])
    assert "--prices goes with --dry-run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["query", "q", "--dry-run", "--prices", "cheap"])
    assert "PROMPT,COMPLETION prices per million tokens" in capsys.readouterr().err


def test_a_dry_run_builds_the_local_llm_without_starting_the_model(monkeypatch):
    import llama_rerank.runtime.server as server

    monkeypatch.setattr(server, "get_server", lambda: pytest.fail("a dry run started the bundled model"))
    llm = make_llm("local", serve=False)
    estimate = LikelihoodRerank(llm=llm, **reranker_defaults("local")).estimate("q", make_nodes(["a wing", "a flap"]))
    assert estimate.llm_calls == 1 and estimate.prompt_tokens > 0
