"""The provider seam: what differs between LLM families, one adapter per family.

An adapter is how the reranker calls one LLM: a private working copy of the user's LLM (the user's own object is
never changed) and what the provider has been seen to accept. :func:`adapter_for` picks the family:
:class:`OpenAIAdapter` for ``OpenAI``, ``OpenAILike``, ``AzureOpenAI`` and their subclasses, and :class:`Adapter`
for every other LlamaIndex LLM, called as it is configured (no extra keyword arguments, so nothing can be refused
and nothing is adapted). A LangChain chat model reaches the reranker as
:class:`~llama_rerank.langchain.LangChainChatLLM`, a plain LlamaIndex LLM whose translation uses this module's
OpenAI-family knowledge (:func:`without_retries`, :func:`sampled_first`).

What an adapter adapted is data: :attr:`Adapter.adaptations` holds one :class:`Adaptation` per change, in order
(``check-llm`` reports them), and each is logged once as a warning naming the model.

Adding a provider family is one adapter and its wire profile. Subclass :class:`Adapter` and override what differs:

- ``_working_copy(llm)``: the copy the reranker calls, with the client's own retries off (ours are the only ones);
- ``options(max_tokens, schema, grown)``: the keyword arguments each ``chat``/``complete`` sends;
- ``_change_for(param, message)``: what to change when the provider refuses ``param`` (HTTP 400/422; ``param`` is
  the error's own, or the first of :data:`llama_rerank.providers._PARAMS` its message names: add a new option's name
  there), and ``ADAPTS``, the options it changes (a refusal it cannot adapt names them);
- ``more_room(response)``: whether an answer was cut off while thinking, so it is asked again with a larger budget;
- ``read(response)``: the reply's text and per-token logprobs;
- ``takes_schema``: whether it can send a JSON schema (``structured_output=True``).

Then pick it in :func:`adapter_for` (without importing a client module the user has not imported), and add the
provider's wire profile to ``tests/openai_stub.py`` (or a stub of its own), citing the public source of each
behaviour, with a test through the real client class in ``tests/test_wire.py``.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from llama_index.core.base.llms.types import LogProb
from llama_index.core.llms import LLM

from llama_rerank.parse import answer_part
from llama_rerank.providers import model_identity, rejected_param, status_of

logger = logging.getLogger(__name__)

# Lowest first; a model that refuses one gets the next (gpt-5: minimal..high; gpt-5.1+: none..high; o-series: low..).
REASONING_EFFORTS = ("none", "minimal", "low")
REASONING_ROOM = 512  # completion tokens a reasoning model may spend thinking before it writes the labels
GROWN_ROOM = 4096  # the room given once an answer came back empty because the budget ran out

# "Expected a value <= 20" (OpenAI), "greater than max allowed: 20" (vLLM), "must be between 0 and 20" (Ollama)
_MAXIMUM = re.compile(r"(?:<=|less than or equal to|at most|maximum(?: value)?(?: of| is)?|max allowed:?|between \d+ and)"
                      r"\s*(\d+)", re.IGNORECASE)  # fmt: skip


@dataclass(frozen=True)
class Adaptation:
    """One change an adapter made because of what the provider did: ``option`` is the request option concerned,
    ``change`` what was refused (or missing) and what is done from now on, as the warning says it after the model."""

    option: str
    change: str


class Adapter:
    """A LlamaIndex LLM of no known family, called as it is configured; the base every adapter extends.

    Thread-safe: :meth:`adapt` changes options under a lock and bumps :attr:`version`, so requests that failed
    for the same reason at once all resend with the adapted options, and the warning is logged once.
    """

    ADAPTS: ClassVar[tuple[str, ...]] = ()  # the request options this family's refusals are adapted for
    takes_schema: ClassVar[bool] = False  # whether it can constrain the answer by a JSON schema
    reasoning = False  # a reasoning model: it thinks before it answers, within the completion budget
    room = 0  # completion tokens each request adds to the answer's budget for thinking
    structured = False  # whether the requests ask for structured output

    def __init__(self, llm: LLM, structured: bool = False) -> None:
        if structured and not self.takes_schema:
            raise ValueError(
                f"structured_output=True needs an OpenAI-compatible LLM class (OpenAI, OpenAILike, AzureOpenAI), "
                f"which sends a JSON schema as response_format; {type(llm).__name__} has no such path. "
                "Use structured_output=False (the text answer), or OpenAILike for an OpenAI-compatible server."
            )
        self.original = llm
        self.llm = self._working_copy(llm)
        self.adaptations: list[Adaptation] = []
        self.version = 0
        self._lock = threading.Lock()
        self._warned_no_logprobs = False

    @property
    def name(self) -> str:
        """The user's LLM as messages name it (:func:`~llama_rerank.providers.model_identity`)."""
        return model_identity(self.original)

    @property
    def logprobs(self) -> bool:
        """Whether the requests ask for logprobs (the LLM's own setting, until the provider refuses them)."""
        return bool(getattr(self.llm, "logprobs", False))

    def _working_copy(self, llm: LLM) -> LLM:
        """The LLM the reranker calls: here the user's own, as it is."""
        return llm

    def options(self, max_tokens: int, schema: dict[str, Any] | None, grown: bool = False) -> dict[str, Any]:
        """Extra keyword arguments for ``chat``/``complete``: none for LLM classes that may reject unknown ones."""
        return {}

    def adapt(self, exc: BaseException, version: int) -> bool:
        """Change the option a 400/422 refused; True when the request should be sent again at once."""
        if status_of(exc) not in (400, 422):
            return False
        with self._lock:
            if version != self.version:  # another request already adapted: just resend
                return True
            param = rejected_param(exc)
            change = self._change_for(param, str(getattr(exc, "message", None) or exc))
            if change is None:
                return False
            self.version += 1
        refused, now = change
        self._record(str(param), f"refused {refused}; {now} from now on.")
        return True

    def _change_for(self, param: str | None, message: str) -> tuple[str, str] | None:
        """Apply the change for ``param`` (under the lock); returns (what was refused, what we do now), or None."""
        return None

    def more_room(self, response: Any) -> bool:
        """True when the answer was cut off while thinking and should be asked again with more room (later
        requests keep it); a plain LLM gets no budget from the reranker, so a larger one cannot be asked for."""
        return False

    def read(self, response: Any) -> tuple[str, list[list[LogProb]] | None]:
        """The answer text and, per token, the alternatives with the token actually sampled first.

        LlamaIndex keeps only ``top_logprobs``; under constrained decoding (a JSON schema on llama.cpp) the sampled
        token is often not among them, and the server may also trim what the tokens spell (llama.cpp returns the
        JSON without the code fence the model wrote around it). Where the raw reply is OpenAI's (any class that
        passes the openai client's reply on) and names the sampled tokens, the text is what they spell when it
        contains the returned content, so text and tokens line up.
        """
        text, logprobs = _text(response), response.logprobs or None
        content = getattr(_raw_choice(response, "logprobs"), "content", None)
        if not logprobs or not content or len(content) != len(logprobs):
            return text, logprobs
        spelled = "".join(c.token for c in content)
        if text.strip() and text.strip() in spelled:
            text = spelled
        return text, sampled_first(content)

    def note_reply(self, has_logprobs: bool) -> None:
        """Record once that logprobs were asked for but the server sent none (it ignores the parameter)."""
        if self.logprobs and not has_logprobs and not self._warned_no_logprobs:
            self._warned_no_logprobs = True
            self._record("logprobs", "was asked for logprobs but returned none; scores use the label values.")

    def _record(self, option: str, change: str) -> None:
        self.adaptations.append(Adaptation(option, change))
        logger.warning("%s %s", self.name, change)


class OpenAIAdapter(Adapter):
    """OpenAI-family LLMs (``OpenAI``, ``OpenAILike``, ``AzureOpenAI``): each request sends the answer budget,
    structured output and, for reasoning models, the lowest reasoning effort; a refused ``logprobs``/``top_logprobs``,
    temperature, ``max_tokens``, reasoning effort or ``response_format`` is changed once for the instance. Their own
    client retries are off, and their own ``max_tokens`` is not sent: each call asks for the budget its answer needs.
    """

    ADAPTS = ("logprobs", "top_logprobs", "temperature", "max_tokens", "reasoning_effort", "response_format")
    takes_schema = True

    def __init__(self, llm: LLM, structured: bool = False) -> None:
        super().__init__(llm, structured)
        self.structured = structured
        self.reasoning = _is_reasoning_model(llm)
        user_effort = getattr(llm, "reasoning_effort", None)
        self.efforts = [user_effort] if user_effort else list(REASONING_EFFORTS) if self.reasoning else []
        self.room = REASONING_ROOM if self.reasoning else 0
        self.temperature: float | None = None
        self.token_param = "max_tokens"

    def _working_copy(self, llm: LLM) -> LLM:
        """A copy for the reranker's calls; the original is left as it was. Its own retries are off (ours are the
        only ones), and so is its ``max_tokens``: each call sends the budget it needs, and LlamaIndex would send the
        LLM's own value instead (a label-sized budget lost, or one a reasoning model refuses)."""
        update = {name: value for name, value in (("max_retries", 0), ("max_tokens", None))
                  if getattr(llm, name, value) != value}  # fmt: skip
        if not update:
            return llm
        copy = llm.model_copy(update=update)
        for name in ("_client", "_aclient"):  # an openai client the LLM already built carries its own max_retries
            client = getattr(copy, name, None)
            if client is not None:
                setattr(copy, name, without_retries(client))
        return copy

    def options(self, max_tokens: int, schema: dict[str, Any] | None, grown: bool = False) -> dict[str, Any]:
        """The answer budget (plus room to think), the reasoning effort, a temperature the provider forced, and the
        JSON schema when structured output is on."""
        room = GROWN_ROOM if grown else self.room
        kwargs: dict[str, Any] = {self.token_param: max_tokens + room}
        if self.efforts:
            kwargs["reasoning_effort"] = self.efforts[0]
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.structured and schema is not None:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "labels", "strict": True, "schema": schema}}
        return kwargs

    def _change_for(self, param: str | None, message: str) -> tuple[str, str] | None:
        llm = self.llm
        if param in ("logprobs", "top_logprobs") and getattr(llm, "logprobs", False):
            most = _MAXIMUM.search(message)
            if most and 0 < int(most.group(1)) < llm.top_logprobs:
                self.llm = llm.model_copy(update={"top_logprobs": int(most.group(1))})
                return f"top_logprobs={llm.top_logprobs}", f"asking for {most.group(1)}"
            param = "logprobs"
        if param == "logprobs" and getattr(llm, "logprobs", False):
            self.llm = llm.model_copy(update={"logprobs": None})
            return "logprobs", "sending requests without them; scores fall back to the label values"
        if param == "temperature" and self.temperature is None:
            self.temperature = 1.0
            return f"temperature={getattr(llm, 'temperature', None)}", "sending the API default temperature (1)"
        if param == "max_tokens" and self.token_param == "max_tokens":
            self.token_param = "max_completion_tokens"
            return "max_tokens", "sending max_completion_tokens instead"
        if param == "reasoning_effort" and self.efforts:
            refused = self.efforts.pop(0)
            return f"reasoning_effort={refused!r}", f"sending {self.efforts[0]!r}" if self.efforts else "sending none"
        if param == "response_format" and self.structured:
            self.structured = False
            return "structured output (response_format)", "asking for the plain text answer"
        return None

    def more_room(self, response: Any) -> bool:
        """The token budget ran out (``finish_reason="length"``) before the answer: it is empty, or it follows
        reasoning written into the text (``<think>``), which used up the budget meant for the labels. The first
        time, later requests get :data:`GROWN_ROOM` too."""
        if _raw_choice(response, "finish_reason") != "length":
            return False
        text = _text(response)
        answer = answer_part(text)
        if answer.strip() and answer == text:
            return False
        if self.room < GROWN_ROOM:
            self.room = GROWN_ROOM
            self._record(self.token_param, "spent the whole answer budget before answering (reasoning); asking for "
                         f"{GROWN_ROOM} more completion tokens from now on.")  # fmt: skip
        return True


def adapter_for(llm: LLM, structured: bool = False) -> Adapter:
    """The adapter for ``llm``'s family (``structured``: ask for a JSON answer, which only some families can)."""
    return OpenAIAdapter(llm, structured) if is_openai_family(llm) else Adapter(llm, structured)


def is_openai_family(llm: LLM) -> bool:
    """``OpenAI``, ``OpenAILike``, ``AzureOpenAI`` and subclasses (only if their module is already imported:
    importing it for other LLMs would cost ~0.7 s)."""
    module = sys.modules.get("llama_index.llms.openai")
    return module is not None and isinstance(llm, module.OpenAI)


def _is_reasoning_model(llm: LLM) -> bool:
    from llama_index.llms.openai.utils import O1_MODELS

    return getattr(llm, "model", None) in O1_MODELS


def without_retries(client: Any) -> Any:
    """An openai client that does not retry (it retries twice by default, under the reranker's own retries): a copy
    made with ``with_options(max_retries=0)``; anything else, or a client that does not retry, as it is."""
    if getattr(client, "max_retries", 0) and hasattr(client, "with_options"):
        return client.with_options(max_retries=0)
    return client


def sampled_first(content: Sequence[Any]) -> list[list[LogProb]]:
    """OpenAI's per-token logprobs (``[{token, logprob, bytes, top_logprobs: [...]}]``, the openai client's objects
    or plain dicts) as LlamaIndex ``LogProb`` lists: at each position the sampled token first, then the other
    alternatives."""
    return [[_logprob(c)] + [_logprob(a) for a in _part(c, "top_logprobs") or [] if _part(a, "token") != _part(c, "token")]
            for c in content]  # fmt: skip


def _part(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _logprob(item: Any) -> LogProb:
    return LogProb(token=_part(item, "token"), logprob=_part(item, "logprob"), bytes=list(_part(item, "bytes") or []))


def _raw_choice(response: Any, field: str) -> Any:
    """``field`` of the first choice of the raw OpenAI-style reply (an object or a dict), if there is one."""
    raw = getattr(response, "raw", None)
    choices = raw.get("choices") if isinstance(raw, dict) else getattr(raw, "choices", None)
    if not choices:
        return None
    return _part(choices[0], field)


def _text(response: Any) -> str:
    return (response.message.content if hasattr(response, "message") else response.text) or ""
