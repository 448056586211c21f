"""The likelihood label scale: ordered label names, their scores, and the score expected from label probabilities."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from llama_rerank.errors import ScaleError

DEFAULT_SCALE: dict[str, float] = {"unlikely": 0.0, "likely": 0.5, "very likely": 1.0}


def normalise_label(text: str) -> str:
    """Lower-case, treat ``_``/``-`` as spaces and collapse white space: ``"Very_Likely"`` -> ``"very likely"``."""
    return " ".join(re.sub(r"[_\-]", " ", text).casefold().split())


@dataclass(frozen=True)
class LabelScale:
    """An ordered scale of labels with a score in [0, 1] for each, kept sorted worst first.

    >>> LabelScale.from_mapping({"no": 0.0, "maybe": 0.5, "yes": 1.0}).score("maybe")
    0.5
    """

    labels: tuple[str, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.values):
            raise ScaleError("a label scale needs exactly one value per label")
        if len(self.labels) < 2:
            raise ScaleError(f"a label scale needs at least two labels, got {list(self.labels)}")
        names = [normalise_label(label) for label in self.labels]
        if any(not name for name in names):
            raise ScaleError(f"label names must not be empty, got {list(self.labels)}")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ScaleError(f"label names must be distinct (ignoring case, '-', '_'), repeated: {duplicates}")
        bad = [(label, value) for label, value in zip(self.labels, self.values) if not 0.0 <= value <= 1.0]
        if bad:
            raise ScaleError(f"label values must lie in [0, 1], got {bad}")
        ordered = sorted(zip(names, self.values), key=lambda pair: pair[1])
        object.__setattr__(self, "labels", tuple(name for name, _ in ordered))
        object.__setattr__(self, "values", tuple(float(value) for _, value in ordered))

    @classmethod
    def from_mapping(cls, scale: Mapping[str, float] | Sequence[str]) -> "LabelScale":
        """Build from ``{label: value}`` or from a list of labels, worst first, spread evenly over [0, 1]."""
        if isinstance(scale, Mapping):
            return cls(tuple(scale), tuple(float(v) for v in scale.values()))
        labels = tuple(scale)
        if isinstance(scale, str) or len(labels) < 2:
            raise ScaleError(f"a label scale needs at least two labels, got {scale!r}")
        return cls(labels, tuple(i / (len(labels) - 1) for i in range(len(labels))))

    def score(self, label: str) -> float:
        """The value of ``label`` (any spelling :func:`normalise_label` accepts)."""
        return self.values[self.labels.index(normalise_label(label))]

    @property
    def neutral(self) -> float:
        """The score given to a candidate the LLM never labelled: the middle of the scale's range."""
        return (self.values[0] + self.values[-1]) / 2

    def expected_score(self, probabilities: Mapping[str, float]) -> float | None:
        """Expected value of the scale under ``{label: probability}``, renormalised; ``None`` if all are zero."""
        total = sum(probabilities.values())
        if total <= 0:
            return None
        return sum(p * self.score(label) for label, p in probabilities.items()) / total

    def __str__(self) -> str:
        return ", ".join(f"{label}={value:g}" for label, value in zip(self.labels, self.values))
