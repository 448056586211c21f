"""Where evaluation collections come from: one configurable folder, never the repository; the bundled known answers."""

from __future__ import annotations

import json

import pytest

from llama_rerank.eval import EvalError
from llama_rerank.eval import datasets
from llama_rerank.eval.datasets import DATA_ENV, collection_dir, data_root, load_dataset, select_queries


def test_the_environment_variable_names_the_data_folder(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    assert collection_dir("mine") == tmp_path / "mine"


def test_without_the_variable_the_folder_beside_the_checkout_is_used_when_it_exists(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setattr(datasets, "BESIDE_CHECKOUT", tmp_path / "shared" / "data")
    assert data_root() is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert data_root() == tmp_path / "shared" / "data"


def test_a_missing_collection_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(EvalError, match=f"has no cranfield/ folder.*set {DATA_ENV}"):
        collection_dir("cranfield")
    monkeypatch.delenv(DATA_ENV)
    monkeypatch.setattr(datasets, "BESIDE_CHECKOUT", tmp_path / "absent")
    with pytest.raises(EvalError, match=f"\\${DATA_ENV} is not set"):
        load_dataset("cranfield")  # a bare name is looked up in the data folder


def test_a_collection_name_loads_from_the_data_folder(tmp_path, monkeypatch):
    beir = tmp_path / "tiny"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "T", "text": "body"}) + "\n")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "question", "metadata": {"x": 1}}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    data = load_dataset("tiny")
    assert (data.format, data.corpus, data.queries, data.qrels) == ("beir", {"d1": "T\nbody"}, {"q1": "question"}, {"q1": {"d1": 1}})


def test_a_bare_name_is_a_collection_only_when_nothing_here_has_that_name(tmp_path, monkeypatch):
    (tmp_path / "data" / "tiny").mkdir(parents=True)
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "tiny").write_text("a questions file of the user's")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    assert datasets.resolve("tiny") == tmp_path / "data" / "tiny"  # what `tune cranfield --queries cranfield` relies on
    monkeypatch.chdir(tmp_path / "here")
    assert datasets.resolve("tiny").resolve() == tmp_path / "here" / "tiny"


def test_the_bundled_demo_corpus_loads_as_known_answers():
    from llama_rerank.pipeline import demo_corpus

    docs, entries = demo_corpus()
    data = load_dataset(docs.parent)
    assert data.format == "known-answers" and len(data.corpus) == 46 and len(data.queries) == len(entries) == 8
    assert data.queries["1"] == entries[0]["query"] and data.qrels["1"] == {entries[0]["answer_doc"]: 1}
    assert data.corpus[entries[0]["answer_doc"]] == (docs / entries[0]["answer_doc"]).read_text(encoding="utf-8")
    assert select_queries(data) == [str(n) for n in range(1, 9)]


def test_known_answers_naming_a_missing_document_is_a_clear_error(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("alpha")
    (tmp_path / "queries.json").write_text(json.dumps([{"query": "q", "answer_doc": "b.md"}]))
    with pytest.raises(EvalError, match="answer documents not in docs/: b.md"):
        load_dataset(tmp_path)
    (tmp_path / "queries.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(EvalError, match="expected a list of"):
        load_dataset(tmp_path)


def test_real_scifact_train_claims_keep_their_evidence_metadata_out(scifact_dir):
    data = load_dataset(scifact_dir, "train")
    assert (len(data.corpus), len(data.queries)) == (5183, 809)
    raw = [json.loads(line) for line in (scifact_dir / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any(r["metadata"] for r in raw)  # the evidence labels are there in the file...
    assert all(data.queries[r["_id"]] == r["text"] for r in raw)  # ...and only the claim's text is read
