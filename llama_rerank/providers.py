"""What an LLM error means, and what an LLM accepts.

Errors: *permanent* ones no retry can fix become :class:`~llama_rerank.errors.LLMConfigError`, naming the cause and
the fix: HTTP 400, 401, 403, 404 and 422 (a bad key, an unknown model, a parameter the provider refuses), 405 (the
API base is a web server or another route, not the API), 413 (a proxy refuses a request that large), OpenAI's 429
with error type or code ``insufficient_quota`` (no credit left: waiting does not help), and a reply that the
OpenAI-family classes (LlamaIndex's, LangChain's ChatOpenAI) cannot read as a chat completion (an HTML page or other
JSON answered with 200). Everything else (timeouts, dropped connections, 408/409, 429 rate limits, 5xx, exception
types we do not know) is *transient*: retried with backoff, then handled by ``on_error``.

Capabilities: :class:`Provider` keeps a private working copy of the user's LLM (the user's own object is never
changed) and the request options it has been seen to accept. OpenAI-family LLMs (``OpenAI``, ``OpenAILike``,
``AzureOpenAI``) get the answer budget, structured output and, for reasoning models, the lowest reasoning effort;
when the provider refuses ``logprobs``/``top_logprobs``, a temperature, ``max_tokens``, a reasoning effort or
``response_format``, :meth:`Provider.adapt` changes that option once for the instance, logs one warning, and the
request is sent again. Their own client retries are turned off, so ours are the only ones, and their own
``max_tokens`` is not sent: each call asks for the budget its answer needs.
"""

from __future__ import annotations

import email.utils
import logging
import re
import sys
import threading
import time
from typing import Any

from llama_index.core.llms import LLM

logger = logging.getLogger(__name__)

PERMANENT_STATUS = frozenset({400, 401, 403, 404, 405, 413, 422})
# A 429 that waiting does not fix: the account has no credit or reached a spending limit. OpenAI sends error type and
# code "insufficient_quota" (platform.openai.com/docs/guides/error-codes: "You exceeded your current quota, please
# check your plan and billing details"); the billing codes may come with that type (learn.microsoft.com/en-us/
# microsoft-cloud/dev/dev-proxy/concepts/openai-insufficient-quota).
QUOTA_CODES = frozenset({"insufficient_quota", "credit_balance_exhausted", "organization_spend_limit_exceeded",
                         "project_spend_limit_exceeded", "organization_usage_limit_exceeded"})  # fmt: skip
_SAID_MAX = 300  # characters of the provider's message quoted in an error (a proxy's answer may be a whole web page)
# Lowest first; a model that refuses one gets the next (gpt-5: minimal..high; gpt-5.1+: none..high; o-series: low..).
REASONING_EFFORTS = ("none", "minimal", "low")
REASONING_ROOM = 512  # completion tokens a reasoning model may spend thinking before it writes the labels
GROWN_ROOM = 4096  # the room given once an answer came back empty because the budget ran out
_PARAMS = ("top_logprobs", "logprobs", "max_completion_tokens", "max_tokens", "temperature", "reasoning_effort",
           "response_format")  # fmt: skip


# "Expected a value <= 20" (OpenAI), "greater than max allowed: 20" (vLLM), "must be between 0 and 20" (Ollama)
_MAXIMUM = re.compile(r"(?:<=|less than or equal to|at most|maximum(?: value)?(?: of| is)?|max allowed:?|between \d+ and)"
                      r"\s*(\d+)", re.IGNORECASE)  # fmt: skip


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (``status_code``/``status``/``code``, on it or its ``response``)."""
    for source in (exc, getattr(exc, "response", None)):
        for attr in ("status_code", "status", "code"):
            value = getattr(source, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
    return None


def _error_codes(exc: BaseException) -> set[str]:
    """The error ``code`` and ``type`` an OpenAI-style error body carries (the openai client keeps them on the error)."""
    body = getattr(exc, "body", None)
    body = body.get("error", body) if isinstance(body, dict) else {}
    values = [getattr(exc, "code", None), getattr(exc, "type", None)]
    values += [body.get("code"), body.get("type")] if isinstance(body, dict) else []
    return {value for value in values if isinstance(value, str)}


def quota_exhausted(exc: BaseException) -> bool:
    """A 429 saying the account is out of quota (``insufficient_quota``), not that requests came too fast."""
    return status_of(exc) == 429 and bool(_error_codes(exc) & QUOTA_CODES)


# Where a client reads the openai client's reply, and what it raises when that reply is no chat completion.
_REPLY_READERS = {
    "llama_index.llms.openai": (AttributeError, TypeError, IndexError, KeyError),  # 'str' object has no attribute...
    "langchain_openai": (ValueError, TypeError),  # "Unexpected response type ...", "... null value for 'choices'"
}


def not_a_completion(exc: BaseException) -> bool:
    """An OpenAI-family client failed reading a reply, so it was no chat completion: the openai client hands an HTML
    page over as a string and JSON without ``choices`` as it is; LlamaIndex's and LangChain's classes then fail."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    module = str(frame.tb_frame.f_globals.get("__name__")) if frame is not None else ""
    return any(module.startswith(name) and isinstance(exc, types) for name, types in _REPLY_READERS.items())


def is_permanent(exc: BaseException) -> bool:
    """True for errors no retry can fix (see the module docstring); everything else is worth retrying."""
    return status_of(exc) in PERMANENT_STATUS or quota_exhausted(exc) or not_a_completion(exc)


def retry_after(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait: ``Retry-After`` in seconds or as an HTTP date, or a ``retry_after``
    attribute; ``None`` when it did not say."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    value = getattr(exc, "retry_after", None)
    if value is None and headers is not None:
        value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def rejected_param(exc: BaseException) -> str | None:
    """The request parameter a 400/422 names (the openai client's ``param``, else the message), if it names one."""
    param = getattr(exc, "param", None)
    if isinstance(param, str) and param:
        return param
    message = str(exc)
    return next((p for p in _PARAMS if re.search(rf"(?<![\w]){p}(?![\w])", message)), None)


def model_identity(llm: LLM) -> str:
    """``model 'x' at <api base>``: what an error message names so the user knows which LLM it was."""
    try:
        model = llm.metadata.model_name
    except Exception:  # noqa: BLE001 - only used for messages
        model = type(llm).__name__
    base = getattr(llm, "api_base", None) or getattr(llm, "azure_endpoint", None)
    return f"model {model!r} ({type(llm).__name__}" + (f" at {base})" if base else ")")


def explain(exc: BaseException, who: str, adapts: bool = False) -> str:
    """One line for a permanent error: ``who`` refused, what they said, and how to fix it (``adapts``: the request
    came through an OpenAI-family class, whose refused options the reranker adapts by itself)."""
    if not_a_completion(exc):
        return (f"{who} answered with something that is not a chat completion ({type(exc).__name__}: {exc}): the API "
                "base URL points at a web page or another service. Set api_base (LangChain: base_url) to the "
                "OpenAI-compatible API's base URL, which usually ends in /v1 (for example http://localhost:8000/v1).")  # fmt: skip
    status = status_of(exc)
    body = getattr(exc, "body", None)  # the openai client's parsed error body: its message without the wrapping
    said = body.get("message") if isinstance(body, dict) else None
    said = " ".join(str(said if isinstance(said, str) and said else getattr(exc, "message", None) or exc).split())
    said = said if len(said) <= _SAID_MAX else said[:_SAID_MAX] + "..."
    if status == 405:
        fix = ("The API base URL does not lead to an OpenAI-compatible chat API (a web server or another route "
               "answered): set api_base to the API's base URL, which usually ends in /v1.")  # fmt: skip
    elif status == 413:
        fix = ("The request is larger than the server (or a proxy in front of it) accepts: lower window_size or "
               "max_passage_tokens, or raise the proxy's body size limit (nginx: client_max_body_size, 1 MB by "
               "default).")  # fmt: skip
    elif quota_exhausted(exc):
        fix = ("The account has no quota left (credit used up or a spending limit reached); retrying does not help: "
               "add credit or raise the limit in the provider's billing settings, or use another key or project.")  # fmt: skip
    elif status == 401:
        fix = "The API key was refused: set a valid key (OPENAI_API_KEY, or api_key=... on the LLM)."
    elif status == 403:
        fix = "The key may not use this model or endpoint: check the key's project, organisation and model access."
    elif status == 404:
        fix = ("Check the model name and the API base URL (for Azure OpenAI: the deployment name and api_version); "
               "`llama-rerank check-llm --llm ...` tries a configuration in one call.")  # fmt: skip
    elif re.search(r"context|too long|maximum.*tokens", said, re.IGNORECASE):
        fix = ("The prompt is longer than the model accepts: lower window_size or max_passage_tokens, or give the "
               "LLM its real context_window.")  # fmt: skip
    else:
        param = rejected_param(exc)
        fix = f"The request was refused{f' (parameter {param!r})' if param else ''}: check the LLM's settings (model, " + (
            "additional_kwargs). llama-rerank adapts logprobs, top_logprobs, temperature, max_tokens, reasoning_effort "
            "and response_format by itself; anything else is yours to change."
            if adapts else "its options such as logprobs or temperature): this LLM class is called as it is configured."
        )  # fmt: skip
    return f"{who} refused the request with HTTP {status}: {said.rstrip('.')}. {fix}"


def is_llm_failure(exc: BaseException) -> bool:
    """An error an LLM client raises: it carries an HTTP status, or is a timeout, a connection error, or comes from
    the openai/httpx stack, or is a reply that is no completion. The CLI turns these into one line, not a traceback."""
    module = type(exc).__module__.split(".")[0]
    return (status_of(exc) is not None or isinstance(exc, (TimeoutError, ConnectionError))
            or module in ("openai", "httpx", "httpcore") or not_a_completion(exc))  # fmt: skip


def is_openai_family(llm: LLM) -> bool:
    """``OpenAI``, ``OpenAILike``, ``AzureOpenAI`` and subclasses (only if their module is already imported:
    importing it for other LLMs would cost ~0.7 s)."""
    module = sys.modules.get("llama_index.llms.openai")
    return module is not None and isinstance(llm, module.OpenAI)


def _is_reasoning_model(llm: LLM) -> bool:
    from llama_index.llms.openai.utils import O1_MODELS

    return getattr(llm, "model", None) in O1_MODELS


def _working_copy(llm: LLM) -> LLM:
    """A copy of an OpenAI-family LLM for the reranker's calls; the original is left as it was. Its own retries are
    off (ours are the only ones), and so is its ``max_tokens``: each call sends the budget it needs, and LlamaIndex
    would send the LLM's own value instead (a label-sized budget lost, or one a reasoning model refuses)."""
    update = {name: value for name, value in (("max_retries", 0), ("max_tokens", None))
              if getattr(llm, name, value) != value}  # fmt: skip
    if not update:
        return llm
    copy = llm.model_copy(update=update)
    for name in ("_client", "_aclient"):  # an openai client the LLM already built carries its own max_retries
        client = getattr(copy, name, None)
        if client is not None and hasattr(client, "with_options"):
            setattr(copy, name, client.with_options(max_retries=0))
    return copy


class Provider:
    """The LLM as the reranker calls it: a working copy, and the options it has been seen to accept.

    Thread-safe: :meth:`adapt` changes options under a lock and bumps :attr:`version`, so requests that failed
    for the same reason at once all resend with the adapted options, and the warning is logged once.
    """

    def __init__(self, llm: LLM, structured: bool = False) -> None:
        self.original = llm
        self.openai = is_openai_family(llm)
        if structured and not self.openai:
            raise ValueError(
                f"structured_output=True needs an OpenAI-compatible LLM class (OpenAI, OpenAILike, AzureOpenAI), "
                f"which sends a JSON schema as response_format; {type(llm).__name__} has no such path. "
                "Use structured_output=False (the text answer), or OpenAILike for an OpenAI-compatible server."
            )
        self.llm = _working_copy(llm) if self.openai else llm
        self.structured = structured
        self.reasoning = self.openai and _is_reasoning_model(llm)
        user_effort = getattr(llm, "reasoning_effort", None)
        self.efforts = [user_effort] if user_effort else list(REASONING_EFFORTS) if self.reasoning else []
        self.room = REASONING_ROOM if self.reasoning else 0
        self.temperature: float | None = None
        self.token_param = "max_tokens"
        self.version = 0
        self._lock = threading.Lock()
        self._warned_no_logprobs = False

    @property
    def logprobs(self) -> bool:
        """Whether the requests ask for logprobs (the LLM's own setting, until the provider refuses them)."""
        return bool(getattr(self.llm, "logprobs", False))

    def kwargs(self, max_tokens: int, schema: dict[str, Any] | None, grown: bool = False) -> dict[str, Any]:
        """Extra keyword arguments for ``chat``/``complete``: none for LLM classes that may reject unknown ones."""
        if not self.openai:
            return {}
        room = GROWN_ROOM if grown else self.room
        kwargs: dict[str, Any] = {self.token_param: max_tokens + room}
        if self.efforts:
            kwargs["reasoning_effort"] = self.efforts[0]
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.structured and schema is not None:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "labels", "strict": True, "schema": schema}}
        return kwargs

    def adapt(self, exc: BaseException, version: int) -> bool:
        """Change the option a 400/422 refused; True when the request should be sent again at once."""
        if not self.openai or status_of(exc) not in (400, 422):
            return False
        with self._lock:
            if version != self.version:  # another request already adapted: just resend
                return True
            change = self._change_for(rejected_param(exc), str(getattr(exc, "message", None) or exc))
            if change is None:
                return False
            self.version += 1
        logger.warning("%s refused %s; %s from now on.", model_identity(self.original), *change)
        return True

    def _change_for(self, param: str | None, message: str) -> tuple[str, str] | None:
        """Apply the change for ``param`` (under the lock); returns (what was refused, what we do now)."""
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

    def grow(self) -> None:
        """An answer came back empty because the budget ran out (reasoning): give later requests more room too."""
        if self.room < GROWN_ROOM:
            self.room = GROWN_ROOM
            logger.warning(
                "%s spent the whole answer budget before answering (reasoning); asking for %d more completion "
                "tokens from now on.", model_identity(self.original), GROWN_ROOM,
            )  # fmt: skip

    def note_reply(self, has_logprobs: bool) -> None:
        """Warn once when logprobs were asked for but the server sent none (it ignores the parameter)."""
        if self.logprobs and not has_logprobs and not self._warned_no_logprobs:
            self._warned_no_logprobs = True
            logger.warning("%s was asked for logprobs but returned none; scores use the label values.",
                           model_identity(self.original))  # fmt: skip
