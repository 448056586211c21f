"""Reading labels out of an LLM's answer: text -> ``{id: (label, span)}``. Pure, and it never raises.

Only the LLM's answer is parsed, never the passages, and ids are the window's own numbering, so a passage that
imitates the answer format cannot change the result. Accepted (one label per id marker, at most 80 characters after it, prose around
it ignored, JSON too): ``[3] very likely``, ``3: Likely``, ``3. VERY LIKELY``, ``Passage 3 - unlikely``, ``**[3]** likely``,
``[3] "likely"``, ``{"3": "likely"}``, ``[{"id": 3, "label": "likely"}]``. Labels match whole words, longest
first, so ``unlikely`` is never read as ``likely`` and ``very likely`` never as ``likely``; a label right after
"not"/"no"/"never"/"hardly"/"barely"/"scarcely" (also "not at all", "not very") or glued to a prefix by a hyphen
(``un-likely``) is not read at all. Ids outside 1..n are ignored; when an id appears twice the first answer wins.
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


_PATTERNS: dict[LabelScale, re.Pattern[str]] = {}


def _pattern(scale: LabelScale) -> re.Pattern[str]:
    if scale not in _PATTERNS:
        _PATTERNS[scale] = re.compile(rf"{_ID}|{_label_pattern(scale)}", re.IGNORECASE)
    return _PATTERNS[scale]


def answer_part(text: str | None) -> str:
    """``text`` with a thinking model's reasoning blanked out by spaces, so offsets into ``text`` stay valid."""
    return _REASONING.sub(lambda m: " " * len(m.group(0)), text or "")


def parse_labels(text: str | None, n: int, scale: LabelScale) -> ParsedAnswer:
    """Read one label per id 1..n from ``text``; never raises, never invents a label the text does not contain."""
    text = answer_part(text)
    result = ParsedAnswer()
    current: int | None = None
    current_end = 0
    for match in _pattern(scale).finditer(text or ""):
        if match.group("label") is None:
            current = int(next(g for g in match.group("a", "b", "c", "d", "e", "f") if g is not None))
            current_end = match.end()
        else:
            between = (text or "")[current_end : match.start()]
            if current is not None and len(between) <= _MAX_GAP and not _NEGATION.search(between):
                if 1 <= current <= n and current not in result.labels:
                    result.labels[current] = normalise_label(match.group("label"))
                    result.spans[current] = (match.start("label"), match.end("label"))
            current = None
    result.missing = [i for i in range(1, n + 1) if i not in result.labels]
    return result
