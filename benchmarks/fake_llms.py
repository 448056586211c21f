"""Scripted LLMs for the benchmarks (a minimal copy of the idea in tests/fakes.py; nothing is imported from tests/).

* :class:`InstantLLM` answers ``LikelihoodRerank`` prompts with the right ``[i] label`` lines at once and records the
  CPU time it spent itself, so the overhead benchmark can subtract it.
* :class:`SimulatedLLM` recognises the prompts of ``LikelihoodRerank``, LlamaIndex ``LLMRerank`` and ``RankGPTRerank``,
  answers each in that system's own format, counts calls and tokens itself (one tokenizer for all systems), and
  sleeps ``per_call + per_prompt_token * prompt_tokens + per_completion_token * completion_tokens`` seconds
  (``time.sleep`` in sync calls, ``asyncio.sleep`` in async ones) so concurrency shows in wall time.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.llms.custom import CustomLLM

from common import label_for, relevance

PASSAGE = re.compile(r'<passage id="(\d+)">\n(.*?)\n</passage>', re.S)


def likelihood_answer(prompt: str) -> str:
    """``[i] label`` for every fenced passage of a LikelihoodRerank prompt."""
    return "\n".join(f"[{i}] {label_for(relevance(text))}" for i, text in PASSAGE.findall(prompt))


def _text(messages: Sequence[ChatMessage]) -> str:
    return "\n".join(m.content or "" for m in messages)


class InstantLLM(CustomLLM):
    """Answers LikelihoodRerank prompts immediately; ``report_usage`` puts token counts in ``additional_kwargs``
    the way OpenAI-compatible servers do (then the reranker need not count them itself)."""

    context_window: int = 16384
    report_usage: bool = True
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _cpu: float = PrivateAttr(default=0.0)
    _calls: int = PrivateAttr(default=0)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=256, is_chat_model=True, model_name="instant")

    def reset(self) -> None:
        with self._lock:
            self._cpu, self._calls = 0.0, 0

    @property
    def own_cpu_s(self) -> float:
        """CPU seconds spent inside this fake (answer generation), to subtract from the reranker's."""
        return self._cpu

    @property
    def calls(self) -> int:
        return self._calls

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        started = time.thread_time()
        prompt = _text(messages)
        answer = likelihood_answer(prompt)
        # Cheap stand-in for the server's usage numbers (the reranker only reads them).
        extra = {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(answer) // 4} if self.report_usage else {}
        response = ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=answer), additional_kwargs=extra)
        spent = time.thread_time() - started
        with self._lock:
            self._cpu += spent
            self._calls += 1
        return response

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self.chat(messages, **kwargs)

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        raise NotImplementedError("chat model")

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        raise NotImplementedError("the instant LLM does not stream")


# -- the simulated LLM for the orchestration benchmark --------------------------------------------------------------


@dataclass
class Latency:
    per_call: float = 0.2
    per_prompt_token: float = 0.001
    per_completion_token: float = 0.020

    def scaled(self, factor: float) -> "Latency":
        return Latency(self.per_call * factor, self.per_prompt_token * factor, self.per_completion_token * factor)

    def seconds(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.per_call + self.per_prompt_token * prompt_tokens + self.per_completion_token * completion_tokens

    def __str__(self) -> str:
        return (
            f"{self.per_call * 1000:g} ms per call + {self.per_prompt_token * 1000:g} ms per prompt token "
            f"+ {self.per_completion_token * 1000:g} ms per completion token"
        )


@dataclass
class Meter:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    systems: set = field(default_factory=set)
    unrecognised: int = 0


def _llmrerank_docs(prompt: str) -> list[str]:
    """Document texts of an LLMRerank choice-select prompt (after its worked example)."""
    body = prompt.split("Let's try this now:", 1)[-1]
    body = body.rsplit("Question:", 1)[0]
    parts = re.split(r"^Document \d+:\s*$", body, flags=re.M)
    return [p.strip() for p in parts[1:]]


class SimulatedLLM(CustomLLM):
    """One simulated chat LLM shared by every system; see the module docstring."""

    context_window: int = 16384
    _latency: Latency = PrivateAttr()
    _count: Callable[[str], int] = PrivateAttr()
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _meter: Meter = PrivateAttr(default_factory=Meter)
    _slots: Any = PrivateAttr(default=None)
    _longest: float = PrivateAttr(default=0.0)

    def __init__(self, latency: Latency, slots: int | None = None, **kwargs: Any) -> None:
        """``slots``: serve at most this many calls at once, the rest wait in a queue (sync calls only), like a
        llama.cpp server with that many slots; a call whose client stopped waiting is still served to the end."""
        super().__init__(**kwargs)
        from llama_index.core.utils import get_tokenizer

        tokenizer = get_tokenizer()  # tiktoken cl100k_base, bundled with llama-index-core
        self._latency = latency
        self._slots = threading.Semaphore(slots) if slots else None
        self._longest = 0.0
        self._count = lambda text: len(tokenizer(text))

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=256, is_chat_model=True, model_name="simulated")

    def reset(self) -> Meter:
        with self._lock:
            meter, self._meter = self._meter, Meter()
        return meter

    # What each system asked, and the answer in its format -------------------------------------------------------

    def _answer(self, messages: Sequence[ChatMessage]) -> tuple[str, str]:
        first = messages[0].content or ""
        prompt = _text(messages)
        if first.startswith("You are RankGPT"):
            hits = [m.content or "" for m in messages if m.role == MessageRole.USER and re.match(r"\[\d+\] ", m.content or "")]
            grades = [relevance(re.sub(r"^\[\d+\] ", "", h)) for h in hits]
            ranking = sorted(range(len(hits)), key=lambda i: (-grades[i], i))
            return "rankgpt", " > ".join(f"[{i + 1}]" for i in ranking)
        if "<passage id=" in prompt:
            return "likelihood", likelihood_answer(prompt)
        if "Doc: 9, Relevance: 7" in prompt:
            docs = _llmrerank_docs(prompt)
            grades = [(i + 1, relevance(d)) for i, d in enumerate(docs)]
            # The prompt asks for the relevant documents only, most relevant first, with a 1-10 score.
            chosen = sorted((g for g in grades if g[1] >= 5), key=lambda g: (-g[1], g[0]))
            return "llmrerank", "\n".join(f"Doc: {i}, Relevance: {grade + 1}" for i, grade in chosen)
        return "unknown", ""

    def _prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        # Same rule for everyone: content tokens plus 4 per message (OpenAI-style chat framing).
        return sum(self._count(m.content or "") + 4 for m in messages)

    def _begin(self, messages: Sequence[ChatMessage]) -> tuple[str, float]:
        system, answer = self._answer(messages)
        prompt_tokens = self._prompt_tokens(messages)
        completion_tokens = self._count(answer)
        with self._lock:
            m = self._meter
            m.calls += 1
            m.prompt_tokens += prompt_tokens
            m.completion_tokens += completion_tokens
            m.in_flight += 1
            m.max_in_flight = max(m.max_in_flight, m.in_flight)
            m.systems.add(system)
            m.unrecognised += system == "unknown"
        return answer, self._latency.seconds(prompt_tokens, completion_tokens)

    def _end(self) -> None:
        with self._lock:
            self._meter.in_flight -= 1

    @staticmethod
    def _response(answer: str) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=answer))

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        started = time.perf_counter()
        answer, delay = self._begin(messages)
        try:
            if self._slots is not None:
                with self._slots:  # queued until a slot is free, then served
                    time.sleep(delay)
            else:
                time.sleep(delay)
        finally:
            self._end()
            with self._lock:
                self._longest = max(self._longest, time.perf_counter() - started)
        return self._response(answer)

    def longest_call(self, reset: bool = True) -> float:
        """Longest time from a sync call's arrival to its answer (queueing included), in seconds."""
        with self._lock:
            longest = self._longest
            if reset:
                self._longest = 0.0
        return longest

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        if self._slots is not None:
            raise NotImplementedError("the single-slot simulation covers sync calls only")
        answer, delay = self._begin(messages)
        try:
            await asyncio.sleep(delay)
        finally:
            self._end()
        return self._response(answer)

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        raise NotImplementedError("chat model: every system here is driven through chat()")

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        raise NotImplementedError("the simulated LLM does not stream")


class RateLimited(Exception):
    """What a provider's 429 looks like to the reranker: the status and the ``Retry-After`` it asked for."""

    status_code = 429

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"429 Too Many Requests: more than the allowed calls in flight; retry after {retry_after:g} s")
        self.retry_after = retry_after


class RateLimitedLLM(SimulatedLLM):
    """The simulated LLM behind a provider that serves at most ``limit`` calls at once and answers any call over
    that at once with a 429 (``Retry-After: retry_after`` seconds); ``rejected`` counts the 429s (sync calls only)."""

    _limit: int = PrivateAttr()
    _retry_after: float = PrivateAttr()
    _serving: int = PrivateAttr(default=0)
    _rejected: int = PrivateAttr(default=0)

    def __init__(self, latency: Latency, limit: int, retry_after: float, **kwargs: Any) -> None:
        super().__init__(latency, **kwargs)
        self._limit, self._retry_after = limit, retry_after

    @property
    def rejected(self) -> int:
        return self._rejected

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        with self._lock:
            if self._serving >= self._limit:
                self._rejected += 1
                raise RateLimited(self._retry_after)
            self._serving += 1
        try:
            return super().chat(messages, **kwargs)
        finally:
            with self._lock:
                self._serving -= 1
