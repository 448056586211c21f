"""A scripted LLM for unit tests: each call's reply comes from a function of the prompt, so tests drive exact outputs."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Sequence

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    LogProb,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.custom import CustomLLM


@dataclass
class Reply:
    """What the fake says: text, optional per-token logprobs, an optional delay before answering (or before raising
    ``error``, an exception the call ends in after that delay)."""

    text: str
    logprobs: List[List[LogProb]] | None = None
    delay: float = 0.0
    error: BaseException | None = None


Script = Callable[[str, int], str | Reply | BaseException]


def passages(prompt: str) -> list[str]:
    """The passage texts of one rendered prompt, in order."""
    return re.findall(r'<passage id="\d+">\n(.*?)\n</passage>', prompt, flags=re.S)


def query_of(prompt: str) -> str:
    return re.search(r"Query: (.*)", prompt).group(1)


def label_by_keyword(rules: dict[str, str], default: str = "unlikely") -> Script:
    """Answer ``[i] label`` for every passage: the label of the first keyword found in the passage."""

    def script(prompt: str, call: int) -> str:
        lines = []
        for i, text in enumerate(passages(prompt), start=1):
            label = next((lab for word, lab in rules.items() if word in text), default)
            lines.append(f"[{i}] {label}")
        return "\n".join(lines)

    return script


def tokens_with_logprobs(text: str, alternatives: dict[str, dict[str, float]] | None = None) -> List[List[LogProb]]:
    """Split ``text`` into word-ish tokens; where a token is a key of ``alternatives``, give those top logprobs."""
    out = []
    for token in re.findall(r"\s*\S+|\s+", text):
        alts = (alternatives or {}).get(token.strip())
        if alts:
            out.append([LogProb(token=token, logprob=alts[token.strip()])] + [
                LogProb(token=" " + t, logprob=lp) for t, lp in alts.items() if t != token.strip()
            ])
        else:
            out.append([LogProb(token=token, logprob=0.0)])
    return out


class ScriptedLLM(CustomLLM):
    """A LlamaIndex LLM whose replies come from ``script(prompt_text, call_index)``; records every prompt."""

    context_window: int = 4096
    is_chat: bool = True
    model_name: str = "scripted"
    _script: Script = PrivateAttr()
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    # what the fake records is not configuration: excluded from dumps (and so from the judgement cache's key)
    prompts: list = Field(default=[], exclude=True)
    kwargs_seen: list = Field(default=[], exclude=True)
    in_flight: int = Field(default=0, exclude=True)
    max_in_flight: int = Field(default=0, exclude=True)

    def __init__(self, script: Script, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._script = script
        self.prompts = []
        self.kwargs_seen = []

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=256, is_chat_model=self.is_chat, model_name=self.model_name)

    def _next(self, prompt: str, kwargs: dict) -> Reply:
        with self._lock:
            call = len(self.prompts)
            self.prompts.append(prompt)
            self.kwargs_seen.append(kwargs)
        result = self._script(prompt, call)
        if isinstance(result, BaseException):
            raise result
        return result if isinstance(result, Reply) else Reply(result)

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _sync(self, prompt: str, kwargs: dict) -> Reply:
        self._enter()
        try:
            reply = self._next(prompt, kwargs)
            time.sleep(reply.delay)
            if reply.error is not None:
                raise reply.error
            return reply
        finally:
            self._leave()

    async def _async(self, prompt: str, kwargs: dict) -> Reply:
        self._enter()
        try:
            reply = self._next(prompt, kwargs)
            await asyncio.sleep(reply.delay)
            if reply.error is not None:
                raise reply.error
            return reply
        finally:
            self._leave()

    @staticmethod
    def _text(messages: Sequence[ChatMessage]) -> str:
        return "\n".join(m.content or "" for m in messages)

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        reply = self._sync(self._text(messages), kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=reply.text), logprobs=reply.logprobs)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        reply = await self._async(self._text(messages), kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=reply.text), logprobs=reply.logprobs)

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        reply = self._sync(prompt, kwargs)
        return CompletionResponse(text=reply.text, logprobs=reply.logprobs)

    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        reply = await self._async(prompt, kwargs)
        return CompletionResponse(text=reply.text, logprobs=reply.logprobs)

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        raise NotImplementedError("the scripted LLM does not stream")
