"""Reading labels out of an LLM's answer: text -> ``{id: (label, span)}``. Pure, and it never raises.

Only the LLM's answer is parsed, never the passages, and ids are the window's own numbering, so a passage that
imitates the answer format cannot change the result. Accepted (one label per id marker, at most 80 characters after it, prose around
it ignored, JSON too): ``[3] very likely``, ``3: Likely``, ``3. VERY LIKELY``, ``Passage 3 - unlikely``, ``**[3]** likely``,
``[3] "likely"``, ``{"3": "likely"}``, ``[{"id": 3, "label": "likely"}]``. Labels match whole words, longest
first, so ``unlikely`` is never read as ``likely`` and ``very likely`` never as ``likely``; a label right after
"not"/"no"/"never"/"hardly"/"barely"/"scarcely" (also "not at all", "not very") or glued to a prefix by a hyphen
(``un-likely``) is not read at all. Ids outside 1..n are ignored. When an id is answered more than once, its own
line wins (a line that starts with its marker, after white space or markdown such as ``**`` or ``-``) over a
mention inside another line, such as a quoted passage or prose ("[1] unlikely - it repeats "[2] very likely"");
among answers of the same kind the first wins. Labels that look like ids work too (a scale ``"1".."5"``:
``[1] 5.`` reads label ``5``): right after an id marker, a label is read before another id.
A thinking model's reasoning (``<think>...</think>``, or everything before a lone ``</think>``) is never read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llama_rerank.labels import LabelScale, normalise_label

_ID = (
    r"\[\s*(?P<a>\d{1,4})\s*\]"  # [3]
    r"|\(\s*(?P<b>\d{1,4})\s*\)"  # (3)
    r"|\b(?:passage|document|doc|candidate|item|id)\b\W{0,4}(?P<c>\d{1,4})\b"  # Passage 3, "id": 3, Doc #3
    r"|#\s*(?P<d>\d{1,4})\b"  # #3
    r"|\"(?P<e>\d{1,4})\"\s*:"  # "3":
    r"|(?<![\w.,])(?P<f>\d{1,4})\s*(?:[:)\-\u2013\u2014=]|\.(?!\d))"  # 3: 3. 3) 3 -
)
_NEGATION = re.compile(
    r"\b(?:not|no|never|hardly|barely|scarcely)(?:\W+(?:at\W+all|very|so|too|that|really|particularly))*\W*$",
    re.IGNORECASE,
)
_REASONING = re.compile(r"^.*</think>|<think>(?:(?!</think>).)*$", re.IGNORECASE | re.DOTALL)
_MAX_GAP = 80  # characters allowed between an id marker and its label
_DECORATION = " \t\r*_>|{,\u2022-"  # what may come before a marker at the start of its own line (markdown, JSON)


@dataclass
class ParsedAnswer:
    """What was read from one answer: label and character span per id, and which ids stayed unlabelled."""

    labels: dict[int, str] = field(default_factory=dict)
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)


def _label_pattern(scale: LabelScale) -> str:
    alternatives = sorted(scale.labels, key=len, reverse=True)
    words = [r"[\s_\-]+".join(re.escape(w) for w in label.split()) for label in alternatives]
    return r"(?<!\w)(?<!\w-)(?P<label>" + "|".join(words) + r")(?!\w)(?!-\w)"


_PATTERNS: dict[LabelScale, tuple[re.Pattern[str], re.Pattern[str]]] = {}


def _patterns(scale: LabelScale) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """An id marker or a label, preferring the marker; and the same preferring the label (used right after a marker)."""
    if scale not in _PATTERNS:
        label = _label_pattern(scale)
        _PATTERNS[scale] = (re.compile(rf"{_ID}|{label}", re.IGNORECASE), re.compile(rf"{label}|{_ID}", re.IGNORECASE))
    return _PATTERNS[scale]


def answer_part(text: str | None) -> str:
    """``text`` with a thinking model's reasoning blanked out by spaces, so offsets into ``text`` stay valid."""
    return _REASONING.sub(lambda m: " " * len(m.group(0)), text or "")


def _starts_line(text: str, start: int) -> bool:
    """Whether only white space and markdown come before ``start`` on its line (reads back at most that far)."""
    while start > 0 and text[start - 1] in _DECORATION:
        start -= 1
    return start == 0 or text[start - 1] == "\n"


def parse_labels(text: str | None, n: int, scale: LabelScale) -> ParsedAnswer:
    """Read one label per id 1..n from ``text``; never raises, never invents a label the text does not contain."""
    text = answer_part(text)
    id_first, label_first = _patterns(scale)
    found: dict[int, tuple[bool, str, tuple[int, int]]] = {}  # id -> (on its own line, label, span)
    current: int | None = None
    own_line = False
    current_end = position = 0
    while (match := (id_first if current is None else label_first).search(text, position)) is not None:
        position = max(match.end(), position + 1)
        if match.group("label") is None:
            current = int(next(g for g in match.group("a", "b", "c", "d", "e", "f") if g is not None))
            own_line = _starts_line(text, match.start())
            current_end = match.end()
            continue
        between = text[current_end : match.start()]
        if current is not None and 1 <= current <= n and len(between) <= _MAX_GAP and not _NEGATION.search(between):
            if current not in found or (own_line and not found[current][0]):
                span = (match.start("label"), match.end("label"))
                found[current] = (own_line, normalise_label(match.group("label")), span)
        current = None
    result = ParsedAnswer()
    for i in sorted(found):
        result.labels[i], result.spans[i] = found[i][1], found[i][2]
    result.missing = [i for i in range(1, n + 1) if i not in found]
    return result
