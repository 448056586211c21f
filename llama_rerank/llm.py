"""One LLM call per prompt, sync or async, with a timeout, bounded retries with backoff, logprobs and token counts."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from llama_index.core.base.llms.types import ChatMessage, LogProb
from llama_index.core.llms import LLM
from tenacity import AsyncRetrying, RetryCallState, Retrying, stop_after_attempt, wait_exponential_jitter

from llama_rerank.budget import Encode

logger = logging.getLogger(__name__)


@dataclass
class LLMReply:
    """The answer text, its per-token top log-probabilities when the LLM returned them, and token counts."""

    text: str
    logprobs: list[list[LogProb]] | None
    prompt_tokens: int
    completion_tokens: int
    retries: int


def _retry_after(exc: BaseException | None) -> float | None:
    """Seconds a rate-limit error asks us to wait (``Retry-After`` header or attribute), if it says."""
    response = getattr(exc, "response", None)
    value = getattr(exc, "retry_after", None) or getattr(getattr(response, "headers", None), "get", lambda _: None)(
        "retry-after"
    )
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class _Wait:
    """Exponential backoff with jitter, or the server's ``Retry-After`` when it gives one (capped at 60 s)."""

    def __init__(self) -> None:
        self._backoff = wait_exponential_jitter(initial=0.5, max=8.0)

    def __call__(self, state: RetryCallState) -> float:
        asked = _retry_after(state.outcome.exception() if state.outcome else None)
        return min(asked, 60.0) if asked is not None else self._backoff(state)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    logger.warning("LLM call failed (attempt %d): %s: %s; retrying", state.attempt_number, type(exc).__name__, exc)


def _run_with_timeout(fn: Callable[[], Any], timeout: float | None) -> Any:
    """Run ``fn`` in this thread, or in a helper thread we stop waiting for after ``timeout`` seconds."""
    if timeout is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            box["error"] = exc

    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(target,), daemon=True, name="llama-rerank-llm-call")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"LLM call did not answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class LLMCaller:
    """Calls ``llm`` for one rendered prompt; chat or completion is decided by the prompt's type."""

    def __init__(self, llm: LLM, encode: Encode, max_retries: int, timeout: float | None) -> None:
        self.llm = llm
        self.encode = encode
        self.max_retries = max_retries
        self.timeout = timeout
        self._openai = _is_openai(llm)

    def _kwargs(self, max_tokens: int) -> dict[str, Any]:
        # OpenAI-family LLMs pass extra kwargs to the API; others may reject unknown kwargs, so they get none.
        return {"max_tokens": max_tokens} if self._openai else {}

    def _retrying(self, cls: type) -> Any:
        return cls(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=_Wait(),
            before_sleep=_log_retry,
            reraise=True,
        )

    def call(self, prompt: Sequence[ChatMessage] | str, max_tokens: int) -> LLMReply:
        """Blocking call with retries; raises the last error when every attempt failed."""
        kwargs = self._kwargs(max_tokens)
        if isinstance(prompt, str):
            attempt: Callable[[], Any] = lambda: self.llm.complete(prompt, **kwargs)  # noqa: E731
        else:
            attempt = lambda: self.llm.chat(list(prompt), **kwargs)  # noqa: E731
        retrying = self._retrying(Retrying)
        response = retrying(_run_with_timeout, attempt, self.timeout)
        return self._reply(prompt, response, retrying.statistics.get("attempt_number", 1) - 1)

    async def acall(self, prompt: Sequence[ChatMessage] | str, max_tokens: int) -> LLMReply:
        """Async call with retries; a call that exceeds the timeout is cancelled and retried."""
        kwargs = self._kwargs(max_tokens)
        retrying = self._retrying(AsyncRetrying)

        async def attempt() -> Any:
            if isinstance(prompt, str):
                coroutine = self.llm.acomplete(prompt, **kwargs)
            else:
                coroutine = self.llm.achat(list(prompt), **kwargs)
            try:
                return await asyncio.wait_for(coroutine, self.timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"LLM call did not answer within {self.timeout:g} s") from None

        response = await retrying(attempt)
        return self._reply(prompt, response, retrying.statistics.get("attempt_number", 1) - 1)

    def _reply(self, prompt: Sequence[ChatMessage] | str, response: Any, retries: int) -> LLMReply:
        text = response.message.content if hasattr(response, "message") else response.text
        text = text or ""
        counts = getattr(response, "additional_kwargs", None) or {}
        prompt_tokens = counts.get("prompt_tokens") or self._count(prompt)
        completion_tokens = counts.get("completion_tokens") or len(self.encode(text))
        return LLMReply(text, response.logprobs or None, int(prompt_tokens), int(completion_tokens), retries)

    def _count(self, prompt: Sequence[ChatMessage] | str) -> int:
        if isinstance(prompt, str):
            return len(self.encode(prompt))
        return sum(len(self.encode(message.content or "")) + 4 for message in prompt)


def _is_openai(llm: LLM) -> bool:
    # An OpenAI-family LLM means its module is already imported; importing it for others would cost ~0.7 s.
    module = sys.modules.get("llama_index.llms.openai")
    return module is not None and isinstance(llm, module.OpenAI)
