"""``llama-rerank tune`` for real: the bundled model writes the questions and judges them on the demo corpus
(slow: a few minutes on 2 cores; small and bounded: 6 questions, one K, one window). CI runs it too."""

import json

import pytest

from llama_rerank import LikelihoodRerank, cli
from llama_rerank.pipeline import demo_corpus, make_llm
from llama_rerank.tune import settings

pytestmark = pytest.mark.slow


def test_tune_on_the_demo_corpus_with_the_bundled_model_then_resumes_without_judging_again(tmp_path, capsys):
    docs, _ = demo_corpus()
    out = tmp_path / "out"
    argv = ["tune", str(docs), "--out", str(out), "--n-queries", "6", "--top-k", "10", "--weights", "0,0.5", "--top-n", "3"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "**" in printed and "wrote" in printed
    questions = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    assert len(questions) >= 4 and all(q["text"].strip() and q["source"] in q["relevant"] for q in questions)
    judged = (out / "judged.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in judged]
    assert len(records) == len(questions)  # each tune question once, each held-out one once (one K, one window)
    assert all(r["llm_calls"] >= 1 and r["latency_s"] > 0 for r in records)
    assert sum(c["label"] is not None for r in records for c in r["candidates"]) >= 0.9 * sum(len(r["candidates"]) for r in records)
    report = (out / "report.md").read_text()
    assert report.startswith("# Should I rerank these documents?\n\n**")
    saved = settings.read(out / "settings.json")
    assert saved["top_k"] == 10 and saved["reranker"]["normalize"] is False
    reranker = LikelihoodRerank.from_settings(out / "settings.json", llm=make_llm("local"))
    assert reranker.window_size == 10

    replies = (out / "replies.jsonl").read_text()
    assert cli.main(argv) == 0  # the same arguments again: every reply and judgement is on disk
    assert (out / "replies.jsonl").read_text() == replies
    assert (out / "judged.jsonl").read_text().splitlines() == judged
