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
