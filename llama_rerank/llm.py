"""One LLM call per prompt: timeout, retries of transient errors, adaptation, logprobs, token counts.

A call (:meth:`LLMCaller.acall`) sends; on a refused option, lets the LLM's :class:`~llama_rerank.adapters.Adapter`
adapt and sends again; on an empty answer cut off by the token budget (or one cut short after visible reasoning),
sends once more with room to think; on a permanent error, raises :class:`~llama_rerank.errors.LLMConfigError`.
Transient errors (ordinary exceptions only: cancellation and Ctrl-C are never retried) are retried around that
with backoff, honouring ``Retry-After``, at most ``max_retries`` times. Each request takes a slot of the shared
:class:`~llama_rerank.concurrency.CallLimit` and is bounded by ``timeout``; a sync caller's requests, and those to
an LLM whose async methods are LlamaIndex's ``CustomLLM`` defaults (they would call the sync ones on the event
loop), run on threads (:mod:`llama_rerank.concurrency`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from llama_index.core.base.llms.types import ChatMessage, LogProb
from llama_index.core.llms import LLM
from llama_index.core.llms.custom import CustomLLM
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from llama_rerank.adapters import Adapter
from llama_rerank.budget import Encode
from llama_rerank.concurrency import CallLimit, Slot, blocking, in_thread, limit_for, run_blocking
from llama_rerank.errors import LLMConfigError
from llama_rerank.providers import explain, is_permanent, retry_after

logger = logging.getLogger(__name__)

Prompt = Sequence[ChatMessage] | str
MAX_RESENDS = 6  # adaptations and the one budget increase within one call; each changes something, so few are needed
MAX_RETRY_AFTER = 60.0  # seconds: the longest Retry-After honoured


@dataclass
class LLMReply:
    """The answer text, its per-token top log-probabilities when the LLM returned them, and token counts."""

    text: str
    logprobs: list[list[LogProb]] | None
    prompt_tokens: int
    completion_tokens: int
    retries: int


class _Wait:
    """Exponential backoff with jitter, or the server's ``Retry-After`` when it gives one (capped at 60 s)."""

    def __init__(self) -> None:
        self._backoff = wait_random_exponential(multiplier=0.5, max=8.0)  # "full jitter"; in every tenacity >= 8

    def __call__(self, state: RetryCallState) -> float:
        asked = retry_after(state.outcome.exception() if state.outcome else None)
        return min(asked, MAX_RETRY_AFTER) if asked is not None else self._backoff(state)


def _retryable(exc: BaseException) -> bool:
    """Ordinary errors are retried, except a permanent one; cancellation and Ctrl-C (``BaseException``) never are."""
    return isinstance(exc, Exception) and not isinstance(exc, LLMConfigError)


async def _sleep(seconds: float) -> None:
    """The wait between retries (a seam for tests: they record the wait asked for instead of waiting)."""
    await asyncio.sleep(seconds)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    logger.warning(
        "LLM call failed (attempt %d): %s: %s; retrying in %.1f s", state.attempt_number, type(exc).__name__, exc, wait
    )


def _native_async(llm: LLM, chat: bool) -> bool:
    """False when the LLM's async method is ``CustomLLM``'s default, which calls the sync one on the event loop."""
    name = "achat" if chat else "acomplete"  # (LlamaIndex wraps each class's methods in spans: compare what they wrap)
    return inspect.unwrap(getattr(type(llm), name)) is not inspect.unwrap(getattr(CustomLLM, name))


class LLMCaller:
    """Calls the adapter's LLM for one rendered prompt; chat or completion is decided by the prompt's type."""

    def __init__(self, adapter: Adapter, encode: Encode, max_retries: int, timeout: float | None) -> None:
        self.adapter = adapter
        self.encode = encode
        self.max_retries = max_retries
        self.timeout = timeout
        self.refused: LLMConfigError | None = None  # once set, this caller (one rerank's) starts no new request

    async def _request(
        self, prompt: Prompt, max_tokens: int, schema: dict[str, Any] | None, grown: bool, slot: Slot | None
    ) -> Any:
        """One request with the adapter's current options, bounded by ``timeout``; ``slot`` is given back at its end.

        A sync caller's requests, and those to an LLM without an async path of its own, run on a thread, which
        keeps the slot until the request really returns, even after the timeout has abandoned it; an async
        request is cancelled at the timeout.
        """
        llm, chat = self.adapter.llm, not isinstance(prompt, str)
        try:
            kwargs = self.adapter.options(max_tokens, schema, grown)
            if blocking() or not _native_async(llm, chat):
                send = (lambda: llm.chat(list(prompt), **kwargs)) if chat else (lambda: llm.complete(prompt, **kwargs))
                request, slot = in_thread(send, slot), None  # the thread gives the slot back
            else:
                request = llm.achat(list(prompt), **kwargs) if chat else llm.acomplete(prompt, **kwargs)
            return await asyncio.wait_for(request, self.timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"LLM call did not answer within {self.timeout:g} s") from None
        finally:
            if slot is not None:
                slot.release()

    async def _send(self, prompt: Prompt, max_tokens: int, schema: dict[str, Any] | None, limit: CallLimit | None) -> Any:
        """Send, adapt and resend until there is an answer; raise what retrying cannot fix. Each request waits for
        a slot of ``limit`` first, and is built once it has one (options refused meanwhile are not sent again)."""
        adapter, grown = self.adapter, False
        for _ in range(MAX_RESENDS):
            slot = await limit_for(limit).acquire() if limit is not None else None
            if self.refused is not None:  # another window met a permanent error while this one waited
                if slot is not None:
                    slot.release()
                raise self.refused
            version = adapter.version
            try:
                response = await self._request(prompt, max_tokens, schema, grown, slot)
            except Exception as exc:
                if adapter.adapt(exc, version):
                    continue
                if is_permanent(exc):
                    raise LLMConfigError(explain(exc, adapter.name, adapter.ADAPTS)) from exc
                raise
            if not grown and adapter.more_room(response):
                grown = True
                continue
            return response
        raise LLMConfigError(f"{adapter.name} kept refusing the request after {MAX_RESENDS} adaptations")

    async def acall(
        self, prompt: Prompt, max_tokens: int, schema: dict[str, Any] | None = None, limit: CallLimit | None = None
    ) -> LLMReply:
        """One answer for ``prompt``: raises ``LLMConfigError`` at once, or the last transient error after every
        retry; cancellation ends it at once and is never retried. Each request holds a slot of ``limit``; the
        sleeps between retries hold none."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=_Wait(),
            retry=retry_if_exception(_retryable),
            before_sleep=_log_retry,
            sleep=_sleep,
            reraise=True,
        )
        try:
            response = await retrying(self._send, prompt, max_tokens, schema, limit)
        except LLMConfigError as exc:
            self.refused = exc
            raise
        return self._reply(prompt, response, retrying.statistics.get("attempt_number", 1) - 1)

    def call(self, prompt: Prompt, max_tokens: int, schema: dict[str, Any] | None = None) -> LLMReply:
        """Blocking :meth:`acall` (the LLM's sync methods, on a thread)."""
        return run_blocking(self.acall, prompt, max_tokens, schema)

    def _reply(self, prompt: Prompt, response: Any, retries: int) -> LLMReply:
        text, logprobs = self.adapter.read(response)
        self.adapter.note_reply(bool(logprobs))
        counts = getattr(response, "additional_kwargs", None) or {}
        prompt_tokens = counts.get("prompt_tokens") or self.count(prompt)
        completion_tokens = counts.get("completion_tokens") or len(self.encode(text))
        return LLMReply(text, logprobs, int(prompt_tokens), int(completion_tokens), retries)

    def count(self, prompt: Prompt) -> int:
        """Tokens in ``prompt`` by our counter (used when the provider reports no usage, and by estimates)."""
        if isinstance(prompt, str):
            return len(self.encode(prompt))
        return sum(len(self.encode(message.content or "")) + 4 for message in prompt)
