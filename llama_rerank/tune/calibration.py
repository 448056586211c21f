"""Calibration: the reranker's score -> P(relevant), fitted on the tune split, applied with the base install alone.

The map is fitted with scikit-learn's ``IsotonicRegression`` (monotone, so the order it gives is the reranker's own)
on the final score of un-normalised fusion, ``(1 - w) * expected label value + w * retrieval rank signal``: with
per-query min-max normalisation the top candidate scores 1.0 whether or not anything is relevant, so a probability
could not be read from it. The map is stored as its breakpoints, plain numbers, and applied by linear interpolation
between them (clipped at the ends), which needs nothing beyond the standard library.

:class:`CalibratedRerank` is the ``LikelihoodRerank`` a settings file with a calibration loads: a node's score is
the probability, and ``min_score`` is a probability (judged candidates below it are dropped; unjudged ones, which
keep retrieval order after an LLM failure, never are). ``min_label`` still cuts on the LLM's label.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Dict, Sequence

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import QueryBundle

from llama_rerank._extras import require
from llama_rerank.postprocessor import LikelihoodRerank, RerankResult

ECE_BINS = 10


@dataclass(frozen=True)
class Calibration:
    """A monotone map from score to probability: breakpoints ``x`` (increasing) and their probabilities ``y``."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.x or len(self.x) != len(self.y):
            raise ValueError(f"a calibration needs as many probabilities as breakpoints (at least one), got {len(self.x)} and {len(self.y)}")
        if any(b < a for a, b in zip(self.x, self.x[1:])) or any(b < a for a, b in zip(self.y, self.y[1:])):
            raise ValueError("a calibration's breakpoints and probabilities must both be non-decreasing")
        if not all(0.0 <= p <= 1.0 for p in self.y):
            raise ValueError("a calibration's probabilities must lie in [0, 1]")

    def __call__(self, score: float) -> float:
        x, y = self.x, self.y
        if score <= x[0]:
            return y[0]
        if score >= x[-1]:
            return y[-1]
        i = bisect.bisect_right(x, score)
        left, right = x[i - 1], x[i]
        return y[i - 1] + (y[i] - y[i - 1]) * (score - left) / (right - left) if right > left else y[i]

    def to_dict(self) -> dict[str, Any]:
        return {"method": "isotonic", "input": "final score, un-normalised fusion", "x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        return cls(tuple(float(v) for v in data["x"]), tuple(float(v) for v in data["y"]))


def fit(scores: Sequence[float], relevant: Sequence[bool]) -> Calibration | None:
    """Isotonic regression of ``relevant`` on ``scores`` (scikit-learn, the ``eval`` extra); None when the data
    hold only one class (nothing to tell apart)."""
    if len(set(relevant)) < 2:
        return None
    isotonic = require("sklearn.isotonic", "eval")
    model = isotonic.IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    model.fit([float(s) for s in scores], [float(r) for r in relevant])
    return Calibration(tuple(float(v) for v in model.X_thresholds_), tuple(float(v) for v in model.y_thresholds_))


def reliability(probabilities: Sequence[float], relevant: Sequence[bool], bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """Per equal-width probability bin that holds any: (mean predicted probability, share relevant, count)."""
    groups: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for p, r in zip(probabilities, relevant):
        groups[min(int(p * bins), bins - 1)].append((p, r))
    return [(sum(p for p, _ in g) / len(g), sum(r for _, r in g) / len(g), len(g)) for g in groups if g]


def ece(probabilities: Sequence[float], relevant: Sequence[bool], bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean gap between predicted and observed share per bin."""
    table = reliability(probabilities, relevant, bins)
    total = sum(n for _, _, n in table)
    return sum(n * abs(p - share) for p, share, n in table) / total if total else 0.0


def threshold(probabilities: Sequence[float], relevant: Sequence[bool], target: float) -> float | None:
    """The lowest probability ``t`` such that the candidates scoring at least ``t`` are relevant at a share of at
    least ``target``; None when no threshold reaches it."""
    pairs = sorted(zip(probabilities, relevant), reverse=True)
    best, hits = None, 0
    for n, (p, r) in enumerate(pairs, start=1):
        hits += r
        if (n == len(pairs) or pairs[n][0] < p) and hits / n >= target:
            best = p
    return best


class CalibratedRerank(LikelihoodRerank):
    """``LikelihoodRerank`` whose scores are calibrated probabilities (see the module docstring)."""

    calibration: Dict[str, Any] = Field(description="The fitted map: Calibration.to_dict() (breakpoints x, probabilities y).")
    _map: Calibration | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "CalibratedLikelihoodRerank"

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        if self.normalize:
            raise ValueError("a calibration reads un-normalised scores: use normalize=False with it")
        self._map = Calibration.from_dict(self.calibration)

    def _cutoff(self) -> float | None:
        """Only ``min_label`` cuts on the LLM's score here; ``min_score`` is a probability, applied after calibration."""
        return None if self.min_label is None else self.scale.score(self.min_label)

    def _calibrated(self, result: RerankResult) -> RerankResult:
        for node in result.nodes:
            node.score = self._map(node.score or 0.0)
        if self.min_score is not None:
            result.nodes = [n for n in result.nodes if n.node.metadata["rerank_label"] is None or n.score >= self.min_score]
        return result

    def rerank(self, query: str | QueryBundle, nodes: Sequence[Any]) -> RerankResult:
        return self._calibrated(super().rerank(query, nodes))

    async def arerank(self, query: str | QueryBundle, nodes: Sequence[Any]) -> RerankResult:
        return self._calibrated(await super().arerank(query, nodes))
