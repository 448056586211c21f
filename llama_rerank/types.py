"""Plain data passed between the reranker's stages: candidates, judgements and per-query usage."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Candidate:
    """One passage to judge: its text (already cut to the token budget) and where retrieval put it."""

    index: int  # position in the deduplicated input, 0-based
    text: str
    tokens: int
    retrieval_score: float | None


@dataclass(frozen=True)
class Judgement:
    """The LLM's verdict on one candidate; ``label`` is ``None`` when none could be read (``status`` says why)."""

    label: str | None
    score: float
    status: str  # "label", "logprobs", "unparsed" or "failed"


@dataclass
class RerankUsage:
    """What one rerank cost. Returned by :meth:`LikelihoodRerank.rerank` and kept as ``last_usage``."""

    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    followup_calls: int = 0
    logprob_scored: int = 0  # judgements scored as expected values under the label probabilities (per pass)
    unparsed: int = 0
    failed_windows: int = 0
    cache_hits: int = 0  # candidates whose judgement came from the judgement cache, with no LLM call (per pass)
    wall_time_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add(self, other: "RerankUsage") -> None:
        """Add another usage's counts into this one (wall time excluded: it is measured around the whole run)."""
        for f in fields(self):
            if f.name == "errors":
                self.errors.extend(other.errors)
            elif f.name != "wall_time_s":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class RerankEstimate:
    """What a rerank would cost, worked out without calling the LLM (:meth:`LikelihoodRerank.estimate`)."""

    windows: int = 0  # windows to judge, both passes counted with reverse_pass
    llm_calls: int = 0  # one per window not already in the judgement cache (follow-ups and retries not foreseen)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # the answers, one label per candidate, averaged over the scale's labels
    cache_hits: int = 0  # candidates whose window is already in the judgement cache
    cost: float | None = None  # with a price table: prompt and completion tokens at its prices per million tokens

    def add(self, other: "RerankEstimate") -> None:
        """Add another estimate into this one; the cost stays known only while both costs are."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, None if mine is None or theirs is None else mine + theirs)
