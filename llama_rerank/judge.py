"""The :class:`Judge`: runs the windows, prompt -> LLM -> parse -> judgements, with follow-ups and the failure policy.

One window's steps are one coroutine (:meth:`Judge._run_window`); a rerank runs its windows as concurrent tasks
(:func:`~llama_rerank.concurrency.all_or_none`), awaited by ``arerank`` and run to completion in an event loop of
their own by ``rerank``, so both paths share one set of rules: a permanent error or a cancellation stops every
window, and windows not started never call the LLM. Every request holds a slot of the reranker's
:class:`~llama_rerank.concurrency.CallLimit`, shared by all its concurrent runs, so ``max_concurrency`` bounds the
calls in flight across queries, threads and event loops. Windows are independent: labels are absolute, not
relative to the window. With ``reverse_pass`` every window is judged a second time in reversed order, concurrently
with the first pass, and the two scores are averaged. With a judgement cache (:mod:`llama_rerank.cache`, read and
written on a thread, since stores may block) a window found there makes no LLM call, and a window whose every
candidate was labelled is stored.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Sequence

from llama_index.core.prompts import BasePromptTemplate

from llama_rerank import budget
from llama_rerank.budget import Encode
from llama_rerank.cache import JudgementCache, judgement_key
from llama_rerank.concurrency import CallLimit, all_or_none, in_thread, run_blocking
from llama_rerank.errors import LLMConfigError, RerankLLMError
from llama_rerank.labels import LabelScale
from llama_rerank.llm import LLMCaller, LLMReply, Prompt
from llama_rerank.parse import parse_labels
from llama_rerank.prompts import answer_schema, answer_tokens, prompt_vars, render, sample_answer
from llama_rerank.scoring import align_tokens, average_passes, label_probabilities
from llama_rerank.types import Candidate, Judgement, RerankEstimate, RerankUsage

logger = logging.getLogger(__name__)

Job = tuple[Sequence[Candidate], dict[int, Judgement], RerankUsage]  # a window, where its judgements go, its usage


@dataclass
class Judge:
    """Everything a window needs to be judged; built by :class:`LikelihoodRerank` for each run."""

    caller: LLMCaller
    template: BasePromptTemplate
    is_chat: bool
    scale: LabelScale
    scoring: str
    followups: int
    on_error: str
    limit: CallLimit
    encode: Encode
    reverse_pass: bool = False
    cache: JudgementCache | None = None
    cache_scope: str = ""  # what besides the prompt decides a judgement (llama_rerank.cache.cache_scope)
    deadline: float | None = None  # seconds the whole run may take

    async def _run_window(
        self, query: str, window: Sequence[Candidate], out: dict[int, Judgement], usage: RerankUsage
    ) -> None:
        key = self._cache_key(query, window)
        cached = None if key is None else await in_thread(lambda: self.cache.get(key, len(window), self.scale))
        if self._reuse(cached, window, out, usage):
            return
        pending = await self._judge_window(query, window, out, usage)
        if pending:
            usage.unparsed += len(pending)
            logger.warning(
                "LLM gave no readable label for %d of %d candidates (retrieval ranks %s) after %d follow-up call(s); "
                "they keep retrieval order with the neutral score %g",
                len(pending), len(window), [c.index + 1 for c in pending], self.followups, self.scale.neutral,
            )  # fmt: skip
            for c in pending:
                out[c.index] = Judgement(None, self.scale.neutral, "unparsed")
        if key is not None:
            await in_thread(lambda: self.cache.put(key, [out[c.index] for c in window], self.scale))

    async def _judge_window(
        self, query: str, window: Sequence[Candidate], out: dict[int, Judgement], usage: RerankUsage
    ) -> list[Candidate]:
        """Call, read, and call again for what the answer left unlabelled; return the candidates still unlabelled."""
        pending = list(window)
        for round_ in range(self.followups + 1):
            try:
                reply = await self.caller.acall(
                    self._render(query, pending),
                    answer_tokens(len(pending), self.scale.labels, self.encode),
                    answer_schema(len(pending), self.scale),
                    self.limit,
                )
            except Exception as exc:  # noqa: BLE001 - the policy in _fail decides (cancellation is no Exception)
                self._fail(pending, exc, out, usage)
                return []
            usage.llm_calls += 1
            usage.followup_calls += round_ > 0
            usage.prompt_tokens += reply.prompt_tokens
            usage.completion_tokens += reply.completion_tokens
            usage.retries += reply.retries
            pending = self._read(reply, pending, out, usage)
            if not pending:
                break
        return pending

    def _render(self, query: str, window: Sequence[Candidate]) -> Prompt:
        return render(self.template, self.is_chat, prompt_vars(query, [c.text for c in window], self.scale))

    def passage_budget(self, query: str, window_size: int, context_window: int) -> int:
        """Tokens left for the passages of a window of ``window_size`` once the prompt for ``query`` (counted as
        the calls count it) and the answer are counted; a ``ValueError`` when too few are left."""
        prompt = self.caller.count(self._render(query, []))
        return budget.passage_budget(context_window, prompt, answer_tokens(window_size, self.scale.labels, self.encode))

    def _cache_key(self, query: str, window: Sequence[Candidate]) -> str | None:
        if self.cache is None:
            return None
        max_tokens = answer_tokens(len(window), self.scale.labels, self.encode)
        return judgement_key(self.cache_scope, self._render(query, window), max_tokens)

    def _reuse(
        self, cached: list[Judgement] | None, window: Sequence[Candidate], out: dict[int, Judgement], usage: RerankUsage
    ) -> bool:
        """Take a window's judgements from the cache if it had them."""
        if cached is None:
            return False
        for candidate, judgement in zip(window, cached):
            out[candidate.index] = judgement
        usage.cache_hits += len(window)
        usage.logprob_scored += sum(j.status == "logprobs" for j in cached)
        return True

    def _read(
        self, reply: LLMReply, pending: list[Candidate], out: dict[int, Judgement], usage: RerankUsage
    ) -> list[Candidate]:
        """Record the labels read from ``reply``; return the candidates still unlabelled."""
        parsed = parse_labels(reply.text, len(pending), self.scale)
        aligned = align_tokens(reply.text, reply.logprobs) if self.scoring != "label" and reply.logprobs else None
        if self.scoring == "logprobs" and aligned is None and parsed.labels:
            logger.warning("scoring='logprobs' but the LLM's reply carries no usable logprobs; using label values")
        for i, label in parsed.labels.items():
            probabilities = label_probabilities(reply.text, aligned, parsed.spans[i][0], self.scale) if aligned else None
            expected = self.scale.expected_score(probabilities) if probabilities else None
            if expected is None:
                out[pending[i - 1].index] = Judgement(label, self.scale.score(label), "label")
            else:
                out[pending[i - 1].index] = Judgement(label, expected, "logprobs")
                usage.logprob_scored += 1
        return [pending[i - 1] for i in parsed.missing]

    def _fail(self, pending: list[Candidate], error: Exception, out: dict[int, Judgement], usage: RerankUsage) -> None:
        if isinstance(error, LLMConfigError):
            raise error  # a misconfiguration is never a silent fallback, whatever on_error says
        message = f"{type(error).__name__}: {error}"
        if self.on_error == "raise":
            raise RerankLLMError(f"LLM call failed for {len(pending)} candidates after retries: {message}") from error
        usage.failed_windows += 1
        usage.errors.append(message)
        logger.warning(
            "LLM call failed after retries (%s); %d candidates (retrieval ranks %s) keep retrieval order with the "
            "neutral score %g",
            message, len(pending), [c.index + 1 for c in pending], self.scale.neutral,
        )  # fmt: skip
        for c in pending:
            out[c.index] = Judgement(None, self.scale.neutral, "failed")

    def _jobs(self, windows: Sequence[Sequence[Candidate]]) -> tuple[list[Job], list[dict[int, Judgement]]]:
        """Each window with the dict its judgements go to and its own usage; the reversed pass's windows follow.

        A window of one passage has no order to reverse, so it is judged once.
        """
        passes: list[dict[int, Judgement]] = [{}, {}] if self.reverse_pass else [{}]
        jobs = [(w, passes[0], RerankUsage()) for w in windows]
        if self.reverse_pass:
            jobs += [(w[::-1], passes[1], RerankUsage()) for w in windows if len(w) > 1]
        return jobs, passes

    def _merge(self, jobs: list[Job], passes: list[dict[int, Judgement]], usage: RerankUsage) -> dict[int, Judgement]:
        """Add every job's usage into ``usage``; return the judgements, the two passes averaged when there are two."""
        for _, _, job_usage in jobs:
            usage.add(job_usage)
        return average_passes(*passes) if self.reverse_pass else passes[0]

    def estimate(self, query: str, windows: Sequence[Sequence[Candidate]], structured: bool) -> RerankEstimate:
        """The calls and tokens judging ``windows`` takes when every answer labels every candidate; no LLM call.

        Prompts are counted as the calls count them when the provider reports no usage; an answer as one line
        ``[i] label`` per candidate (a JSON object when ``structured``), averaged over the labels. Windows found in
        the cache cost nothing.
        """
        jobs, _ = self._jobs(windows)
        estimate = RerankEstimate(windows=len(jobs))
        for window, _, _ in jobs:
            key = self._cache_key(query, window)
            if key is not None and self.cache.get(key, len(window), self.scale) is not None:
                estimate.cache_hits += len(window)
                continue
            estimate.llm_calls += 1
            estimate.prompt_tokens += self.caller.count(self._render(query, window))
            answers = [sample_answer(len(window), label, structured) for label in self.scale.labels]
            estimate.completion_tokens += round(sum(len(self.encode(a)) for a in answers) / len(answers))
        return estimate

    def judge(self, query: str, windows: Sequence[Sequence[Candidate]], usage: RerankUsage) -> dict[int, Judgement]:
        """Blocking :meth:`ajudge` (the LLM's sync methods, on threads)."""
        return run_blocking(self.ajudge, query, windows, usage)

    async def ajudge(self, query: str, windows: Sequence[Sequence[Candidate]], usage: RerankUsage) -> dict[int, Judgement]:
        """Judge every candidate with concurrent windows, as many calls at a time as the shared limit allows.

        Past the ``deadline`` the windows still running are cancelled and their unjudged candidates fail as after
        a failed call (retrieval order, or ``RerankLLMError`` with ``on_error="raise"``).
        """
        jobs, passes = self._jobs(windows)
        try:
            await asyncio.wait_for(all_or_none(self._run_window(query, *job) for job in jobs), self.deadline)
        except asyncio.TimeoutError:
            late = TimeoutError(f"the rerank's deadline of {self.deadline:g} s passed")
            for window, out, job_usage in jobs:
                unjudged = [c for c in window if c.index not in out]
                if unjudged:
                    self._fail(unjudged, late, out, job_usage)
        return self._merge(jobs, passes, usage)

