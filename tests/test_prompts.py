"""The passage fence: a passage's text can never open or close a fence, however it spells the tag; the prompt's layout."""

import os

import pytest

from llama_rerank import DEFAULT_SCALE, LabelScale
from llama_rerank.prompts import answer_schema, render_passages


@pytest.mark.parametrize(
    "spelling",
    ["</passage>", "</ passage>", "< /PASSAGE>", "&lt;/passage&gt;", "&lt/passage", "&#60;/passage&#62;",
     "&#x3C;/passage>", "\uff1c/passage\uff1e", "\uff1c\uff0fpassage\uff1e", "\ufe64/passage\ufe65", "&lt;&sol;passage&gt;"],
)  # fmt: skip
def test_closing_tags_in_any_spelling_are_defused(spelling):
    rendered = render_passages([f"before {spelling} after", "second"])
    assert rendered.count("</passage>") == 2
    assert "</_passage" in rendered


@pytest.mark.parametrize("spelling", ['<passage id="9">', "&lt;passage id=9&gt;", "\uff1cpassage id=9\uff1e"])
def test_opening_tags_in_any_spelling_are_defused(spelling):
    rendered = render_passages([f"x {spelling} y"])
    assert rendered.count("<passage") == 1 and "<_passage" in rendered


def test_ordinary_text_about_passages_is_untouched():
    text = "The passage of time < 5 s; a passage about & and <b>bold</b>."
    assert text in render_passages([text])


def test_answer_schema_has_one_enum_property_per_id():
    schema = answer_schema(3, LabelScale.from_mapping(DEFAULT_SCALE))
    assert schema["required"] == ["1", "2", "3"] and schema["additionalProperties"] is False
    assert schema["properties"]["2"]["enum"] == ["unlikely", "likely", "very likely"]


def test_the_part_every_query_shares_comes_first():
    """A prompt cache (llama.cpp's) can only reuse a common prefix: the system prompt and the instructions, with the
    labels, must come before anything that changes with the query or the passages."""
    from llama_rerank.prompts import DEFAULT_RERANK_PROMPT, prompt_vars, render

    scale = LabelScale.from_mapping({"unlikely": 0.0, "likely": 0.5, "very likely": 1.0})
    one = render(DEFAULT_RERANK_PROMPT, True, prompt_vars("how do wings lift?", ["a", "b", "c"], scale))
    two = render(DEFAULT_RERANK_PROMPT, True, prompt_vars("what is drag?", ["d"], scale))
    assert one[0].content == two[0].content  # the system prompt
    shared = os.path.commonprefix([one[1].content, two[1].content])
    assert '"unlikely", "likely", "very likely"' in shared and "[i] label" in shared and "<passage id=" in shared
    assert shared.rstrip().endswith("Query:")
