"""From labels and log-probabilities to scores, and from scores to the final order.

With logprobs, a candidate's score is the expected value of the scale under the label distribution read at the
token where its label starts (the top alternatives there, renormalised over those that begin a label); without
them, or when the tokens cannot be aligned with the text, it is the label's value. A reversed second pass is
averaged in; fusion mixes in the first-stage signal. Order is by final score, ties keep retrieval order; unjudged
candidates (label ``None``) are never cut by ``min_score``.

Only finite numbers come out: a label position whose logprobs include NaN or +inf gives no distribution (that
candidate gets its label's value), a logprob above 0 counts as 0 and -inf as probability 0; with
``retrieval_signal="score"`` a NaN or infinite retrieval score counts as the lowest.
"""

from __future__ import annotations

import math
from typing import Sequence

from llama_index.core.base.llms.types import LogProb

from llama_rerank.labels import LabelScale
from llama_rerank.types import Candidate, Judgement


def _token_bytes(logprob: LogProb) -> bytes:
    return bytes(logprob.bytes) if logprob.bytes else logprob.token.encode("utf-8")


def align_tokens(text: str, logprobs: Sequence[Sequence[LogProb]]) -> list[tuple[int, Sequence[LogProb]]] | None:
    """Byte offset at which each token position starts, or ``None`` if the tokens do not spell out ``text``.

    The sampled token is whichever of the position's alternatives continues the text (the first one at
    temperature 0); a position with none that does means the logprobs belong to other text.
    """
    data = text.encode("utf-8")
    offset = 0
    positions = []
    for alternatives in logprobs:
        for alternative in alternatives:
            token = _token_bytes(alternative)
            if data.startswith(token, offset):  # an empty token (end of text) takes no bytes
                positions.append((offset, alternatives))
                offset += len(token)
                break
        else:
            return None
    return positions if offset == len(data) else None


def _first_word(token: str) -> str:
    return token.strip().lstrip("\"'*`[(:").casefold()


def label_probabilities(
    text: str, aligned: list[tuple[int, Sequence[LogProb]]], start: int, scale: LabelScale
) -> dict[str, float] | None:
    """The probability of each label at the label starting at character ``start`` of ``text``.

    An alternative token counts for a label when the label begins with it (``"very"`` for "very likely",
    ``"un"`` for "unlikely"); one that could begin several labels is shared between them equally.
    """
    byte_start = len(text[:start].encode("utf-8"))
    position = None
    for offset, alternatives in aligned:
        if offset > byte_start:
            break
        position = alternatives
    if position is None:
        return None
    if any(math.isnan(a.logprob) or a.logprob == math.inf for a in position):
        return None  # a broken distribution: the label's value is the better guess
    mass: dict[str, float] = {}
    for alternative in position:
        word = _first_word(alternative.token)
        matches = [label for label in scale.labels if word and label.startswith(word)]
        for label in matches:
            mass[label] = mass.get(label, 0.0) + math.exp(min(alternative.logprob, 0.0)) / len(matches)
    return mass or None


def average_passes(first: dict[int, Judgement], second: dict[int, Judgement]) -> dict[int, Judgement]:
    """Merge two passes over the same candidates (forward and reversed order) to cancel the LLM's position bias.

    A candidate labelled in both passes gets the mean score (and the first pass's label); one labelled in only one
    pass keeps that pass's judgement; one labelled in neither keeps the first pass's (neutral) judgement.
    """
    merged = dict(first)
    for index, other in second.items():
        mine = first.get(index)
        if mine is None or (mine.label is None and other.label is not None):
            merged[index] = other
        elif mine.label is not None and other.label is not None:
            merged[index] = Judgement(mine.label, (mine.score + other.score) / 2, mine.status)
    return merged


def retrieval_signal(candidates: Sequence[Candidate], kind: str) -> dict[int, float]:
    """First-stage evidence in [0, 1]: min-max normalised retrieval score (``"score"``) or rank (``"rank"``, 1 first).

    ``"score"`` falls back to rank when a candidate has no retrieval score or the finite scores are all equal; a NaN
    or infinite score counts as the lowest (0).
    """
    scores = {c.index: c.retrieval_score for c in candidates}
    finite = [s for s in scores.values() if s is not None and math.isfinite(s)]
    if kind == "score" and None not in scores.values() and finite and max(finite) > min(finite):
        low, high = min(finite) / 2, max(finite) / 2  # halves: the span cannot overflow, even near the float limit
        return {i: (s / 2 - low) / (high - low) if math.isfinite(s) else 0.0  # type: ignore[arg-type, operator]
                for i, s in scores.items()}  # fmt: skip
    last = max(len(candidates) - 1, 1)
    return {c.index: 1.0 - i / last for i, c in enumerate(candidates)}


def fuse(
    candidates: Sequence[Candidate], judgements: dict[int, Judgement], weight: float, kind: str, normalize: bool = False
) -> dict[int, float]:
    """Final scores: ``(1 - weight) * LLM score + weight * retrieval signal`` (the LLM score alone at weight 0).

    With ``normalize`` the LLM scores are min-max normalised over the query's candidates first, so that a weight
    means the same on a query whose LLM scores span 0.40-0.45 as on one whose scores span 0-1.
    """
    llm = {c.index: judgements[c.index].score for c in candidates}
    if normalize and llm and max(llm.values()) > min(llm.values()):
        low, high = min(llm.values()), max(llm.values())
        llm = {index: (score - low) / (high - low) for index, score in llm.items()}
    signal = retrieval_signal(candidates, kind) if weight else {}
    return {c.index: (1 - weight) * llm[c.index] + weight * signal.get(c.index, 0.0) for c in candidates}


def order(
    candidates: Sequence[Candidate], judgements: dict[int, Judgement], final: dict[int, float], min_score: float | None
) -> list[Candidate]:
    """Best first by final score (ties by retrieval order); the cutoff reads the LLM's score, never drops unjudged."""
    kept = [
        c
        for c in candidates
        if min_score is None or judgements[c.index].label is None or judgements[c.index].score >= min_score
    ]
    return sorted(kept, key=lambda c: (-final[c.index], c.index))
