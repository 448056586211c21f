"""One LLM call per prompt, sync or async: timeout, retries of transient errors, adaptation, logprobs, token counts.

A call is an *exchange* (:meth:`LLMCaller._exchange`, written once for both paths): send; on a refused option,
let the :class:`~llama_rerank.providers.Provider` adapt and send again; on an empty answer cut off by the token
budget (or one cut short after visible reasoning), send once more with room to think; on a permanent error, raise
:class:`~llama_rerank.errors.LLMConfigError`. Transient errors leave the exchange and are retried around it with
backoff (honouring ``Retry-After``), at most ``max_retries`` times.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

from llama_index.core.base.llms.types import ChatMessage, LogProb
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from llama_rerank.budget import Encode
from llama_rerank.errors import LLMConfigError
from llama_rerank.parse import answer_part
from llama_rerank.providers import Provider, explain, is_permanent, model_identity, retry_after

logger = logging.getLogger(__name__)

Prompt = Sequence[ChatMessage] | str
MAX_RESENDS = 6  # adaptations and the one budget increase within one call; each changes something, so few are needed
Exchange = Generator[dict[str, Any], Any, Any]  # yields kwargs, receives the response or the exception


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


def _raw_choice(response: Any, field: str) -> Any:
    """``field`` of the first choice of the raw OpenAI-style reply (an object or a dict), if there is one."""
    raw = getattr(response, "raw", None)
    choices = raw.get("choices") if isinstance(raw, dict) else getattr(raw, "choices", None)
    if not choices:
        return None
    first = choices[0]
    return first.get(field) if isinstance(first, dict) else getattr(first, field, None)


def _finish_reason(response: Any) -> str | None:
    return _raw_choice(response, "finish_reason")


def _answer(response: Any) -> tuple[str, list[list[LogProb]] | None]:
    """The answer text and, per token, the alternatives with the token actually sampled first.

    LlamaIndex keeps only ``top_logprobs``; under constrained decoding (a JSON schema on llama.cpp) the sampled
    token is often not among them, and the server may also trim what the tokens spell (llama.cpp returns the JSON
    without the code fence the model wrote around it). Where the raw OpenAI-style reply names the sampled tokens,
    the text is what they spell when it contains the returned content, so text and tokens line up.
    """
    text, logprobs = _text(response), response.logprobs or None
    content = getattr(_raw_choice(response, "logprobs"), "content", None)
    if not logprobs or not content or len(content) != len(logprobs):
        return text, logprobs
    spelled = "".join(c.token for c in content)
    if text.strip() and text.strip() in spelled:
        text = spelled
    return text, [
        [LogProb(token=c.token, logprob=c.logprob, bytes=list(c.bytes or []))] + [a for a in alts if a.token != c.token]
        for c, alts in zip(content, logprobs)
    ]


def _text(response: Any) -> str:
    return (response.message.content if hasattr(response, "message") else response.text) or ""


def _cut_off_while_thinking(response: Any) -> bool:
    """The token budget ran out (``finish_reason="length"``) before the answer: it is empty, or it follows
    reasoning written into the text (``<think>``), which used up the budget meant for the labels."""
    if _finish_reason(response) != "length":
        return False
    text = _text(response)
    answer = answer_part(text)
    return not answer.strip() or answer != text


class LLMCaller:
    """Calls the provider's LLM for one rendered prompt; chat or completion is decided by the prompt's type."""

    def __init__(self, provider: Provider, encode: Encode, max_retries: int, timeout: float | None) -> None:
        self.provider = provider
        self.encode = encode
        self.max_retries = max_retries
        self.timeout = timeout

    def _retrying(self, cls: type) -> Any:
        return cls(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=_Wait(),
            retry=retry_if_exception(lambda exc: not isinstance(exc, LLMConfigError)),
            before_sleep=_log_retry,
            reraise=True,
        )

    def _exchange(self, max_tokens: int, schema: dict[str, Any] | None) -> Exchange:
        """Send, adapt and resend until there is an answer; raise what retrying cannot fix."""
        provider, grown = self.provider, False
        for _ in range(MAX_RESENDS):
            version = provider.version
            outcome = yield provider.kwargs(max_tokens, schema, grown)
            if isinstance(outcome, Exception):
                if provider.adapt(outcome, version):
                    continue
                if is_permanent(outcome):
                    raise LLMConfigError(explain(outcome, model_identity(provider.original), provider.openai)) from outcome
                raise outcome
            if provider.openai and not grown and _cut_off_while_thinking(outcome):
                grown = True
                provider.grow()
                continue
            return outcome
        raise LLMConfigError(f"{model_identity(provider.original)} kept refusing the request after {MAX_RESENDS} adaptations")

    def _request(self, prompt: Prompt, kwargs: dict[str, Any]) -> Any:
        llm = self.provider.llm
        return llm.complete(prompt, **kwargs) if isinstance(prompt, str) else llm.chat(list(prompt), **kwargs)

    async def _arequest(self, prompt: Prompt, kwargs: dict[str, Any]) -> Any:
        llm = self.provider.llm
        coroutine = llm.acomplete(prompt, **kwargs) if isinstance(prompt, str) else llm.achat(list(prompt), **kwargs)
        try:
            return await asyncio.wait_for(coroutine, self.timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"LLM call did not answer within {self.timeout:g} s") from None

    def _send(self, prompt: Prompt, max_tokens: int, schema: dict[str, Any] | None) -> Any:
        exchange = self._exchange(max_tokens, schema)
        kwargs = next(exchange)
        while True:
            try:
                outcome = _run_with_timeout(lambda: self._request(prompt, kwargs), self.timeout)
            except Exception as exc:  # noqa: BLE001 - the exchange decides
                outcome = exc
            try:
                kwargs = exchange.send(outcome)
            except StopIteration as done:
                return done.value

    async def _asend(self, prompt: Prompt, max_tokens: int, schema: dict[str, Any] | None) -> Any:
        exchange = self._exchange(max_tokens, schema)
        kwargs = next(exchange)
        while True:
            try:
                outcome = await self._arequest(prompt, kwargs)
            except Exception as exc:  # noqa: BLE001 - the exchange decides
                outcome = exc
            try:
                kwargs = exchange.send(outcome)
            except StopIteration as done:
                return done.value

    def call(self, prompt: Prompt, max_tokens: int, schema: dict[str, Any] | None = None) -> LLMReply:
        """Blocking call; raises ``LLMConfigError`` at once, or the last transient error after every retry."""
        retrying = self._retrying(Retrying)
        response = retrying(self._send, prompt, max_tokens, schema)
        return self._reply(prompt, response, retrying.statistics.get("attempt_number", 1) - 1)

    async def acall(self, prompt: Prompt, max_tokens: int, schema: dict[str, Any] | None = None) -> LLMReply:
        """Async :meth:`call`; a request that exceeds the timeout is cancelled and retried."""
        retrying = self._retrying(AsyncRetrying)
        response = await retrying(self._asend, prompt, max_tokens, schema)
        return self._reply(prompt, response, retrying.statistics.get("attempt_number", 1) - 1)

    def _reply(self, prompt: Prompt, response: Any, retries: int) -> LLMReply:
        text, logprobs = _answer(response)
        self.provider.note_reply(bool(logprobs))
        counts = getattr(response, "additional_kwargs", None) or {}
        prompt_tokens = counts.get("prompt_tokens") or self.count(prompt)
        completion_tokens = counts.get("completion_tokens") or len(self.encode(text))
        return LLMReply(text, logprobs, int(prompt_tokens), int(completion_tokens), retries)

    def count(self, prompt: Prompt) -> int:
        """Tokens in ``prompt`` by our counter (used when the provider reports no usage, and by estimates)."""
        if isinstance(prompt, str):
            return len(self.encode(prompt))
        return sum(len(self.encode(message.content or "")) + 4 for message in prompt)
