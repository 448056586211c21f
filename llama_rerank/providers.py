"""What an LLM error means: *permanent* ones no retry can fix become :class:`~llama_rerank.errors.LLMConfigError`, naming the cause and
the fix: HTTP 400, 401, 403, 404 and 422 (a bad key, an unknown model, a parameter the provider refuses), 405 (the
API base is a web server or another route, not the API), 413 (a proxy refuses a request that large), OpenAI's 429
with error type or code ``insufficient_quota`` (no credit left: waiting does not help), and a reply that the
OpenAI-family classes (LlamaIndex's, LangChain's ChatOpenAI) cannot read as a chat completion (an HTML page or other
JSON answered with 200). Everything else (timeouts, dropped connections, 408/409, 429 rate limits, 5xx, exception
types we do not know) is *transient*: retried with backoff, then handled by ``on_error``. What an LLM accepts, and
how a refused option is adapted, is :mod:`llama_rerank.adapters`.
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import Sequence

from llama_index.core.llms import LLM

PERMANENT_STATUS = frozenset({400, 401, 403, 404, 405, 413, 422})
# A 429 that waiting does not fix: the account has no credit or reached a spending limit. OpenAI sends error type and
# code "insufficient_quota" (platform.openai.com/docs/guides/error-codes: "You exceeded your current quota, please
# check your plan and billing details"); the billing codes may come with that type (learn.microsoft.com/en-us/
# microsoft-cloud/dev/dev-proxy/concepts/openai-insufficient-quota).
QUOTA_CODES = frozenset({"insufficient_quota", "credit_balance_exhausted", "organization_spend_limit_exceeded",
                         "project_spend_limit_exceeded", "organization_usage_limit_exceeded"})  # fmt: skip
_SAID_MAX = 300  # characters of the provider's message quoted in an error (a proxy's answer may be a whole web page)
# The request parameters a refusal's message is searched for (first found wins)
_PARAMS = ("top_logprobs", "logprobs", "max_completion_tokens", "max_tokens", "temperature", "reasoning_effort",
           "response_format")  # fmt: skip


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


def explain(exc: BaseException, who: str, adapts: Sequence[str] = ()) -> str:
    """One line for a permanent error: ``who`` refused, what they said, and how to fix it (``adapts``: the request
    options the reranker adapts by itself for this LLM, :attr:`llama_rerank.adapters.Adapter.ADAPTS`)."""
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
            f"additional_kwargs). llama-rerank adapts {', '.join(adapts[:-1])} and {adapts[-1]} by itself; anything "
            "else is yours to change."
            if adapts else "its options such as logprobs or temperature): this LLM class is called as it is configured."
        )  # fmt: skip
    return f"{who} refused the request with HTTP {status}: {said.rstrip('.')}. {fix}"


def is_llm_failure(exc: BaseException) -> bool:
    """An error an LLM client raises: it carries an HTTP status, or is a timeout, a connection error, or comes from
    the openai/httpx stack, or is a reply that is no completion. The CLI turns these into one line, not a traceback."""
    module = type(exc).__module__.split(".")[0]
    return (status_of(exc) is not None or isinstance(exc, (TimeoutError, ConnectionError))
            or module in ("openai", "httpx", "httpcore") or not_a_completion(exc))  # fmt: skip
