"""The passage fence: a passage's text can never open or close a fence, however it spells the tag."""

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
