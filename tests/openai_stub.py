"""A stub server speaking OpenAI's chat-completions wire format, the way one provider does, for wire-level tests.

``StubServer(profile)`` listens on 127.0.0.1 (ephemeral port, background thread, stdlib ``http.server``). It reads
the reranker's prompt from the last user message (``Query: ...``, passages fenced ``<passage id="i">``, the label
line ``... exactly one of these labels: "a", "b".``), judges each passage with ``profile.judge(query, passage)``
and answers ``[i] label`` lines, or a JSON object when the request asks for a ``json_schema`` response format. It
enforces what the profile's provider enforces (parameters, ``top_logprobs`` maximum, reasoning budgets) with that
provider's error bodies, and returns logprobs whose tokens concatenate to the content::

    with StubServer("openai-reasoning", script=[ERRORS[429], DROP]) as stub:
        client = openai.OpenAI(base_url=stub.url, api_key="k", max_retries=0)
        ...                   # the first two chat requests get the scripted replies, later ones normal answers
        stub.requests         # every request that arrived: method, path, query, headers, parsed JSON body

Each entry of ``PROFILES`` cites the public source of the behaviour it reproduces. Token counts are approximate
(one token per word, number or punctuation run), unless the profile has a real ``tokenizer`` (``cl100k()``): then
``usage`` counts what arrived the way OpenAI counts a chat request (``chat_prompt_tokens``).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

DEFAULT_LABELS = ("unlikely", "likely", "very likely")
LABEL_CONFIDENCE = 0.7  # probability of the chosen label's first token; the other labels share most of the rest
CERTAIN = -1e-4  # logprob of every token that is not a label's first token

_PASSAGE = re.compile(r'<passage id="(\d+)">\n(.*?)\n</passage>', re.S)
_QUERY = re.compile(r"^Query: (.*)$", re.M)
_LABEL_LINE = re.compile(r"exactly one of these labels: (.*?)\.?$", re.M)
_TOKEN = re.compile(r"\s*[^\W\d]+|\s*\d+|\s*[^\w\s]+|\s+")
_AZURE_CHAT = re.compile(r"^/openai/deployments/([^/]+)/chat/completions$")


# --- what the stub reads and how it judges -------------------------------------------------------------------------


def keyword_judge(query: str, passage: str) -> str:
    """``"very likely"`` if the passage contains a query word of 4+ letters, else ``"unlikely"``."""
    words = {w.casefold() for w in re.findall(r"[^\W\d_]{4,}", query)}
    return "very likely" if words & {w.casefold() for w in re.findall(r"[^\W\d_]+", passage)} else "unlikely"


@dataclass(frozen=True)
class Prompt:
    """What the stub understood of a rerank prompt."""

    query: str
    passages: dict[str, str]
    labels: tuple[str, ...]


def read_prompt(messages: list[dict[str, Any]]) -> Prompt:
    """The query, the fenced passages by id and the offered labels, from the last user message."""
    user = [m for m in messages if m.get("role") == "user"]
    content = user[-1].get("content", "") if user else ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    query = _QUERY.search(content)
    line = _LABEL_LINE.search(content)
    labels = tuple(re.findall(r'"([^"]+)"', line.group(1))) if line else ()
    return Prompt(query.group(1) if query else "", dict(_PASSAGE.findall(content)), labels or DEFAULT_LABELS)


def tokenize(text: str) -> list[str]:
    """Word-ish tokens that concatenate exactly to ``text`` (leading white space stays with the next token)."""
    return _TOKEN.findall(text)


def cl100k() -> Callable[[str], list[int]]:
    """tiktoken's ``cl100k_base``, read offline from the copy LlamaIndex bundles; every text counts as ordinary text."""
    import os

    import llama_index.core
    import tiktoken

    bundled = os.path.join(os.path.dirname(llama_index.core.__file__), "_static", "tiktoken_cache")
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = bundled
    try:
        return tiktoken.get_encoding("cl100k_base").encode_ordinary
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


def chat_prompt_tokens(messages: list[dict[str, Any]], encode: Callable[[str], list[int]]) -> int:
    """Prompt tokens of a chat request as OpenAI counts them: each message's role and content plus 3 tokens of
    format, and 3 that prime the reply (OpenAI cookbook, "How to count tokens with tiktoken")."""
    return 3 + sum(3 + len(encode(str(m.get("role") or ""))) + len(encode(str(m.get("content") or "")))
                   for m in messages)


# --- profiles ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reasoning:
    """A reasoning model's hidden thinking: the ``reasoning_effort`` values it takes, its default, tokens per effort."""

    efforts: tuple[str, ...]
    default: str
    need: Mapping[str, int]
    sampling_at_none: bool = False  # logprobs and temperature are accepted when the effort is "none"


@dataclass(frozen=True)
class Profile:
    """How one provider answers. ``dataclasses.replace`` makes variants (another judge, model or limit)."""

    name: str
    model: str
    dialect: str = "openai"  # error bodies and messages: openai, azure, vllm, ollama, llamacpp
    logprobs: bool = True  # False: the request's logprobs fields are ignored, the reply has none
    max_top_logprobs: int | None = 20  # None: no maximum
    logprob_ids: bool = False  # each logprob entry also carries the token id (llama.cpp)
    structured: str = "yes"  # json_schema response_format: "yes", "ignore" (plain answer) or "reject" (400)
    usage: bool = True
    usage_details: bool = False  # usage.completion_tokens_details.reasoning_tokens (OpenAI, Azure)
    reasoning: Reasoning | None = None  # hidden reasoning tokens (OpenAI reasoning models)
    thinking: str | None = None  # visible reasoning: "inline" (<think> in content) or the message field's name
    strict_model: bool = True  # an unknown model (Azure: deployment) gets the provider's 404
    judge: Callable[[str, str], str] = keyword_judge
    tokenizer: Callable[[str], list[int]] | None = None  # usage counted with it (e.g. cl100k()), not word-ish tokens


_OLLAMA_EFFORTS = ("high", "medium", "low", "none")
_GPT5_NEED = {"none": 0, "minimal": 16, "low": 64, "medium": 200, "high": 800}

PROFILES: dict[str, Profile] = {
    # OpenAI chat models (gpt-4.1 / gpt-4o-mini): logprobs with top_logprobs 0..20, any temperature, max_tokens.
    # openai-python 2.x types/chat/completion_create_params.py: top_logprobs is "An integer between 0 and 20";
    # chat_completion_token_logprob.py: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}.
    # https://github.com/openai/openai-python/issues/2227 shows logprobs returned together with Structured Outputs.
    # reasoning_effort: 400 "Unsupported parameter: 'reasoning.effort' is not supported with this model." on gpt-4.1
    # (https://github.com/BoundaryML/baml/pull/2708, Responses API; the stub names the chat parameter).
    "openai-chat": Profile("openai-chat", "gpt-4.1-mini", usage_details=True),
    # OpenAI gpt-5 family (gpt-5, -mini, -nano): reasoning efforts minimal/low/medium/high, default medium.
    # - logprobs: 400 "Unsupported parameter: 'logprobs' is not supported with this model." (error text quoted in
    #   https://github.com/sashabaranov/go-openai/pull/1061; "GPT-5 removed parameters: logprob, Top-p, temperature",
    #   community.openai.com/t/gpt-5-removed-parameters-logprob-top-p-temperature/1345768).
    # - temperature: 400 "Unsupported value: 'temperature' does not support 0 with this model. Only the default (1)
    #   value is supported.", param temperature, code unsupported_value
    #   (https://github.com/gabrii/Cursor-Azure-GPT-5/issues/33).
    # - max_tokens: 400 "... Use 'max_completion_tokens' instead.", param max_tokens, code unsupported_parameter
    #   (https://github.com/griptape-ai/ComfyUI-Griptape/issues/312).
    # - reasoning tokens count against max_completion_tokens: a small budget gives HTTP 200, empty content,
    #   finish_reason "length" (https://github.com/covan-ai/covan/pull/112: gpt-5/-mini/-nano at 400 tokens,
    #   https://github.com/64bit/async-openai/issues/424). Efforts per model: community.openai.com/t/
    #   request-for-compatibility-matrix-reasoning-effort-sampling-parameters-across-gpt-5-series/1371738
    "openai-reasoning": Profile(
        "openai-reasoning",
        "gpt-5-mini",
        usage_details=True,
        reasoning=Reasoning(("minimal", "low", "medium", "high"), "medium", _GPT5_NEED),
    ),
    # gpt-5.1 and later: efforts none/low/medium/high (no minimal: 400 "Unsupported value: 'minimal' is not supported
    # with the 'gpt-5.1' model. Supported values are: 'none', 'low', 'medium', and 'high'.",
    # https://github.com/openai/openai-agents-python/issues/2089), default none (learn.microsoft.com/en-us/javascript/
    # api/@azure/ai-projects/reasoningeffort: "gpt-5.1 defaults to none"). Logprobs, temperature and top_p are
    # accepted only at effort none (https://github.com/vercel/ai/issues/10932, citing OpenAI's docs); other efforts
    # reject them as gpt-5 does. max_tokens is still rejected (https://github.com/fish2018/YPrompt/issues/26).
    "openai-reasoning-none": Profile(
        "openai-reasoning-none",
        "gpt-5.1",
        usage_details=True,
        reasoning=Reasoning(("none", "low", "medium", "high"), "none", _GPT5_NEED, sampling_at_none=True),
    ),
    # Azure OpenAI: POST /openai/deployments/{deployment}/chat/completions?api-version=..., key in the api-key
    # header. No api-version: 404 {"error": {"code": "404", "message": "Resource not found"}}
    # (https://github.com/MicrosoftDocs/azure-docs/issues/114602, https://github.com/ThinkInAIXYZ/deepchat/issues/262).
    # Bad key: 401 {"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API
    # endpoint. ..."}} (https://github.com/SciSharp/BotSharp/issues/386). Otherwise the model behaves as on OpenAI.
    "azure": Profile("azure", "gpt-4o-mini", dialect="azure", usage_details=True),
    # vLLM's OpenAI-compatible server: OpenAI's logprob shape; --max-logprobs defaults to 20 ("The default value comes
    # the default for the OpenAI Chat Completions API", docs.vllm.ai/en/stable/configuration/engine_args/), above it
    # 400 "Requested sample logprobs of 21, which is greater than max allowed: 20" (vllm/v1/engine/processor.py);
    # errors are {"error": {"message", "type": "BadRequestError", "param", "code": 400}} (vllm ErrorInfo in
    # entrypoints/openai/protocol.py; before that a flat body, https://github.com/vllm-project/vllm/issues/12886).
    # Usage is always in non-streamed replies; response_format json_schema is guided decoding.
    "vllm": Profile("vllm", "Qwen/Qwen2.5-7B-Instruct", dialect="vllm"),
    # Ollama /v1 (ollama/ollama openai/openai.go, middleware/openai.go): logprobs since v0.12.11
    # (https://github.com/BerriAI/litellm/issues/17165, https://github.com/pepperoni21/ollama-rs/issues/295), shape
    # {token, logprob, bytes, top_logprobs}; server/routes.go: 400 "top_logprobs must be between 0 and 20"; errors
    # {"error": {"message", "type", "param": null, "code": null}}; usage always set; json_schema -> format.
    "ollama": Profile("ollama", "qwen2.5:7b", dialect="ollama"),
    # Ollama before v0.12.11: ChatCompletionRequest has no logprobs field (openai/openai.go at 00988753), so Go's
    # JSON decoding drops it and the reply carries no logprobs.
    "ollama-old": Profile("ollama-old", "qwen2.5:7b", dialect="ollama", logprobs=False),
    # llama.cpp server /v1/chat/completions, observed here on the bundled xllamacpp build: logprob entries
    # {id, token, bytes, logprob, top_logprobs: [{id, token, bytes, logprob}]}, top_logprobs=50 accepted (no maximum),
    # usage {prompt_tokens, completion_tokens, total_tokens} without completion_tokens_details, json_schema
    # constrained, the model name ignored, errors {"error": {"code": 400, "message", "type"}}. OAI-compatible
    # logprobs since https://github.com/ggml-org/llama.cpp/pull/10783.
    "llamacpp": Profile(
        "llamacpp", "qwen2.5-coder-1.5b-instruct", dialect="llamacpp", max_top_logprobs=None, logprob_ids=True,
        strict_model=False,
    ),
    # Thinking models (Qwen3, DeepSeek-R1 distills) write <think>...</think> before the answer in content when no
    # reasoning parser runs (https://github.com/ggml-org/llama.cpp/issues/13867, docs.sglang.io separate_reasoning).
    # The reasoning holds decoy "[i] label" lines that differ from the answer.
    "thinking": Profile("thinking", "Qwen/Qwen3-8B", dialect="vllm", thinking="inline"),
    # The same with a reasoning parser: llama.cpp (--reasoning-format deepseek) and vLLM before its rename put it
    # in message.reasoning_content (docs.vllm.ai/en/v0.7.2 features/reasoning_outputs).
    "thinking-reasoning-content": Profile(
        "thinking-reasoning-content", "Qwen/Qwen3-8B", dialect="vllm", thinking="reasoning_content"
    ),
    # vLLM since https://github.com/vllm-project/vllm/pull/27752 and Ollama /v1 (Message.Reasoning) use
    # message.reasoning.
    "thinking-reasoning": Profile("thinking-reasoning", "qwen3:8b", dialect="ollama", thinking="reasoning"),
}


# --- replies -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A scripted HTTP reply. ``body=None`` answers normally after ``delay``; ``drop`` closes the socket unanswered."""

    status: int = 200
    body: Any = None  # a dict is sent as JSON, a str as it is
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


def openai_error(status: int, message: str, type_: str, code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None) -> Reply:
    """A reply with OpenAI's error body ``{"error": {message, type, param, code}}``."""
    return Reply(status, {"error": {"message": message, "type": type_, "param": param, "code": code}},
                 dict(headers or {}))


def rate_limited(retry_after: str) -> Reply:
    """429 with ``Retry-After`` in seconds (``"2"``) or as an HTTP date."""
    return openai_error(
        429,
        "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 1s.",
        "requests",
        "rate_limit_exceeded",
        headers={"Retry-After": retry_after},
    )


def slow(seconds: float) -> Reply:
    """A normal answer sent after ``seconds`` (longer than a client's timeout: APITimeoutError)."""
    return Reply(delay=seconds)


# The usual OpenAI error bodies (messages as OpenAI sends them; see the issue threads cited in PROFILES).
ERRORS: dict[int, Reply] = {
    400: openai_error(400, "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                      "using your HTTP library correctly.)", "invalid_request_error"),
    401: openai_error(401, "Incorrect API key provided: sk-stub. You can find your API key at "
                      "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key"),
    404: openai_error(404, "The model `gpt-stub` does not exist or you do not have access to it.",
                      "invalid_request_error", "model_not_found"),
    429: rate_limited("1"),
    500: openai_error(500, "The server had an error while processing your request. Sorry about that!", "server_error"),
    503: openai_error(503, "The engine is currently overloaded, please try again later.", "server_error"),
}
DROP = Reply(drop=True)  # the connection closes without a response: APIConnectionError
MALFORMED = Reply(200, '{"id": "chatcmpl-stub", "choices": [', {"Content-Type": "application/json"})


def _html(status: int, title: str) -> Reply:
    """nginx's own error page for ``status``."""
    return Reply(status, f"<html>\r\n<head><title>{status} {title}</title></head>\r\n<body>\r\n<center><h1>{status} "
                 f"{title}</h1></center>\r\n<hr><center>nginx/1.18.0</center>\r\n</body>\r\n</html>\r\n",
                 {"Content-Type": "text/html"})


# Replies no retry can fix, as a misconfigured deployment sends them.
MISCONFIGURED: dict[str, Reply] = {
    # The api_base is a web server, or a route that takes no POST: nginx's 405 page
    # (https://github.com/Blaizzy/mlx-vlm/issues/1689), or a Python server's {"detail": "Method Not Allowed"}
    # (https://github.com/mealie-recipes/mealie/issues/7123: an Open WebUI base URL without /api).
    "405 nginx": _html(405, "Not Allowed"),
    "405 json": Reply(405, {"detail": "Method Not Allowed"}),
    # A proxy's body limit (nginx client_max_body_size, 1 MB by default) answers with its own page
    # (https://github.com/ChronoAIProject/NyxID/issues/957, https://github.com/CosmosShadow/gptpdf/issues/38).
    "413 nginx": _html(413, "Request Entity Too Large"),
    # OpenAI when the account has no credit left: 429, type and code insufficient_quota
    # (body quoted in https://github.com/mattvr/ShellGPT/issues/23; platform.openai.com/docs/guides/error-codes).
    "429 quota": openai_error(429, "You exceeded your current quota, please check your plan and billing details. For "
                              "more information on this error, read the docs: https://platform.openai.com/docs/guides/"
                              "error-codes/api-errors.", "insufficient_quota", "insufficient_quota"),
    # 200 with a web page (a web app's index page for every path): the openai client returns a body that is not JSON
    # as a string (openai/_response.py), which the LLM classes cannot read ("'str' object has no attribute
    # 'choices'", https://github.com/NEKOparapa/AiNiee/issues/151: a relay answering in its own format).
    "200 html": Reply(200, "<!doctype html><html><head><title>Open WebUI</title></head><body><div id=\"app\"></div>"
                      "</body></html>", {"Content-Type": "text/html; charset=utf-8"}),
    # 200 JSON of another API: Ollama's native /api/chat reply (github.com/ollama/ollama docs/api.md), no choices.
    "200 json": Reply(200, {"model": "qwen2.5:7b", "created_at": "2026-11-30T12:00:00Z", "message": {
        "role": "assistant", "content": "Hello"}, "done": True}),
}


def _error(dialect: str, status: int, message: str, param: str | None = None, code: str | None = None) -> Reply:
    """An error in the body shape of ``dialect``'s server."""
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    if dialect == "vllm":
        kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
        return Reply(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})
    if dialect == "llamacpp":
        return Reply(status, {"error": {"code": status, "message": message, "type": kind}})
    if dialect == "ollama":
        return Reply(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})
    return openai_error(status, message, "invalid_request_error", code, param)  # openai, azure


def _unsupported(dialect: str, param: str, extra: str = "") -> Reply:
    return _error(dialect, 400, f"Unsupported parameter: '{param}' is not supported with this model.{extra}",
                  param, "unsupported_parameter")


def _listing(values: Iterable[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def _top_logprobs_error(profile: Profile, k: int) -> Reply:
    limit = profile.max_top_logprobs
    message = {
        "vllm": f"Requested sample logprobs of {k}, which is greater than max allowed: {limit}",
        "ollama": f"top_logprobs must be between 0 and {limit}",
    }.get(profile.dialect, f"Invalid 'top_logprobs': integer above maximum value. Expected a value <= {limit}, "
                           f"but got {k} instead.")
    return _error(profile.dialect, 400, message, "top_logprobs", "integer_above_max_value")


def _model_not_found(profile: Profile, model: Any) -> Reply:
    if profile.dialect == "azure":
        return Reply(404, {"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource "
                                     "does not exist. If you created the deployment within the last 5 minutes, please "
                                     "wait a moment and try again."}})
    message = {
        "vllm": f"The model `{model}` does not exist.",
        "ollama": f"model '{model}' not found",
    }.get(profile.dialect, f"The model `{model}` does not exist or you do not have access to it.")
    return _error(profile.dialect, 404, message, code="model_not_found")


# --- answers -------------------------------------------------------------------------------------------------------

Segment = tuple[str, str | None]  # text, and the label it spells (its first token gets label alternatives)


def _schema_enums(schema: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{property: enum}`` of a flat object schema; local ``$ref``s (pydantic's ``$defs``) are followed."""
    def resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
        ref = node.get("$ref", "")
        if not ref.startswith("#/"):
            return node
        target: Any = schema
        for part in ref[2:].split("/"):
            target = target[part]
        return target

    enums = {}
    for key, node in (schema.get("properties") or {}).items():
        node = resolve(node)
        if not node.get("enum"):
            raise ValueError(f"stub: property {key!r} of the response schema has no enum of labels")
        enums[key] = list(node["enum"])
    if not enums:
        raise ValueError("stub: the response schema has no properties to fill")
    return enums


def _tokens(segments: list[Segment]) -> list[tuple[str, str | None]]:
    """Tokens, each with the label whose first token it is (or None)."""
    out: list[tuple[str, str | None]] = []
    for text, label in segments:
        out += [(tok, label if i == 0 else None) for i, tok in enumerate(tokenize(text))]
    return out


def _logprob_entry(token: str, logprob: float, with_id: bool) -> dict[str, Any]:
    entry = {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    return {"id": sum(token.encode()) % 100_000, **entry} if with_id else entry


def _logprobs(tokens: list[tuple[str, str | None]], labels: tuple[str, ...], top: int, with_id: bool) -> list:
    """OpenAI's ``logprobs.content``: at a label's first token the other labels' first tokens are the alternatives."""
    content = []
    for token, label in tokens:
        options = [(token, CERTAIN)]
        if label is not None:
            space = token[: len(token) - len(token.lstrip())]
            near = sorted(labels, key=lambda other: abs(labels.index(other) - labels.index(label))) \
                if label in labels else labels  # the nearer a label on the scale, the likelier its token
            others = [o for o in dict.fromkeys(space + other.split()[0] for other in near) if o != token]
            rest = (1 - LABEL_CONFIDENCE) * 0.9  # a little mass stays outside the labels
            weights = [2.0 ** -n for n in range(len(others))]
            options = [(token, math.log(LABEL_CONFIDENCE))] + [
                (other, math.log(rest * w / sum(weights))) for other, w in zip(others, weights)
            ]
        entry = _logprob_entry(token, options[0][1], with_id)
        entry["top_logprobs"] = [_logprob_entry(t, lp, with_id) for t, lp in options[:top]]
        content.append(entry)
    return content


def _check(profile: Profile, body: Mapping[str, Any]) -> Reply | None:
    """The provider's 400 for a parameter it rejects, or None."""
    dialect, reasoning = profile.dialect, profile.reasoning
    top, effort = body.get("top_logprobs"), body.get("reasoning_effort")
    if reasoning is None and effort is not None:
        if dialect in ("openai", "azure"):  # gpt-4.1: https://github.com/BoundaryML/baml/pull/2708
            return _unsupported(dialect, "reasoning_effort")
        if dialect == "ollama" and effort not in _OLLAMA_EFFORTS:  # openai/openai.go FromChatRequest
            return _error(dialect, 400, f"invalid reasoning value: '{effort}' (must be \"high\", \"medium\", "
                          '"low", or "none")')
    if reasoning is not None:
        if "max_tokens" in body:
            return _unsupported(dialect, "max_tokens", " Use 'max_completion_tokens' instead.")
        if effort is not None and effort not in reasoning.efforts:
            return _error(dialect, 400, f"Unsupported value: '{effort}' is not supported with the '{profile.model}' "
                          f"model. Supported values are: {_listing(reasoning.efforts)}.", "reasoning_effort",
                          "unsupported_value")
        sampling = reasoning.sampling_at_none and (effort or reasoning.default) == "none"
        temperature = body.get("temperature")
        if temperature is not None and temperature != 1 and not sampling:
            return _error(dialect, 400, f"Unsupported value: 'temperature' does not support {json.dumps(temperature)} "
                          "with this model. Only the default (1) value is supported.", "temperature",
                          "unsupported_value")
        for param in ("logprobs", "top_logprobs"):
            if body.get(param) is not None and not sampling:
                return _unsupported(dialect, param)
    if profile.logprobs and top is not None and profile.max_top_logprobs is not None \
            and top > profile.max_top_logprobs:
        return _top_logprobs_error(profile, top)
    wants_schema = (body.get("response_format") or {}).get("type") == "json_schema"
    if wants_schema and profile.structured == "reject":
        return _error(dialect, 400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported with "
                      "this model. Learn more about supported models at the Structured Outputs guide: "
                      "https://platform.openai.com/docs/guides/structured-outputs")  # langchain-ai/langchain#31490
    return None


def _answer_segments(profile: Profile, body: Mapping[str, Any], judged: Mapping[str, str]) -> list[Segment]:
    """``[i] label`` lines, or the JSON object a ``json_schema`` response format asks for (ValueError if unfillable)."""
    response_format = body.get("response_format") or {}
    if response_format.get("type") != "json_schema" or profile.structured != "yes":
        return [segment for n, (pid, label) in enumerate(judged.items())
                for segment in ((("\n" if n else "") + f"[{pid}]", None), (" " + label, label))]
    enums = _schema_enums((response_format.get("json_schema") or {}).get("schema") or {})
    bad = {key: judged.get(key) for key, enum in enums.items() if judged.get(key) not in enum}
    if bad:
        raise ValueError(f"stub: no judged label in the schema's enum for {bad}")
    segments: list[Segment] = [("{", None)]
    for n, key in enumerate(enums):
        segments += [(("" if n == 0 else ", ") + json.dumps(key) + ': "', None),
                     (json.dumps(judged[key])[1:-1], judged[key]), ('"', None)]
    return segments + [("}", None)]


def _thought_segments(judged: Mapping[str, str], labels: tuple[str, ...]) -> list[Segment]:
    """A thinking model's reasoning, with decoy ``[i] label`` lines that differ from the answer."""
    segments: list[Segment] = [("Let me check each passage against the query.", None)]
    for pid, label in judged.items():
        decoy = labels[0] if label != labels[0] else labels[-1]
        segments += [(f"\n[{pid}]", None), (" " + decoy, decoy)]
    return segments + [("\nNow I will answer.", None)]


def answer(profile: Profile, body: Mapping[str, Any], model: Any) -> Reply:
    """The provider's reply to one chat-completions request body."""
    if profile.strict_model and model != profile.model:
        return _model_not_found(profile, model)
    if not isinstance(body.get("messages"), list):
        return _error(profile.dialect, 400, "stub: the request has no 'messages' list", "messages")
    rejected = _check(profile, body)
    if rejected:
        return rejected
    prompt = read_prompt(body["messages"])
    judged = {pid: profile.judge(prompt.query, text) for pid, text in prompt.passages.items()}
    try:
        segments = _answer_segments(profile, body, judged)
    except ValueError as exc:
        return _error(profile.dialect, 400, str(exc), "response_format")
    thought = _thought_segments(judged, prompt.labels) if profile.thinking else []
    if profile.thinking == "inline":
        segments, thought = [("<think>\n", None), *thought, ("\n</think>\n\n", None), *segments], []

    # Hidden reasoning, then visible reasoning, then the answer, all within max_completion_tokens (or max_tokens).
    reasoning = profile.reasoning
    hidden = reasoning.need[body.get("reasoning_effort") or reasoning.default] if reasoning else 0
    thought_tokens, answer_tokens = _tokens(thought), _tokens(segments)
    wanted = hidden + len(thought_tokens) + len(answer_tokens)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and wanted > limit:
        hidden = min(hidden, limit)
        thought_tokens = thought_tokens[: limit - hidden]
        answer_tokens = answer_tokens[: limit - hidden - len(thought_tokens)]
    used = hidden + len(thought_tokens) + len(answer_tokens)

    message: dict[str, Any] = {"role": "assistant", "content": "".join(tok for tok, _ in answer_tokens)}
    if profile.thinking and profile.thinking != "inline":
        message[profile.thinking] = "".join(tok for tok, _ in thought_tokens)
    choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                              "finish_reason": "length" if used < wanted else "stop"}
    if body.get("logprobs") and profile.logprobs:
        top = body.get("top_logprobs") or 0
        choice["logprobs"] = {"content": _logprobs(answer_tokens, prompt.labels, top, profile.logprob_ids)}
    reply: dict[str, Any] = {"id": f"chatcmpl-stub{time.monotonic_ns()}", "object": "chat.completion",
                             "created": int(time.time()), "model": model, "choices": [choice]}
    if profile.usage:
        prompt_tokens = sum(len(tokenize(str(m.get("content") or ""))) for m in body["messages"])
        if profile.tokenizer is not None:  # counted independently of the client, with a real tokenizer
            prompt_tokens = chat_prompt_tokens(body["messages"], profile.tokenizer)
            used = hidden + len(profile.tokenizer("".join(tok for tok, _ in thought_tokens + answer_tokens)))
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                                 "total_tokens": prompt_tokens + used}
        if profile.usage_details:
            usage["completion_tokens_details"] = {"reasoning_tokens": hidden}
        reply["usage"] = usage
    return Reply(200, reply)


# --- the server ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request as it arrived; ``body`` is the parsed JSON (or the raw text when it is not JSON)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        request = Request(self.command, url.path, dict(parse_qsl(url.query)),
                          {k.lower(): v for k, v in self.headers.items()}, body)
        reply = self.server.stub._reply(request)
        if reply.delay and self.server.stub._closing.wait(reply.delay):
            reply = DROP
        if reply.drop:
            self.close_connection = True
            return
        data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
        try:
            self.send_response(reply.status)
            headers = {"Content-Type": "application/json", **reply.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data.encode())))
            self.end_headers()
            self.wfile.write(data.encode())
        except OSError:  # the client gave up (timeout) and closed the socket
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up close()
    stub: "StubServer"


class StubServer:
    """The stub on 127.0.0.1; a context manager. ``script`` replies go, in order, to the first chat requests."""

    def __init__(self, profile: Profile | str = "openai-chat", script: Iterable[Reply] = (),
                 api_key: str | None = None) -> None:
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.script = list(script)
        self.api_key = api_key  # when set, other keys get the provider's 401
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if self._http is None:
            raise RuntimeError("the stub is not running; use it as a context manager or call start()")
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    @property
    def url(self) -> str:
        """The base URL a client is given: ``.../v1``; for Azure the endpoint (``azure_endpoint``)."""
        return self.origin if self.profile.dialect == "azure" else self.origin + "/v1"

    @property
    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/chat/completions")]

    def start(self) -> "StubServer":
        self._http = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._http.stub = self
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.01,), name=f"stub-{self.profile.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> "StubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reply(self, request: Request) -> Reply:
        profile = self.profile
        azure = _AZURE_CHAT.match(request.path)
        is_chat = request.method == "POST" and (request.path == "/v1/chat/completions" or bool(azure))
        with self._lock:
            self.requests.append(request)
            refused = self._refuse(request, azure)
            scripted = self.script.pop(0) if is_chat and not refused and self.script else None
        if refused is not None:
            return refused
        if scripted is not None and (scripted.body is not None or scripted.drop):
            return scripted
        if request.method == "GET" and request.path == "/v1/models":
            return Reply(200, {"object": "list", "data": [{"id": profile.model, "object": "model", "created": 0,
                                                           "owned_by": "stub"}]})
        if not is_chat:
            return _error(profile.dialect, 404, f"Invalid URL ({request.method} {request.path})")
        body = request.body if isinstance(request.body, dict) else {}
        reply = answer(profile, body, azure.group(1) if azure else body.get("model"))
        return Reply(reply.status, reply.body, reply.headers, delay=scripted.delay if scripted else 0.0)

    def _refuse(self, request: Request, azure: re.Match[str] | None) -> Reply | None:
        """Azure's 404 for a path without ``api-version``; the provider's 401 for a wrong key."""
        if self.profile.dialect == "azure":
            if azure is None or "api-version" not in request.query:
                return Reply(404, {"error": {"code": "404", "message": "Resource not found"}})
            if self.api_key is not None and request.headers.get("api-key") != self.api_key:
                return Reply(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription "
                                             "key or wrong API endpoint. Make sure to provide a valid key for an "
                                             "active subscription and use a correct regional API endpoint for your "
                                             "resource."}})
        elif self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(self.profile.dialect, 401, ERRORS[401].body["error"]["message"], code="invalid_api_key")
        return None
