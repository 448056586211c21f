import pytest

from llama_rerank import DEFAULT_SCALE, LabelScale, LikelihoodRerank, ScaleError
from fakes import ScriptedLLM


def test_default_scale_values():
    scale = LabelScale.from_mapping(DEFAULT_SCALE)
    assert scale.labels == ("unlikely", "likely", "very likely")
    assert [scale.score(x) for x in scale.labels] == [0.0, 0.5, 1.0]
    assert scale.score("Very_Likely") == 1.0
    assert scale.neutral == 0.5


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"likely": 0.0, "Likely": 1.0}, "distinct"),
        ({"": 0.0, "yes": 1.0}, "empty"),
        ({"no": -0.1, "yes": 1.0}, r"\[0, 1\]"),
        ({"no": 0.0, "yes": 1.5}, r"\[0, 1\]"),
        ({"yes": 1.0}, "at least two"),
    ],
)
def test_malformed_scales_rejected_with_clear_message(mapping, message):
    with pytest.raises(ScaleError, match=message):
        LabelScale.from_mapping(mapping)
    with pytest.raises((ScaleError, ValueError), match=message):
        LikelihoodRerank(llm=ScriptedLLM(lambda p, c: ""), label_scale=mapping)


def test_custom_scales_four_levels_other_language_and_list_form():
    four = LabelScale.from_mapping({"irrelevant": 0.0, "marginal": 0.3, "relevant": 0.7, "perfect": 1.0})
    assert four.score("marginal") == 0.3
    german = LabelScale.from_mapping(["unwahrscheinlich", "wahrscheinlich", "sehr wahrscheinlich"])
    assert german.values == (0.0, 0.5, 1.0)
    best_first = LabelScale.from_mapping({"yes": 1.0, "no": 0.0})
    assert best_first.labels == ("no", "yes")


def test_expected_score_renormalises():
    scale = LabelScale.from_mapping(DEFAULT_SCALE)
    assert scale.expected_score({"likely": 0.2, "very likely": 0.2}) == pytest.approx(0.75)
    assert scale.expected_score({}) is None


def test_min_label_must_be_on_the_scale():
    with pytest.raises(ValueError, match="not on the label scale"):
        LikelihoodRerank(llm=ScriptedLLM(lambda p, c: ""), min_label="maybe")


# finite numbers only ----------------------------------------------------------------------------------------------

import math  # noqa: E402

from llama_index.core.base.llms.types import LogProb  # noqa: E402
from llama_index.core.schema import NodeWithScore, TextNode  # noqa: E402

from fakes import Reply  # noqa: E402


def _nodes(scores):
    return [NodeWithScore(node=TextNode(text=f"passage {i}", id_=f"n{i}"), score=s) for i, s in enumerate(scores)]


async def _rerank(reranker, nodes, mode):
    return reranker.rerank("q", nodes) if mode == "sync" else await reranker.arerank("q", nodes)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_nan_and_infinite_retrieval_scores_count_as_the_lowest(mode):
    """retrieval_signal="score": every final score is finite and the order follows it; a non-finite score gets the
    lowest signal (0, like the lowest finite score: ties keep retrieval order)."""
    llm = ScriptedLLM(lambda p, c: "\n".join(f"[{i}] likely" for i in range(1, 7)))
    scores = [math.nan, 0.9, math.inf, 0.5, -math.inf, 0.7]
    reranker = LikelihoodRerank(llm=llm, top_n=6, retrieval_weight=0.5, retrieval_signal="score")
    result = await _rerank(reranker, _nodes(scores), mode)
    final = [n.score for n in result.nodes]
    assert all(math.isfinite(s) for s in final) and final == sorted(final, reverse=True)
    assert [n.node.node_id for n in result.nodes] == ["n1", "n5", "n0", "n2", "n3", "n4"]
    assert final == pytest.approx([0.5 * 0.5 + 0.5 * 1.0, 0.5 * 0.5 + 0.5 * 0.5] + [0.5 * 0.5] * 4)
    assert all(math.isfinite(n.node.metadata["rerank_score"]) for n in result.nodes)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_nan_or_infinite_logprob_falls_back_to_the_label_value(mode):
    """At each label the alternatives' logprobs: ordinary; NaN; +inf; above 0 (a rounding slip: counts as 0)."""
    label_logprobs = [
        {" likely": -0.2, " very": -2.0, " unlikely": -3.0},
        {" likely": math.nan, " very": -1.0},
        {" likely": -0.1, " very": math.inf},
        {" likely": 1000.0, " very": -1.0},
    ]
    text = "\n".join(f"[{i}] likely" for i in range(1, 5))
    logprobs = []
    for i, alternatives in enumerate(label_logprobs, start=1):
        logprobs.append([LogProb(token=("\n" if i > 1 else "") + f"[{i}]", logprob=0.0)])
        logprobs.append([LogProb(token=t, logprob=lp) for t, lp in alternatives.items()])
    llm = ScriptedLLM(lambda p, c: Reply(text, logprobs))
    result = await _rerank(LikelihoodRerank(llm=llm, top_n=4), _nodes([0.9, 0.8, 0.7, 0.6]), mode)
    score = {n.node.node_id: n.score for n in result.nodes}
    assert all(math.isfinite(s) for s in score.values())
    assert score["n1"] == score["n2"] == 0.5, "a broken distribution gives the label's value"
    assert 0.5 < score["n0"] < 1 and 0.5 < score["n3"] < 1 and result.usage.logprob_scored == 2
    assert [n.score for n in result.nodes] == sorted(score.values(), reverse=True)
