"""Token budgeting: the token counter, cutting passages to ``max_passage_tokens``, what the context window leaves
for passages, and packing windows that fit it. What the prompt's parts cost (fences, the answer) the prompt module
says (:mod:`llama_rerank.prompts`); this module only adds them up."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from llama_rerank.types import Candidate

logger = logging.getLogger(__name__)

Encode = Callable[[str], Sequence[Any]]
TRUNCATION_MARKER = " [...truncated]"
SAFETY_MARGIN = 32  # tokens kept free for chat formatting the count cannot see
MIN_PASSAGE_BUDGET = 64  # fewer tokens left for passages than this is an error


def resolve_encoder(llm: Any, tokenizer: Encode | None = None) -> Encode:
    """A token counter that cannot raise: ``tokenizer`` if given, else the LLM's own where LlamaIndex exposes one,
    else LlamaIndex's global tokenizer (tiktoken cl100k, bundled, works offline). Any text counts as text: a passage
    that spells a special token such as ``<|endoftext|>`` is counted, never refused; if a counter still fails on a
    text, that text is estimated at four bytes a token."""
    if tokenizer is None:
        try:
            own = llm._tokenizer  # OpenAI: tiktoken for the model; may need a download, so failures fall through
        except Exception as exc:  # noqa: BLE001 - any failure means "not available"
            logger.debug("LLM tokenizer unavailable (%s); using LlamaIndex's tokenizer", exc)
            own = None
        if own is not None and callable(getattr(own, "encode_ordinary", None)):
            tokenizer = own.encode_ordinary  # tiktoken: text that spells a special token is ordinary text
        elif own is not None and callable(getattr(own, "encode", None)):
            tokenizer = own.encode
        else:
            from llama_index.core.utils import get_tokenizer

            tokenizer = get_tokenizer()
    return _never_raises(tokenizer)


def _never_raises(encode: Encode) -> Encode:
    def count(text: str) -> Sequence[Any]:
        try:
            return encode(text)
        except Exception as exc:  # noqa: BLE001 - a token count must never fail a rerank
            logger.debug("tokenizer failed on a text (%s: %s); estimating its tokens", type(exc).__name__, exc)
            return range(len(text.encode("utf-8")) // 4 + 1)

    return count


def truncate(text: str, max_tokens: int, encode: Encode) -> tuple[str, int]:
    """Cut ``text`` to at most ``max_tokens`` tokens at a word boundary, marking the cut; returns (text, tokens)."""
    count = len(encode(text))
    if count <= max_tokens:
        return text, count
    cut = len(text) * max_tokens // count
    while cut > 0:
        head = text[:cut]
        if " " in head:
            head = head[: head.rindex(" ")]
        candidate = head.rstrip() + TRUNCATION_MARKER
        count = len(encode(candidate))
        if count <= max_tokens:
            return candidate, count
        cut = min(len(head), cut * max_tokens // count) - 1
    return TRUNCATION_MARKER.strip(), len(encode(TRUNCATION_MARKER.strip()))


def passage_budget(context_window: int, prompt_tokens: int, answer_tokens: int) -> int:
    """Tokens left for passages in one window once the prompt (``prompt_tokens``: rendered with the query and no
    passages) and the answer are counted; an error when too few are left to judge anything."""
    budget = context_window - prompt_tokens - answer_tokens - SAFETY_MARGIN
    if budget < MIN_PASSAGE_BUDGET:
        raise ValueError(
            f"the query and prompt take {prompt_tokens} tokens, leaving {budget} of the LLM's context window "
            f"({context_window}) for passages; shorten the query or use a larger window_size/context"
        )
    return budget


def pack_windows(
    candidates: Sequence[Candidate], window_size: int, passage_budget: int, fence: int, encode: Encode
) -> list[list[Candidate]]:
    """Group candidates in retrieval order into windows of at most ``window_size`` whose passages fit the budget.

    ``passage_budget`` is what the context window leaves for passages once the prompt, the query and the answer
    are counted (:func:`passage_budget`); each passage costs its tokens plus ``fence`` (the prompt's
    :func:`~llama_rerank.prompts.fence_tokens`). A passage longer than the budget on its own is cut further to fit.
    """
    windows: list[list[Candidate]] = []
    current: list[Candidate] = []
    used = 0
    for candidate in candidates:
        cost = candidate.tokens + fence
        if cost > passage_budget:
            text, tokens = truncate(candidate.text, passage_budget - fence, encode)
            candidate = Candidate(candidate.index, text, tokens, candidate.retrieval_score)
            cost = tokens + fence
        if current and (len(current) == window_size or used + cost > passage_budget):
            windows.append(current)
            current, used = [], 0
        current.append(candidate)
        used += cost
    if current:
        windows.append(current)
    return windows
