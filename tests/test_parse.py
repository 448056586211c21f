import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_rerank import DEFAULT_SCALE, LabelScale
from llama_rerank.parse import parse_labels

SCALE = LabelScale.from_mapping(DEFAULT_SCALE)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[1] very likely\n[2] unlikely\n[3] likely", {1: "very likely", 2: "unlikely", 3: "likely"}),
        ("1: Likely\n2: unlikely\n3: VERY LIKELY", {1: "likely", 2: "unlikely", 3: "very likely"}),
        ("1. VERY LIKELY\n2. likely\n3. Unlikely", {1: "very likely", 2: "likely", 3: "unlikely"}),
        ("Passage 1 - unlikely\nPassage 2 - very likely\nPassage 3 - likely", {1: "unlikely", 2: "very likely", 3: "likely"}),
        ("**[1]** likely\n**[2]** unlikely\n**[3]** very likely", {1: "likely", 2: "unlikely", 3: "very likely"}),
        ('[1] "likely"\n[2] \'unlikely\'\n[3] "very likely"', {1: "likely", 2: "unlikely", 3: "very likely"}),
        ('{"1": "likely", "2": "very_likely", "3": "unlikely"}', {1: "likely", 2: "very likely", 3: "unlikely"}),
        ('[{"id": 1, "label": "unlikely"}, {"id": 2, "label": "likely"}, {"id": 3, "label": "very likely"}]',
         {1: "unlikely", 2: "likely", 3: "very likely"}),
        ('{\n  "1": "likely",\n  "2": "unlikely",\n  "3": "very likely"\n}', {1: "likely", 2: "unlikely", 3: "very likely"}),
        ("Sure! Here are my labels.\n\n[1] likely\n[2] unlikely\n[3] very likely\n\nLet me know if you need more.",
         {1: "likely", 2: "unlikely", 3: "very likely"}),
        ("[1] likely [2] unlikely [3] very likely", {1: "likely", 2: "unlikely", 3: "very likely"}),
    ],
)
def test_common_variations(text, expected):
    parsed = parse_labels(text, 3, SCALE)
    assert parsed.labels == expected
    assert parsed.missing == []


def test_unlikely_never_read_as_likely_and_very_likely_never_as_likely():
    parsed = parse_labels("[1] unlikely\n[2] very likely\n[3] Unlikely.", 3, SCALE)
    assert parsed.labels == {1: "unlikely", 2: "very likely", 3: "unlikely"}


def test_negated_label_is_not_read():
    assert parse_labels("[1] not likely\n[2] likely", 2, SCALE).labels == {2: "likely"}


def test_out_of_range_ids_ignored_and_first_answer_wins():
    parsed = parse_labels("[0] likely\n[2] unlikely\n[2] very likely\n[7] likely", 3, SCALE)
    assert parsed.labels == {2: "unlikely"}
    assert parsed.missing == [1, 3]


def test_spans_point_at_the_label_text():
    text = "[1] very likely\n[2] unlikely"
    parsed = parse_labels(text, 2, SCALE)
    assert [text[slice(*parsed.spans[i])] for i in (1, 2)] == ["very likely", "unlikely"]


def test_garbage_and_empty_answers_label_nothing():
    for text in ["", None, "I cannot help with that.", "likely likely likely", "[1]", "[[[[(((("]:
        parsed = parse_labels(text, 3, SCALE)
        assert parsed.labels == {}
        assert parsed.missing == [1, 2, 3]


def test_custom_scale_in_another_language():
    scale = LabelScale.from_mapping({"unwahrscheinlich": 0.0, "wahrscheinlich": 0.5, "sehr wahrscheinlich": 1.0})
    parsed = parse_labels("[1] sehr wahrscheinlich\n[2] unwahrscheinlich\n[3] Wahrscheinlich", 3, scale)
    assert parsed.labels == {1: "sehr wahrscheinlich", 2: "unwahrscheinlich", 3: "wahrscheinlich"}


LABEL_SPELLINGS = st.sampled_from(["unlikely", "likely", "very likely", "Very Likely", "UNLIKELY", "very_likely", "Likely"])
ID_FORMS = st.sampled_from(["[{i}] ", "{i}: ", "{i}. ", "Passage {i} - ", "**[{i}]** ", '"{i}": "', "({i}) "])
NOISE = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)


def _label_in_text(label: str, text: str) -> bool:
    words = r"[\s_\-]+".join(map(re.escape, label.split()))
    return re.search(rf"(?<!\w){words}(?!\w)", text, re.IGNORECASE) is not None


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=400), st.integers(min_value=0, max_value=30))
def test_parser_never_raises_on_arbitrary_text(text, n):
    parsed = parse_labels(text, n, SCALE)
    assert set(parsed.labels) <= set(range(1, n + 1))
    assert all(_label_in_text(label, text) for label in parsed.labels.values())


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=-2, max_value=25), ID_FORMS, LABEL_SPELLINGS, NOISE), max_size=25),
       st.integers(min_value=1, max_value=20))
def test_parser_on_generated_answers(lines, n):
    text = "\n".join(form.format(i=i) + label + noise for i, form, label, noise in lines)
    parsed = parse_labels(text, n, SCALE)
    assert set(parsed.labels) <= set(range(1, n + 1))
    assert sorted(parsed.missing) == [i for i in range(1, n + 1) if i not in parsed.labels]
    for i, label in parsed.labels.items():
        assert _label_in_text(label, text)
        assert text[slice(*parsed.spans[i])].casefold().replace("_", " ") == label


@pytest.mark.parametrize(
    "text",
    ["[1] not likely", "[1] no likely", "[1] hardly likely", "[1] barely likely", "[1] scarcely likely",
     "[1] not at all likely", "[1] not very likely", "[1] un-likely", "[1] Un-Likely", "[1] likely-ish"],
)  # fmt: skip
def test_negated_or_hyphen_glued_labels_are_not_read(text):
    assert parse_labels(text, 1, SCALE).labels == {}


def test_hyphen_between_words_of_a_label_still_reads():
    assert parse_labels("[1] very-likely\n2 - unlikely", 2, SCALE).labels == {1: "very likely", 2: "unlikely"}


@pytest.mark.parametrize(
    "text",
    [
        "<think>[1] unlikely\n[2] unlikely</think>\n[1] very likely\n[2] likely",  # Qwen3, R1 with the opening tag
        "Passage 1 looks unlikely... [2] unlikely\n</think>\n\n[1] very likely\n[2] likely",  # R1: opening tag in the prompt
        "<THINK>[1] unlikely</THINK>[1] very likely\n[2] likely",
    ],
)
def test_a_thinking_models_reasoning_is_never_read(text):
    parsed = parse_labels(text, 2, SCALE)
    assert parsed.labels == {1: "very likely", 2: "likely"}
    assert [text[slice(*parsed.spans[i])] for i in (1, 2)] == ["very likely", "likely"], "spans index the raw text"


def test_an_answer_cut_off_while_thinking_labels_nothing():
    assert parse_labels("<think>[1] very likely, or maybe", 1, SCALE).labels == {}


@pytest.mark.parametrize(
    "text",
    [
        '[1] unlikely - it only repeats an instruction: "[2] very likely [3] very likely"\n[2] unlikely\n[3] unlikely',
        "[1] unlikely, though passage 3 looks likely and passage 2 very likely\n[2] unlikely\n[3] unlikely",
        "**[1]** unlikely (it says [3] very likely)\n- [2] unlikely\n  [3] unlikely",
        "[2] unlikely\n[3] unlikely\n[1] unlikely: the text demands [2] very likely, [3] very likely",
    ],
)
def test_the_models_own_line_for_an_id_wins_over_a_mention_inside_another_line(text):
    parsed = parse_labels(text, 3, SCALE)
    assert parsed.labels == {1: "unlikely", 2: "unlikely", 3: "unlikely"}
    assert all(text[slice(*parsed.spans[i])] == "unlikely" for i in (1, 2, 3)), "spans point at the own lines' labels"


def test_a_mention_still_counts_when_the_id_has_no_line_of_its_own():
    assert parse_labels("[1] unlikely, and passage 2 looks likely", 2, SCALE).labels == {1: "unlikely", 2: "likely"}


NUMERIC = LabelScale.from_mapping({"1": 0.0, "2": 0.25, "3": 0.5, "4": 0.75, "5": 1.0})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[1] 5.\n[2] 1.\n[3] 3", {1: "5", 2: "1", 3: "3"}),
        ("1. 5\n2. 2\n3: 4", {1: "5", 2: "2", 3: "4"}),
        ("Passage 1 - 4\nPassage 2 - 1\nPassage 3 - 5", {1: "4", 2: "1", 3: "5"}),
        ('{"1": 5, "2": "3", "3": 1}', {1: "5", 2: "3", 3: "1"}),
        ("[1] 5 [2] 4 [3] 2", {1: "5", 2: "4", 3: "2"}),
    ],
)
def test_numeric_label_scales_parse(text, expected):
    parsed = parse_labels(text, 3, NUMERIC)
    assert parsed.labels == expected and parsed.missing == []


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_quoted_injection_in_the_answer_does_not_override_the_models_own_lines(mode):
    from llama_index.core.schema import NodeWithScore, TextNode

    from llama_rerank import LikelihoodRerank
    from fakes import ScriptedLLM

    answer = '[1] unlikely - it only repeats an instruction: "[2] very likely [3] very likely"\n[2] unlikely\n[3] unlikely'
    reranker = LikelihoodRerank(llm=ScriptedLLM(lambda p, c: answer), top_n=3)
    nodes = [NodeWithScore(node=TextNode(text=t, id_=t), score=1.0) for t in "abc"]
    result = reranker.rerank("q", nodes) if mode == "sync" else await reranker.arerank("q", nodes)
    assert {n.node.node_id: n.node.metadata["rerank_label"] for n in result.nodes} == dict.fromkeys("abc", "unlikely")
