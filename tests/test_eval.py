"""The evaluation harness (``llama_rerank.eval``): loaders, systems, metrics, cache/resume and the ``eval`` command.

No real LLM: a scripted one answers every system's prompt. Embeddings and Chroma are the real local ones.
"""

import json
import math
from pathlib import Path

import pytest
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.schema import NodeWithScore, TextNode

from fakes import Reply, ScriptedLLM, label_by_keyword
from llama_rerank import LikelihoodRerank, StoreError, cli, pipeline
from llama_rerank.eval import EvalError, metrics, report
from llama_rerank.eval.datasets import load_dataset, select_queries
from llama_rerank.eval.run import CACHE_FILE, QueryResult, build_index, evaluate, rerank_query
from llama_rerank.eval.systems import build, parse_spec, split_systems

ALL_SYSTEMS = ["first-stage", "likelihood", "likelihood-label", "llm-rerank", "rankgpt"]


class CountedLLM(ScriptedLLM):
    """The scripted LLM with LlamaIndex's callback decorators, as real LLMs have, so token counting sees its calls."""

    @llm_chat_callback()
    def chat(self, messages, **kwargs):
        return super().chat(messages, **kwargs)

    @llm_chat_callback()
    async def achat(self, messages, **kwargs):
        return await super().achat(messages, **kwargs)

    @llm_completion_callback()
    def complete(self, prompt, formatted=False, **kwargs):
        return super().complete(prompt, formatted, **kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt, formatted=False, **kwargs):
        return await super().acomplete(prompt, formatted, **kwargs)


def answer(prompt: str, call: int) -> str:
    """One reply for each system's prompt format; LLMRerank keeps only its batch's 2nd document."""
    if "<passage id=" in prompt:
        return label_by_keyword({"wing": "very likely", "flap": "likely"})(prompt, call)
    if "RankGPT" in prompt:
        return "[2] > [1]"
    return "Doc: 2, Relevance: 9"


LONG = " ".join(f"Sentence {i} tells how laminar flow over a flat plate becomes turbulent downstream." for i in range(60))
CORPUS = [
    {"_id": "wing", "title": "Swept wings", "text": "Swept wings delay compressibility drag at high subsonic speed."},
    {"_id": "flap", "title": "Flaps", "text": "Flaps raise lift at low speed by increasing the wing camber."},
    {"_id": "jet", "title": "Jet engines", "text": "Jet engines compress air, burn fuel and expel hot gas for thrust."},
    {"_id": "rocket", "title": "Rockets", "text": "Rockets carry oxidiser and produce thrust outside the atmosphere."},
    {"_id": "plate", "title": "Boundary layers", "text": LONG},
    {"_id": "prop", "title": "", "text": "Propellers accelerate a large mass of air to make thrust."},
]
QUERIES = {"q1": "How do swept wings reduce drag?", "q2": "What produces thrust in space?",
           "q3": "Where does a boundary layer turn turbulent?", "q4": "An unjudged question."}  # fmt: skip
QRELS = [("q1", "wing", 2), ("q1", "flap", 1), ("q2", "rocket", 1), ("q2", "jet", 0), ("q3", "plate", 3)]


def write_beir(folder: Path, corpus=CORPUS, split: str = "test") -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in QUERIES.items()))
    rows = "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS)
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows, encoding="utf-8")
    return folder


@pytest.fixture
def beir_dir(tmp_path):
    return write_beir(tmp_path / "tiny")


@pytest.fixture(scope="module")
def embed():
    from llama_rerank.runtime import LocalEmbedding

    return LocalEmbedding()


# -- datasets -------------------------------------------------------------------------------------------------


def test_beir_loader(beir_dir):
    data = load_dataset(beir_dir)
    assert (data.name, data.format) == ("tiny", "beir")
    assert data.corpus["wing"] == "Swept wings\nSwept wings delay compressibility drag at high subsonic speed."
    assert data.corpus["prop"] == "Propellers accelerate a large mass of air to make thrust."  # no empty title line
    assert data.queries["q2"] == "What produces thrust in space?"
    assert data.qrels == {"q1": {"wing": 2, "flap": 1}, "q2": {"rocket": 1, "jet": 0}, "q3": {"plate": 3}}
    assert select_queries(data) == ["q1", "q2", "q3"]  # q4 has no judgment


def test_beir_split_and_bad_folders(tmp_path):
    folder = write_beir(tmp_path / "dev", split="dev")
    assert load_dataset(folder, split="dev").qrels["q3"] == {"plate": 3}
    assert load_dataset(folder).split == "dev"  # the only judgments there are (SciFact's copy has train alone)
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\twing\t1\n")
    with pytest.raises(EvalError, match=r"qrels/test.tsv.*splits found: dev, train"):
        load_dataset(folder)  # two splits and no test: which one is not guessed
    assert load_dataset(folder, split="train").qrels == {"q1": {"wing": 1}}
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="neither a BEIR-layout folder"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(EvalError, match="not a folder"):
        load_dataset(tmp_path / "missing")


def test_query_metadata_never_reaches_the_first_stage_or_the_llm(tmp_path, embed, monkeypatch):
    """SciFact's claims carry their evidence labels in ``metadata``: only the claim's text may be used."""
    folder = write_beir(tmp_path / "claims", split="train")
    marker = "CONTRADICT-13734012"
    evidence = {"wing": [{"sentences": [0], "label": marker}]}
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v, "metadata": evidence}) + "\n" for k, v in QUERIES.items()))
    embedded = []
    original = type(embed)._get_query_embedding
    monkeypatch.setattr(type(embed), "_get_query_embedding", lambda self, query: embedded.append(query) or original(self, query))
    llm = CountedLLM(answer)
    run = evaluate(folder, ["first-stage", "likelihood", "llm-rerank", "rankgpt"], llm=llm, store=tmp_path / "store",
                   embed_model=embed, top_k=3, progress=False)  # fmt: skip
    assert run.config["split"] == "train" and set(run.results["likelihood"]) == {"q1", "q2", "q3"}
    assert {QUERIES[q] for q in ("q1", "q2", "q3")} <= set(embedded)  # the first stage embedded each claim's text...
    assert len(llm.prompts) >= 9 and not any(marker in p or "sentences" in p for p in embedded + llm.prompts)  # ...alone


CRAN_DOCS = """.I 1
.T
flow past a wing .
.A
someone
.B
j. ae. 1958.
.W
flow past a wing .
  the wing was studied
in a tunnel .
.I 2
.T
heat transfer .
.A
.B
.W
heat transfer in slabs .
.I 3
.T
.A
.B
.W
"""
CRAN_QUERIES = """.I 001
.W
what about wings .
.I 002
.W
what about heat .
.I 004
.W
what about
slabs .
"""
CRAN_QRELS = "1 1 1\n1 2 -1\n2 2 2\n3 2 4\n3 1 3\n\n"


def test_cranfield_loader_numbers_queries_in_file_order_and_maps_gains(tmp_path):
    folder = tmp_path / "cran"
    folder.mkdir()
    (folder / "cran.all.1400").write_text(CRAN_DOCS)
    (folder / "cran.qry").write_text(CRAN_QUERIES)
    (folder / "cranqrel").write_text(CRAN_QRELS)
    data = load_dataset(folder)
    assert data.format == "cranfield"
    assert data.corpus == {"1": "flow past a wing . the wing was studied in a tunnel .", "2": "heat transfer in slabs .", "3": ""}
    # the third query is ".I 004" in the file but number 3 in the judgments
    assert data.queries == {"1": "what about wings .", "2": "what about heat .", "3": "what about slabs ."}
    # gain = 5 - code for codes 1..4; -1 (judged not relevant) -> 0
    assert data.qrels == {"1": {"1": 4, "2": 0}, "2": {"2": 3}, "3": {"2": 1, "1": 2}}


def test_real_cranfield(cranfield_dir):
    data = load_dataset(cranfield_dir)
    assert len(data.corpus) == 1400 and len(data.queries) == 225
    assert sum(len(docs) for docs in data.qrels.values()) == 1837
    assert data.queries["3"].startswith("what problems of heat conduction in composite slabs")  # ".I 004" in cran.qry
    assert data.qrels["1"]["184"] == 3 and data.qrels["1"]["486"] == 0
    assert data.corpus["1"].startswith("experimental investigation of the aerodynamics of a wing in a slipstream .")
    tune, test = select_queries(data, "tune"), select_queries(data, "test")
    assert (len(tune), len(test)) == (113, 112) and tune[:3] == ["1", "3", "5"] and test[:3] == ["2", "4", "6"]
    assert sorted(tune + test, key=int) == select_queries(data) and not set(tune) & set(test)
    sample = select_queries(data, "test", limit=5, seed=1)
    assert sample == select_queries(data, "test", limit=5, seed=1) and set(sample) <= set(test) and len(sample) == 5
    assert sample != select_queries(data, "test", limit=5, seed=2)
    rest = select_queries(data, "test", exclude=set(sample))
    assert len(rest) == 107 and not set(rest) & set(sample) and set(rest) <= set(test)
    with pytest.raises(EvalError, match="no test query is left once the 112 excluded"):
        select_queries(data, "test", exclude=set(test))


# -- systems --------------------------------------------------------------------------------------------------


def test_system_specs():
    assert split_systems("first-stage,likelihood:window_size=1,retrieval_weight=0.7,rankgpt") == [
        "first-stage", "likelihood:window_size=1,retrieval_weight=0.7", "rankgpt"]  # fmt: skip
    assert parse_spec("likelihood:window_size=1,retrieval_signal=score,min_score=null") == (
        "likelihood", {"window_size": 1, "retrieval_signal": "score", "min_score": None})  # fmt: skip
    llm = ScriptedLLM(answer)
    reranker = build("likelihood:window_size=1,retrieval_weight=0.7", llm, 20)
    assert isinstance(reranker, LikelihoodRerank)
    assert (reranker.top_n, reranker.window_size, reranker.retrieval_weight, reranker.scoring) == (20, 1, 0.7, "auto")
    assert build("likelihood-label", llm, 7).scoring == "label"
    assert build("first-stage", None, 20) is None
    rerank = build("llm-rerank", llm, 20)
    assert (type(rerank).__name__, rerank.top_n, rerank.choice_batch_size) == ("LLMRerank", 20, 10)
    assert (type(build("rankgpt", llm, 20)).__name__, build("rankgpt", llm, 20).top_n) == ("RankGPTRerank", 20)
    for bad, message in [("nope", "unknown system 'nope'"), ("likelihood:windowsize=2", "no settable field windowsize"),
                         ("likelihood:top_n=3", "no settable field top_n"), ("likelihood:window_size=abc", "window_size"),
                         ("first-stage:x=1", "first-stage"), ("likelihood:oops", "key=value")]:  # fmt: skip
        with pytest.raises(EvalError, match=message):
            build(bad, llm, 20)


def _nodes(pairs):
    """Candidate chunks as (chunk id, corpus id), in first-stage order."""
    return [NodeWithScore(node=TextNode(id_=cid, text=f"text of {cid}", metadata={"corpus_id": doc}), score=1 - i / 10)
            for i, (cid, doc) in enumerate(pairs)]  # fmt: skip


def test_dropped_nodes_are_appended_and_failures_keep_first_stage_order():
    candidates = _nodes([("a#0", "a"), ("b#0", "b"), ("a#1", "a"), ("c#0", "c")])
    llm = CountedLLM(lambda prompt, call: "Doc: 3, Relevance: 9")
    result = rerank_query(build("llm-rerank", llm, 4), "query", candidates, None)
    assert (result.ranking, result.appended, result.error) == (["a", "b", "c"], 3, None)  # a#1 first, then the rest
    broken = CountedLLM(lambda prompt, call: "Doc: -50, Relevance: 3")  # LLMRerank indexes its batch with -51
    result = rerank_query(build("llm-rerank", broken, 4), "query", candidates, None)
    assert result.ranking == ["a", "b", "c"] and result.error.startswith("IndexError")
    assert rerank_query(None, "query", candidates, None) == QueryResult(ranking=["a", "b", "c"], latency_s=pytest.approx(0, abs=0.1))


# -- metrics --------------------------------------------------------------------------------------------------


def test_metrics_by_hand():
    assert metrics.doc_ranking(["d3", "d2", "d3", "d1", "d2"]) == ["d3", "d2", "d1"]
    qrels = {"q1": {"d1": 2, "d2": 1, "d9": 0}, "q2": {"d5": 1}}
    values = metrics.per_query({"q1": ["d3", "d2", "d1"], "q2": []}, qrels, top_n=2)
    dcg = 1 / math.log2(3) + 2 / math.log2(4)  # d2 (gain 1) at rank 2, d1 (gain 2) at rank 3
    ideal = 2 + 1 / math.log2(3)
    assert values["q1"] == pytest.approx({"ndcg@10": dcg / ideal, "mrr@10": 0.5, "recall@2": 0.5})
    assert values["q2"] == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@2": 0.0}
    assert metrics.per_query({"q1": ["d1", "d2"]}, qrels, 2)["q1"] == pytest.approx({"ndcg@10": 1.0, "mrr@10": 1.0, "recall@2": 1.0})


def test_score_costs_latency_and_significance():
    rankings = {"q1": ["d3", "d2", "d1"], "q2": ["d5"], "q3": ["x", "d7"]}
    qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"d5": 1}, "q3": {"d7": 1}}
    results = {
        "first-stage": {q: QueryResult(r, latency_s=0.1) for q, r in rankings.items()},
        "better": {q: QueryResult(sorted(r), llm_calls=2, prompt_tokens=100, completion_tokens=10, latency_s=float(i))
                   for i, (q, r) in enumerate(rankings.items(), start=1)},  # fmt: skip
        "same": {q: QueryResult(r, error="ValueError: x" if q == "q2" else None) for q, r in rankings.items()},
    }
    scores = metrics.score(results, qrels, top_n=1)
    assert scores["better"]["llm_calls"] == 6 and scores["better"]["prompt_tokens"] == 300
    assert scores["better"]["latency_p50_s"] == 2.0 and scores["better"]["latency_p95_s"] == pytest.approx(2.9)
    assert scores["better"]["ndcg@10"] > scores["first-stage"]["ndcg@10"]
    assert set(scores["better"]["p_value_vs_first_stage"]) == {"ttest_rel", "wilcoxon"}
    assert 0 < scores["better"]["p_value_vs_first_stage"]["wilcoxon"] <= 1
    assert scores["same"]["p_value_vs_first_stage"] == {"ttest_rel": None, "wilcoxon": None}  # no difference at all
    assert scores["same"]["failures"] == 1 and "p_value_vs_first_stage" not in scores["first-stage"]
    assert scores["first-stage"]["per_query"]["q3"] == {"ndcg@10": pytest.approx(1 / math.log2(3)), "mrr@10": 0.5,
                                                        "recall@1": 0.0, "ranking": ["x", "d7"]}  # fmt: skip
    assert report.table(scores, 1).splitlines()[3].startswith("better ")


# -- index, cache and resume ----------------------------------------------------------------------------------


def test_index_is_reused_completed_or_refused(beir_dir, tmp_path, embed, monkeypatch):
    store = tmp_path / "store"
    data = load_dataset(beir_dir)
    index = build_index(data, store, embed, progress=False)
    coll = index.vector_store.client
    assert coll.count() > len(CORPUS)  # the long document is chunked
    assert set(coll.get(ids=["plate#0", "plate#1"])["ids"]) == {"plate#0", "plate#1"}
    coll.delete(ids=["wing#0"])  # an interrupted build: completed, only the missing chunk is embedded
    embedded = []
    original = type(embed).get_text_embedding_batch
    monkeypatch.setattr(type(embed), "get_text_embedding_batch", lambda self, texts, **kw: embedded.extend(texts) or original(self, texts, **kw))
    build_index(data, store, embed, progress=False)
    assert embedded == [data.corpus["wing"]]
    build_index(data, store, embed, progress=False)  # complete: nothing embedded
    assert len(embedded) == 1
    other = load_dataset(write_beir(tmp_path / "other", corpus=CORPUS[:3]))
    with pytest.raises(StoreError, match="another corpus"):
        build_index(other, store, embed, progress=False)


class Stop(BaseException):
    """Stands for Ctrl-C / a kill in the middle of a query."""


def _stop_on(query: str):
    """Interrupt the run on ``query``'s call, a moment after it started: queries overlap in a batch, and an
    interruption cancels those still running, so the other query gets time to finish and be saved."""

    def script(prompt, call):
        return Reply("", delay=2.0, error=Stop()) if query in prompt else answer(prompt, call)

    return script


def test_resume_after_interruption_and_torn_cache_line(beir_dir, tmp_path, embed):
    kwargs = dict(store=tmp_path / "store", embed_model=embed, top_k=3, limit_queries=2, seed=0, progress=False)
    first, second = select_queries(load_dataset(beir_dir), limit=2, seed=0)
    q1, q2 = QUERIES[first], QUERIES[second]
    llm = CountedLLM(_stop_on(q2))
    with pytest.raises(Stop):
        evaluate(beir_dir, ["likelihood"], llm=llm, **kwargs)
    assert any(q1 in p for p in llm.prompts)
    cache = tmp_path / "store" / "eval-cache" / CACHE_FILE
    assert len(cache.read_text().splitlines()) == 1

    llm = CountedLLM(answer)
    run = evaluate(beir_dir, ["likelihood"], llm=llm, **kwargs)
    assert llm.prompts and all(q2 in p and q1 not in p for p in llm.prompts)  # the cached query is not re-sent
    assert set(run.results["likelihood"]) == {first, second}
    assert run.results["likelihood"][second].llm_calls == len(llm.prompts)
    assert run.results["likelihood"][second].prompt_tokens > 0

    text = cache.read_text()
    cache.write_text(text[: len(text) - 40])  # killed while writing the last line
    llm = CountedLLM(answer)
    again = evaluate(beir_dir, ["likelihood"], llm=llm, **kwargs)
    assert llm.prompts and all(q2 in p for p in llm.prompts)
    assert again.results["likelihood"][first] == run.results["likelihood"][first]
    assert again.results["likelihood"][second].ranking == run.results["likelihood"][second].ranking

    llm = CountedLLM(answer)
    evaluate(beir_dir, ["likelihood"], llm=llm, **kwargs)  # the torn line is skipped, the rewritten one is read
    assert llm.prompts == []


def test_likelihood_systems_rerank_the_queries_as_one_batch(beir_dir, tmp_path, embed):
    def slow(prompt, call):
        return Reply(answer(prompt, call), delay=0.2)

    llm = CountedLLM(slow)
    run = evaluate(beir_dir, ["likelihood:window_size=10"], llm=llm, store=tmp_path / "store", embed_model=embed,
                   top_k=3, progress=False)  # fmt: skip
    assert llm.max_in_flight == 3  # one window per query: the three judged queries at once (the budget is 4)
    assert all(r.llm_calls == 1 and r.prompt_tokens > 0 and r.latency_s >= 0.2 for r in run.results["likelihood:window_size=10"].values())
    assert run.results["likelihood:window_size=10"]["q1"].ranking[0] == "wing"


# -- the command ----------------------------------------------------------------------------------------------


def check_schema(data: dict, systems: list[str], queries: int, top_n: int) -> None:
    assert set(data) == {"dataset", "config", "systems"}
    assert list(data["systems"]) == systems
    required = {"ndcg@10", "mrr@10", f"recall@{top_n}", "llm_calls", "prompt_tokens", "completion_tokens",
                "latency_p50_s", "latency_p95_s", "per_query"}  # fmt: skip
    for name, entry in data["systems"].items():
        assert required <= set(entry), name
        assert ("p_value_vs_first_stage" in entry) == (name != "first-stage")
        assert len(entry["per_query"]) == queries
        for values in entry["per_query"].values():
            assert isinstance(values["ndcg@10"], float) and all(isinstance(d, str) for d in values["ranking"])


def test_eval_command_end_to_end(beir_dir, tmp_path, monkeypatch, capsys):
    llm = CountedLLM(answer)
    monkeypatch.setattr(pipeline, "make_llm", lambda spec, **kw: llm)
    out_json, out_png = tmp_path / "out" / "eval.json", tmp_path / "out" / "eval.png"
    argv = ["eval", str(beir_dir), "--systems", ",".join(ALL_SYSTEMS) + ",likelihood:window_size=1,retrieval_weight=0.5",
            "--top-k", "4", "--top-n", "3", "--store", str(tmp_path / "store"), "--json", str(out_json), "--plot", str(out_png)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "nDCG@10" in printed and "likelihood:window_size=1,retrieval_weight=0.5" in printed
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out_json.read_text())
    systems = ALL_SYSTEMS + ["likelihood:window_size=1,retrieval_weight=0.5"]
    check_schema(data, systems, queries=3, top_n=3)
    assert data["dataset"] == "tiny" and data["config"]["top_k"] == 4 and data["config"]["llm_model"] == "scripted"
    assert str(tmp_path) not in out_json.read_text() and data["config"]["path"] == beir_dir.name  # no machine paths
    first = data["systems"]["first-stage"]
    assert first["llm_calls"] == 0 and first["per_query"]["q1"]["ranking"][0] == "wing"
    # metrics are recomputable from the rankings
    rankings = {q: v["ranking"] for q, v in first["per_query"].items()}
    assert metrics.per_query(rankings, load_dataset(beir_dir).qrels, 3)["q3"]["ndcg@10"] == first["per_query"]["q3"]["ndcg@10"]
    calls = sum(entry["llm_calls"] for entry in data["systems"].values())
    assert calls == len(llm.prompts) > 0
    assert data["systems"]["llm-rerank"]["nodes_appended"] > 0
    for name in systems[1:]:
        assert data["systems"][name]["failures"] == 0 and data["systems"][name]["prompt_tokens"] > 0
    # --exclude-queries leaves out what an earlier run reported
    partial = json.loads(out_json.read_text())
    for entry in partial["systems"].values():
        entry["per_query"] = {"q1": entry["per_query"]["q1"], "q2": entry["per_query"]["q2"]}
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    rest_json = tmp_path / "rest.json"
    argv = ["eval", str(beir_dir), "--systems", "first-stage", "--store", str(tmp_path / "store"),
            "--exclude-queries", str(tmp_path / "partial.json"), "--json", str(rest_json)]  # fmt: skip
    assert cli.main(argv) == 0
    rest = json.loads(rest_json.read_text())
    assert list(rest["systems"]["first-stage"]["per_query"]) == ["q3"] and rest["config"]["excluded_queries"] == 2
    capsys.readouterr()
    assert cli.main(argv[:-4] + ["--exclude-queries", str(beir_dir / "corpus.jsonl")]) == 1
    assert "EvalError: --exclude-queries" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "store"), "--systems", "first-stage", "--store", str(tmp_path / "s2")]) == 1
    assert "EvalError: " in capsys.readouterr().err


def test_local_defaults_apply_to_likelihood_systems_under_their_own_parameters():
    from llama_rerank.eval import systems

    llm = ScriptedLLM(lambda p, c: "")
    defaults = {"retrieval_weight": 0.5, "window_size": 2}
    assert systems.build("likelihood", llm, 10, defaults).retrieval_weight == 0.5
    assert systems.build("likelihood:retrieval_weight=0", llm, 10, defaults).retrieval_weight == 0
    assert systems.build("likelihood-label", llm, 10, defaults).window_size == 2
    assert systems.build("first-stage", llm, 10, defaults) is None
    assert systems.effective("likelihood", defaults) != systems.effective("likelihood", {})  # cache keys differ
    assert systems.effective("first-stage", defaults) == "first-stage"


def test_eval_dry_run_counts_what_is_left_and_sends_nothing(beir_dir, tmp_path, monkeypatch, capsys):
    llm = CountedLLM(answer)
    made = []
    monkeypatch.setattr(pipeline, "make_llm", lambda spec, **kw: made.append(kw) or llm)
    store = str(tmp_path / "store")
    argv = ["eval", str(beir_dir), "--systems", "first-stage,likelihood:window_size=2,llm-rerank", "--top-k", "4", "--store", store]
    assert cli.main(argv + ["--dry-run", "--prices", "1,4"]) == 0
    out = capsys.readouterr().out
    assert llm.prompts == [] and made == [{"serve": False}]
    assert not (tmp_path / "store" / "eval-cache" / CACHE_FILE).exists()  # the dry run writes no result
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:5]}
    assert rows["first-stage"][:2] == ["3", "0"]
    assert rows["likelihood:window_size=2"][:2] == ["3", "6"]  # 3 judged queries x 2 windows of 4 candidates
    assert rows["llm-rerank"][:3] == ["3", "not", "foreseen"] and "cost" in out.splitlines()[0]
    assert cli.main(argv) == 0  # the real run sends the foreseen calls
    likelihood_prompts = [p for p in llm.prompts if "<passage id=" in p]
    assert len(likelihood_prompts) == 6
    capsys.readouterr()
    assert cli.main(argv + ["--dry-run"]) == 0  # everything is in the result cache now
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:5]}
    assert rows["likelihood:window_size=2"][:2] == ["0", "0"]


def test_a_changed_prompt_is_a_new_result(beir_dir, tmp_path, embed):
    """The result cache keys on the system's prompts: a run with another prompt is not served the old results."""
    from llama_index.core.prompts import ChatPromptTemplate

    from llama_rerank.eval.run import cache_key, prompt_texts

    one, two = (LikelihoodRerank(llm=ScriptedLLM(answer)) for _ in range(2))
    assert cache_key("likelihood", "m", "q", ["a"], prompt_texts(one)) == cache_key("likelihood", "m", "q", ["a"], prompt_texts(two))
    two.update_prompts({"rerank_prompt": ChatPromptTemplate.from_messages([("user", "{query} {num} {labels} {passages}")])})
    assert cache_key("likelihood", "m", "q", ["a"], prompt_texts(one)) != cache_key("likelihood", "m", "q", ["a"], prompt_texts(two))
    assert cache_key("first-stage", "", "q", ["a"]) == cache_key("first-stage", "", "q", ["a"], prompt_texts(None))
