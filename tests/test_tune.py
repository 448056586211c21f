"""``llama-rerank tune`` with a scripted LLM: questions and their filters, the split, the sweep's reuse of judgements,
resume, the budget, calibration, settings.json, ``from_settings``, ``--settings`` on query and eval, the dry run and
the report's verdict. Embeddings and Chroma are the real local ones; no real LLM (tests/test_tune_local.py runs one).
"""

import json
import re
import signal
import threading
import time
from types import SimpleNamespace

import pytest
from llama_index.core.schema import NodeWithScore, TextNode

from fakes import ScriptedLLM, passages, query_of
from llama_rerank import LikelihoodRerank, cli, pipeline
from llama_rerank.eval.metrics import MRR, NDCG, recall_key
from llama_rerank.errors import LlamaRerankError
from llama_rerank.tune import calibration, questions as qs, report, run, settings, sweep
from llama_rerank.tune.calibration import CalibratedRerank, Calibration

GADGETS = ["zorblax", "quimble", "frandle", "gloppet", "snarvic", "tweedle", "plinkus", "wobbler", "crumpet", "dazzor",
           "fennik", "horvat"]  # fmt: skip
DOC = ("The {name} is a kitchen gadget made of brushed steel. It {action} in under a minute. Cooks reach for the {name} "
       "whenever the recipe calls for it, and most shops sell one for about {price} dollars.")  # fmt: skip
ACTIONS = ["slices onions", "whisks eggs", "grinds pepper", "peels garlic", "zests lemons", "mashes potatoes",
           "shreds cabbage", "juices limes", "crushes ice", "folds dough", "pits cherries", "cores apples"]  # fmt: skip
QUESTION_ASK = "Write one search question that the passage below answers"


def write_docs(folder, count=len(GADGETS)):
    folder.mkdir()
    for i, (name, action) in enumerate(zip(GADGETS[:count], ACTIONS)):
        (folder / f"{i:02d}-{name}.md").write_text(DOC.format(name=name, action=action, price=10 + i), encoding="utf-8")
    return folder


def gadget(text):
    return next((g for g in GADGETS if g in text), None)


def script(prompt, call):
    """Questions: 'What does the <gadget> do in the kitchen?'; rerank: 'very likely' for the passage naming the
    question's gadget, 'unlikely' for the others."""
    if QUESTION_ASK in prompt:
        return f"Question: What does the {gadget(prompt.split('Passage:')[1])} do in the kitchen?"
    wanted = gadget(query_of(prompt))
    return "\n".join(f"[{i}] {'very likely' if wanted in text else 'unlikely'}" for i, text in enumerate(passages(prompt), start=1))


def calls(llm, kind):
    return sum((QUESTION_ASK in p) == (kind == "questions") for p in llm.prompts)


@pytest.fixture(scope="module")
def embed_model():
    return pipeline.default_embedding()


@pytest.fixture
def docs(tmp_path):
    return write_docs(tmp_path / "docs")


def tune(out, docs, llm, embed_model, **options):
    defaults = dict(n_queries=8, top_ks=(5,), windows=(5,), weights=(0.0, 0.5), top_ns=(1, 3), progress=False)
    return run.tune(out, docs, llm=llm, embed_model=embed_model, **{**defaults, **options})


# -- questions ------------------------------------------------------------------------------------------------

PASSAGE = "The zorblax is a kitchen gadget made of brushed steel and it slices onions in under a minute for busy cooks."


@pytest.mark.parametrize("reply, why", [
    ("", "unwritten"), ("NONE", "unwritten"), ("  \n\n", "unwritten"), ("Why?", "unwritten"),
    ("What gadget made of brushed steel and it slices onions quickly?", "copied"),
    ("What does the passage say the zorblax does?", "vague"), ("Which gadget does this study test?", "vague"),
    ("What does a zorblax do?", "kept"),
])  # fmt: skip
def test_screen_drops_copies_and_replies_without_a_question(reply, why):
    question, verdict = qs.screen(reply, PASSAGE, set())
    assert verdict == why
    assert (question is None) == (why != "kept")


def test_screen_drops_a_question_already_kept_whatever_its_case_and_punctuation():
    assert qs.screen("What does a ZORBLAX do!", PASSAGE, {"what does a zorblax do"}) == (None, "duplicate")


def test_copied_run_counts_consecutive_shared_words_only():
    assert qs.copied_run("made of brushed steel and it slices onions", PASSAGE) == 8
    assert qs.copied_run("onions slices it and steel brushed of made", PASSAGE) == 1


def test_clean_takes_the_question_out_of_its_wrapping():
    assert qs.clean('\n**Question:** "What does a zorblax do?"\nBecause...') == "What does a zorblax do?"
    assert qs.clean("1. What does a zorblax do?") == "What does a zorblax do?"


def test_synthetic_drops_failures_copies_and_duplicates_and_a_rerun_asks_only_what_failed(tmp_path):
    texts = {f"p{i}": DOC.format(name=GADGETS[i], action=ACTIONS[i], price=i) for i in range(6)}

    def writer_script(prompt, call):
        passage = prompt.split("Passage:\n")[1]
        name = gadget(passage)
        if name == "zorblax":
            raise TimeoutError("the server took too long")
        if name == "quimble":
            return passage  # a copy of the passage
        if name == "frandle":
            return "What does the snarvic do in the kitchen?"  # the same question as snarvic's
        if name == "gloppet":
            return "NONE"
        return f"What does the {name} do in the kitchen?"

    llm = ScriptedLLM(writer_script)
    order = sorted(texts.items())
    writer = qs.QuestionWriter(llm, tmp_path, max_retries=0)
    found, dropped = qs.synthetic(writer, order, n=6)
    assert [q.text for q in found] == ["What does the snarvic do in the kitchen?", "What does the tweedle do in the kitchen?"]
    assert [q.relevant for q in found] == [{"p2": 1}, {"p5": 1}]  # frandle came first; snarvic repeated it
    assert dropped == {"failed": 1, "copied": 1, "duplicate": 1, "unwritten": 1, "vague": 0, "over budget": 0}
    assert len(llm.prompts) == 6
    again = ScriptedLLM(writer_script)
    found_again, _ = qs.synthetic(qs.QuestionWriter(again, tmp_path, max_retries=0), order, n=6)
    assert [q.text for q in found_again] == [q.text for q in found]
    assert len(again.prompts) == 1 and "zorblax" in again.prompts[0]  # only the failed passage is asked again


def test_question_writing_stops_when_out_of_time_but_not_before_the_minimum(tmp_path):
    texts = sorted((f"p{i}", DOC.format(name=GADGETS[i], action=ACTIONS[i], price=i)) for i in range(len(GADGETS)))
    llm = ScriptedLLM(lambda prompt, call: f"What does the {gadget(prompt.split('Passage:')[1])} do?")
    writer = qs.QuestionWriter(llm, tmp_path, workers=1)
    found, dropped = qs.synthetic(writer, texts, n=len(texts), out_of_time=lambda: True)
    assert len(found) == len(llm.prompts) == qs.MIN_QUESTIONS  # the budget is spent, but a tune needs four
    assert dropped["over budget"] == len(texts) - qs.MIN_QUESTIONS


def test_replies_to_another_question_prompt_are_not_reused(tmp_path, monkeypatch):
    item = ("p0", DOC.format(name=GADGETS[0], action=ACTIONS[0], price=0))
    first = ScriptedLLM(script)
    qs.synthetic(qs.QuestionWriter(first, tmp_path), [item], n=1)
    monkeypatch.setattr(qs, "QUESTION_PROMPT", qs.QUESTION_PROMPT.replace("search question", "quiz question"))
    again = ScriptedLLM(lambda prompt, call: "What does the zorblax do in a quiz?")
    found, _ = qs.synthetic(qs.QuestionWriter(again, tmp_path), [item], n=1)
    assert len(again.prompts) == 1 and found[0].text == "What does the zorblax do in a quiz?"


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="sends SIGINT to the main thread (POSIX)")
def test_ctrl_c_while_questions_are_written_surfaces_at_once_and_asks_nothing_more(tmp_path):
    gate = threading.Event()
    llm = ScriptedLLM(lambda prompt, call: gate.wait(30) and "What is it?")  # answers only once the gate opens
    texts = sorted((f"p{i}", DOC.format(name=GADGETS[i], action=ACTIONS[i], price=i)) for i in range(len(GADGETS)))

    def press_ctrl_c():
        deadline = time.monotonic() + 10
        while llm.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # let the main thread settle into waiting
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            qs.synthetic(qs.QuestionWriter(llm, tmp_path, workers=2), texts, n=len(texts))
        assert llm.in_flight == 2, "Ctrl-C waited for the calls in flight"
    finally:
        gate.set()
    time.sleep(0.3)
    assert len(llm.prompts) == 2, "a question was asked after Ctrl-C"


def test_a_question_file_needs_relevant_ids_and_says_where_it_is_wrong(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text('{"query": "What does the zorblax do?", "relevant": ["00-zorblax.md"]}\n'
                    '{"id": "b", "text": "Which slices?", "relevant": {"x": 2, "y": 0}}\n')  # fmt: skip
    found = qs.from_file(good)
    assert [(q.id, q.relevant) for q in found] == [("1", {"00-zorblax.md": 1}), ("b", {"x": 2, "y": 0})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "no ids"}\n')
    with pytest.raises(LlamaRerankError, match=r"bad.jsonl:1: expected"):
        qs.from_file(bad)


def test_split_alternates_in_id_order_and_holds_every_question_once():
    found = [qs.Question(f"q{i}", "t", {"x": 1}) for i in (5, 1, 4, 2, 3, 0)]
    tune_half, held = sweep.split(found)
    assert [q.id for q in tune_half] == ["q0", "q2", "q4"] and [q.id for q in held] == ["q1", "q3", "q5"]


# -- the sweep, resume, budget --------------------------------------------------------------------------------


def test_a_tune_judges_each_window_once_scores_every_weight_and_n_from_it_and_resumes_without_llm_calls(tmp_path, docs, embed_model):
    out = tmp_path / "out"
    llm = ScriptedLLM(script)
    result = tune(out, docs, llm, embed_model)
    assert calls(llm, "questions") == 8
    assert calls(llm, "rerank") == 8  # 4 tune + 4 held-out questions, one window of K=5 each
    assert {s.setting.name for s in result.tune_scores} == {"first stage (K=5)", "K=5 window=5 w=0", "K=5 window=5 w=0.5"}
    assert len((out / "judged.jsonl").read_text().splitlines()) == 8
    saved = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    assert len(saved) == 8 and all(q["source"] in q["relevant"] for q in saved)

    # more weights and Ns, and the same questions: judged already, so no LLM call at all
    again = ScriptedLLM(script)
    more = tune(out, docs, again, embed_model, weights=(0.0, 0.25, 0.5, 0.75, 0.9), top_ns=(1, 2, 3, 5))
    assert again.prompts == []
    assert len((out / "judged.jsonl").read_text().splitlines()) == 8  # recorded once: latencies stay the first run's
    assert len(more.tune_scores) == 1 + 5
    assert more.stats["metrics"][NDCG] == result.stats["metrics"][NDCG]


def test_a_new_k_costs_only_its_own_windows(tmp_path, docs, embed_model):
    out = tmp_path / "out"
    tune(out, docs, ScriptedLLM(script), embed_model)
    llm = ScriptedLLM(script)
    result = tune(out, docs, llm, embed_model, top_ks=(5, 10))
    assert calls(llm, "questions") == 0
    tune_calls = 4 * 1  # K=10 in windows of 5: the first window of each tune question is K=5's, judged already
    held_calls = 0 if result.chosen.setting.k == 5 else 4 * 1
    assert calls(llm, "rerank") == tune_calls + held_calls


def test_the_sweep_scores_each_weight_from_the_same_judgements_and_picks_the_best():
    """The answer is 3rd in retrieval order and the judge labels it alone 'very likely': w=0 puts it first."""
    question = qs.Question("q1", "t", {"c": 1})
    judged = {"q1": sweep.Judged("q1", [
        {"node": n, "unit": n, "retrieval_score": 0.9 - i / 10, "score": 1.0 if n == "c" else 0.0, "label": "x"}
        for i, n in enumerate("abcde")
    ])}  # fmt: skip
    first = sweep.score(sweep.Setting(5, None, None), judged, [question], [1, 3])
    rows = [sweep.score(sweep.Setting(5, 5, w), judged, [question], [1, 3]) for w in (0.0, 0.5, 0.9)]
    assert first.mean(MRR) == pytest.approx(1 / 3) and first.mean(recall_key(1)) == 0
    assert [r.mean(MRR) for r in rows] == [1.0, 1.0, pytest.approx(1 / 3)]  # at 0.5, 0.5 * 1 + 0.5 * 0.5 still wins
    assert sweep.choose(rows).setting.weight == 0.5  # a tie goes to more weight on the first stage
    assert sweep.choose_n(rows[0], [1, 3]) == 1


def test_with_a_judge_that_knows_the_answer_the_held_out_check_finds_it_first(tmp_path, docs, embed_model):
    result = tune(tmp_path / "out", docs, ScriptedLLM(script), embed_model)
    by_name = {s.setting.name: s for s in result.tune_scores}
    assert by_name["K=5 window=5 w=0"].mean(MRR) == 1.0
    assert result.held_chosen.mean(MRR) == 1.0 and result.stats["metrics"][MRR]["reranked"] == 1.0
    assert result.top_n == 1  # Recall@1 is already 1: no need for more passages


def test_the_budget_bounds_the_questions_and_skips_the_pairs_that_would_not_fit_but_keeps_the_first_and_the_held_out_check(
    tmp_path, docs, embed_model, monkeypatch
):
    clock = iter(range(0, 10_000, 100))  # every reading is 100 s later: the first pair's pace is far over a 1-minute budget
    monkeypatch.setattr(run, "clock", lambda: float(next(clock)))
    llm = ScriptedLLM(script)
    result = tune(tmp_path / "out", docs, llm, embed_model, top_ks=(5, 10), budget_minutes=1)
    assert len(result.plan.questions) == qs.MIN_QUESTIONS and result.plan.dropped["over budget"] == 8 - qs.MIN_QUESTIONS
    assert result.skipped == [(10, 5)]
    assert result.chosen.setting.k == 5
    assert calls(llm, "rerank") == qs.MIN_QUESTIONS  # two tune questions at K=5, two held out


def test_too_few_questions_is_an_error_that_says_what_to_do(tmp_path, embed_model):
    docs = write_docs(tmp_path / "docs", count=3)
    with pytest.raises(LlamaRerankError, match=r"only 3 usable questions.*at least 4"):
        tune(tmp_path / "out", docs, ScriptedLLM(script), embed_model, n_queries=4)


# -- calibration ----------------------------------------------------------------------------------------------


def test_calibration_is_fitted_monotone_and_applied_without_scikit_learn_as_sklearn_would():
    from sklearn.isotonic import IsotonicRegression

    scores = [0.05, 0.1, 0.2, 0.3, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97]
    relevant = [0, 0, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1]
    fitted = calibration.fit(scores, relevant)
    model = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(scores, relevant)
    grid = [i / 50 for i in range(-5, 56)]
    assert [round(fitted(x), 9) for x in grid] == [round(float(v), 9) for v in model.predict(grid)]
    assert all(fitted(a) <= fitted(b) for a, b in zip(grid, grid[1:]))
    again = Calibration.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again == fitted


def test_calibration_is_not_fitted_on_one_class_and_refuses_a_decreasing_map():
    assert calibration.fit([0.1, 0.9], [False, False]) is None
    with pytest.raises(ValueError, match="non-decreasing"):
        Calibration((0.0, 1.0), (0.9, 0.1))


def test_ece_and_the_threshold_for_a_target_precision():
    assert calibration.ece([0.9, 0.9, 0.1, 0.1], [True, True, False, False]) == pytest.approx(0.1)
    assert calibration.ece([0.5, 0.5], [True, False]) == 0.0
    probs = [0.95, 0.9, 0.8, 0.7, 0.6, 0.3]
    rel = [True, True, False, True, False, False]
    assert calibration.threshold(probs, rel, 0.75) == 0.7  # 3 of the 4 at or above 0.7
    assert calibration.threshold(probs, rel, 1.0) == 0.9
    assert calibration.threshold([0.4], [False], 0.5) is None


def nodes_for(texts):
    return [NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=1 - i / 10) for i, t in enumerate(texts)]


def test_a_calibrated_reranker_scores_with_probabilities_and_cuts_with_min_score_as_one(tmp_path):
    llm = ScriptedLLM(lambda prompt, call: "\n".join(f"[{i}] {'very likely' if 'zorblax' in t else 'unlikely'}"
                                                     for i, t in enumerate(passages(prompt), start=1)))  # fmt: skip
    cal = Calibration((0.0, 1.0), (0.1, 0.9)).to_dict()
    reranker = CalibratedRerank(llm=llm, calibration=cal, top_n=3, min_score=0.5)
    result = reranker.postprocess_nodes(nodes_for(["the zorblax slices", "a quimble", "a frandle"]), query_str="zorblax?")
    assert [(n.node.node_id, n.score) for n in result] == [("n0", pytest.approx(0.9))]
    unfiltered = CalibratedRerank(llm=llm, calibration=cal, top_n=3)
    scores = [n.score for n in unfiltered.postprocess_nodes(nodes_for(["the zorblax", "a quimble"]), query_str="zorblax?")]
    assert scores == [pytest.approx(0.9), pytest.approx(0.1)]
    with pytest.raises(ValueError, match="normalize=False"):
        CalibratedRerank(llm=llm, calibration=cal, normalize=True)


def test_a_calibrated_reranker_never_drops_a_candidate_the_llm_failed_to_judge():
    llm = ScriptedLLM(lambda prompt, call: "I cannot help with that.")
    reranker = CalibratedRerank(llm=llm, calibration=Calibration((0.0, 1.0), (0.0, 0.2)).to_dict(), min_score=0.9, top_n=3,
                                followup_calls=0)  # fmt: skip
    assert len(reranker.postprocess_nodes(nodes_for(["a", "b"]), query_str="q")) == 2


# -- settings.json, from_settings, --settings -------------------------------------------------------------------


def test_settings_round_trip_through_from_settings(tmp_path, docs, embed_model):
    out = tmp_path / "out"
    result = tune(out, docs, ScriptedLLM(script), embed_model)
    saved = settings.read(out / "settings.json")
    assert saved["reranker"]["window_size"] == 5 and saved["reranker"]["normalize"] is False
    assert saved["top_k"] == 5 and saved["fitted_on"]["judge_model"] and saved["fitted_on"]["tune_questions"] == 4
    assert saved == result.settings
    llm = ScriptedLLM(script)
    loaded = LikelihoodRerank.from_settings(str(out / "settings.json"), llm=llm, top_n=2)
    assert isinstance(loaded, CalibratedRerank) and loaded.llm is llm and loaded.top_n == 2
    assert loaded.retrieval_weight == result.chosen.setting.weight
    assert Calibration.from_dict(loaded.calibration) == Calibration.from_dict(saved["calibration"])


def test_settings_without_a_calibration_load_a_plain_reranker_and_a_bad_file_says_so(tmp_path):
    path = tmp_path / "settings.json"
    settings.write(path, {"top_n": 4, "window_size": 7, "retrieval_weight": 0.5, "normalize": False}, 20, None, 0.8, {})
    loaded = LikelihoodRerank.from_settings(str(path))
    assert type(loaded) is LikelihoodRerank and (loaded.top_n, loaded.window_size) == (4, 7)
    (tmp_path / "other.json").write_text('{"top_n": 3}')
    with pytest.raises(LlamaRerankError, match="not a version-1 settings file"):
        LikelihoodRerank.from_settings(str(tmp_path / "other.json"))


def test_query_with_settings_uses_the_tuned_reranker_and_its_k(tmp_path, docs, embed_model, monkeypatch, capsys):
    out = tmp_path / "out"
    tune(out, docs, ScriptedLLM(script), embed_model)
    store = tmp_path / "store"
    assert cli.main(["ingest", str(docs), "--store", str(store)]) == 0
    llm = ScriptedLLM(script)
    monkeypatch.setattr("llama_rerank.pipeline.make_llm", lambda spec, **kw: llm)
    capsys.readouterr()
    assert cli.main(["query", "What does the zorblax do in the kitchen?", "--store", str(store), "--no-answer",
                     "--settings", str(out / "settings.json")]) == 0  # fmt: skip
    shown = capsys.readouterr().out
    assert len(re.findall(r"^\s*\d+ ", shown, flags=re.M)) <= 5  # K = 5 from the settings, not the default 10
    assert len(passages(llm.prompts[0])) == 5


def test_eval_with_settings_gives_the_likelihood_systems_the_tuned_options(tmp_path, monkeypatch):
    from test_eval import write_beir

    path = tmp_path / "settings.json"
    tuned = {"top_n": 3, "window_size": 2, "retrieval_weight": 0.25, "normalize": False, "min_score": 0.7}
    settings.write(path, tuned, 5, Calibration((0.0, 1.0), (0.0, 1.0)).to_dict(), 0.8, {})
    llm = ScriptedLLM(lambda prompt, call: "\n".join(f"[{i}] likely" for i in range(1, len(passages(prompt)) + 1)))
    monkeypatch.setattr("llama_rerank.pipeline.make_llm", lambda spec, **kw: llm)
    beir = write_beir(tmp_path / "tiny")
    results = tmp_path / "r.json"
    assert cli.main(["eval", str(beir), "--systems", "first-stage,likelihood", "--top-k", "4", "--settings", str(path),
                     "--store", str(tmp_path / "s"), "--json", str(results)]) == 0  # fmt: skip
    config = json.loads(results.read_text())["config"]
    assert config["likelihood_defaults"] == {"window_size": 2, "retrieval_weight": 0.25, "normalize": False}
    assert all(len(passages(p)) <= 2 for p in llm.prompts)


# -- the CLI: dry run, report ------------------------------------------------------------------------------------


def test_dry_run_counts_the_questions_and_windows_still_to_do_and_calls_nothing(tmp_path, docs, embed_model, monkeypatch, capsys):
    out = tmp_path / "out"
    llm = ScriptedLLM(script)
    monkeypatch.setattr("llama_rerank.pipeline.make_llm", lambda spec, **kw: llm)
    argv = ["tune", str(docs), "--out", str(out), "--n-queries", "8", "--top-k", "5", "--window-size", "5", "--dry-run",
            "--prices", "1,2"]  # fmt: skip
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert llm.prompts == []
    rows = {line.split("  ")[0].strip(): line.split() for line in table.splitlines()}
    assert rows["write questions"][2] == "8"
    assert rows["tune split, K=5 window=5"][-4] == "4" and rows["held-out check, K=5 window=5"][-4] == "4"
    tune(out, docs, ScriptedLLM(script), embed_model)
    assert cli.main(argv) == 0
    after = {line.split("  ")[0].strip(): line.split() for line in capsys.readouterr().out.splitlines()}
    assert after["write questions"][2] == "0" and after["tune split, K=5 window=5"][-4] == "0"
    assert llm.prompts == []


def test_the_tune_command_writes_the_report_and_settings_and_prints_the_verdict(tmp_path, docs, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr("llama_rerank.pipeline.make_llm", lambda spec, **kw: ScriptedLLM(script))
    assert cli.main(["tune", str(docs), "--out", str(out), "--n-queries", "8", "--top-k", "5", "--window-size", "5",
                     "--weights", "0,0.5", "--top-n", "1,3", "--prices", "1,2"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert text.startswith("# Should I rerank these documents?\n\n**")
    assert report.verdict.__name__ and printed.strip().splitlines()[0].startswith("**")
    for part in ("## Held-out check", "## Settings tried on the tune split", "## Calibration", "one known positive", "from_settings"):
        assert part in text
    assert (out / "settings.json").is_file() and (out / report.QUALITY_PLOT).stat().st_size > 0
    assert json.loads((out / report.RESULTS).read_text())["stats"]["cost_per_1000"] is not None


def verdict_of(gain_ci, source="synthetic: ..."):
    metric = {"first_stage": 0.5, "first_stage_ci": (0.4, 0.6), "reranked": 0.6, "reranked_ci": (0.5, 0.7), "gain": 0.1,
              "gain_ci": gain_ci, "p": {"ttest_rel": 0.01, "wilcoxon": 0.02}}  # fmt: skip
    stats = {"metrics": {NDCG: metric, MRR: metric, recall_key(3): metric}, "questions": 20, "latency_p50_s": 1.5,
             "latency_p95_s": 3.0, "llm_calls_per_1000": 2000, "prompt_tokens_per_1000": 1.2e6,
             "completion_tokens_per_1000": 3e4, "cost_per_1000": None}  # fmt: skip
    chosen = SimpleNamespace(setting=sweep.Setting(20, 10, 0.25))
    return report.verdict(SimpleNamespace(stats=stats, chosen=chosen, top_n=3, plan=SimpleNamespace(source=source)))


def test_the_verdict_says_rerank_only_when_the_gains_interval_is_above_zero():
    assert verdict_of((0.02, 0.2)).startswith("**Rerank.** On 20 held-out questions")
    assert "`top_k=20`, `top_n=3`, `window_size=10`, `retrieval_weight=0.25`" in verdict_of((0.02, 0.2))
    assert verdict_of((-0.05, 0.2)).startswith("**Keep the first stage.** Reranking's gain is not distinguishable from zero.")
    assert verdict_of((-0.2, -0.01)).startswith("**Keep the first stage.** Reranking made the order worse.")
    assert verdict_of(None).startswith("**Undecided")
    assert "lower bounds" in verdict_of((0.02, 0.2)) and "lower bounds" not in verdict_of((0.02, 0.2), source="the judged queries of x")


# -- judged questions instead of synthetic ones ----------------------------------------------------------------


def test_a_question_file_naming_documents_by_file_name_is_scored_on_those_documents(tmp_path, docs, embed_model):
    found = tmp_path / "questions.jsonl"
    found.write_text("".join(json.dumps({"query": f"What does the {g} do in the kitchen?", "relevant": [f"{i:02d}-{g}.md"]}) + "\n"
                             for i, g in enumerate(GADGETS[:6])))  # fmt: skip
    llm = ScriptedLLM(script)
    result = tune(tmp_path / "out", docs, llm, embed_model, queries=str(found))
    assert calls(llm, "questions") == 0 and "questions.jsonl" in result.plan.source
    by_name = {s.setting.name: s for s in result.tune_scores}
    assert by_name["K=5 window=5 w=0"].mean(MRR) == 1.0  # a candidate counts as relevant through its file name


def test_a_beir_folder_tunes_on_its_own_corpus_and_judged_queries(tmp_path, embed_model):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": g, "title": "", "text": DOC.format(name=g, action=a, price=1)}) + "\n"
                                                 for g, a in zip(GADGETS, ACTIONS)))  # fmt: skip
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"What does the {g} do in the kitchen?"}) + "\n"
                                                  for i, g in enumerate(GADGETS[:6])))  # fmt: skip
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{g}\t2\n" for i, g in enumerate(GADGETS[:6])))
    result = tune(tmp_path / "out", folder, ScriptedLLM(script), embed_model, queries=str(folder))
    assert len(result.plan.questions) == 6 and result.plan.questions[0].relevant == {"zorblax": 2}
    assert {s.setting.name: s for s in result.tune_scores}["K=5 window=5 w=0"].mean(NDCG) == 1.0


def test_ctrl_c_ends_the_run_keeps_what_was_judged_and_the_same_command_resumes(tmp_path, docs, monkeypatch, capsys):
    out = tmp_path / "out"
    reranks = []

    def interrupted(prompt, call):
        if QUESTION_ASK not in prompt:
            reranks.append(call)
            if len(reranks) == 6:
                return KeyboardInterrupt()
        return script(prompt, call)

    argv = ["tune", str(docs), "--out", str(out), "--n-queries", "8", "--top-k", "5", "--window-size", "5"]
    monkeypatch.setattr("llama_rerank.pipeline.make_llm", lambda spec, **kw: ScriptedLLM(interrupted))
    assert cli.main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    kept = (out / "judged.jsonl").read_text().splitlines()
    assert 1 <= len(kept) < 8 and not (out / "settings.json").exists()
    llm = ScriptedLLM(script)
    monkeypatch.setattr("llama_rerank.pipeline.make_llm", lambda spec, **kw: llm)
    assert cli.main(argv) == 0
    # windows judged but not yet recorded when Ctrl-C came are served by the judgement cache
    assert calls(llm, "questions") == 0 and calls(llm, "rerank") <= 8 - len(kept)
    judged = (out / "judged.jsonl").read_text().splitlines()
    assert len(judged) == 8 and judged[: len(kept)] == kept


def test_the_bundled_models_new_port_each_run_does_not_hide_what_the_last_run_recorded():
    from llama_index.llms.openai_like import OpenAILike

    from llama_rerank.runtime.server import local_llm

    def like(base, model="qwen"):
        return OpenAILike(api_base=base, model=model, api_key="x", is_chat_model=True)

    bundled = qs.llm_key(local_llm(api_base="http://127.0.0.1:41234/v1"))
    assert bundled == qs.llm_key(local_llm(api_base="http://127.0.0.1:9/v1"))  # another run's port; a dry run's too
    assert qs.llm_key(like("http://127.0.0.1:41234/v1")) != qs.llm_key(like("http://127.0.0.1:41235/v1"))  # not ours
    assert qs.llm_key(like("http://127.0.0.1:41234/v1")) != qs.llm_key(like("http://127.0.0.1:41234/v1", "other"))
    assert qs.llm_key(like("https://llm.example.com/v1")) != qs.llm_key(like("https://other.example.com/v1"))
