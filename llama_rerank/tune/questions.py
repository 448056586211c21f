"""The questions a tune runs on, each tied to the passages that answer it.

``synthetic``: passages are drawn from the store in a seeded random order and the question LLM writes, for each, one
question that the passage answers; that passage is the question's one known positive. A reply is dropped when it
holds no question (empty, or ``NONE``), when it points at its source instead of naming its subject ("the
passage", "the study": such a question means nothing to a searcher), when it copies a run of :data:`COPY_RUN` or more of the passage's words (such
a question is found by word overlap alone and flatters the first stage), or when it repeats a question already kept;
a call that fails after its retries is dropped too (and asked again on the next run). Every reply is appended to
``replies.jsonl`` in the output folder as it arrives, so a rerun sends only the passages never answered.

A file: JSONL lines ``{"query": ..., "relevant": [ID, ...]}`` (or ``{ID: gain}``; ``"id"`` optional), where an ID
is a passage (node) id, a file name, a file path or a corpus id. A BEIR-layout or Cranfield folder: its judged
queries and graded judgements, as ``eval`` reads them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.llms import LLM

from llama_rerank.adapters import adapter_for
from llama_rerank.budget import resolve_encoder
from llama_rerank.cache import endpoint
from llama_rerank.concurrency import all_or_none, run_blocking
from llama_rerank.errors import LLMConfigError, LlamaRerankError
from llama_rerank.llm import LLMCaller
from llama_rerank.providers import model_identity

logger = logging.getLogger(__name__)

COPY_RUN = 8  # a question sharing this many consecutive words with its passage is a copy
MIN_PASSAGE_WORDS = 20  # shorter passages (titles, stray lines) are not asked about
MIN_QUESTIONS = 4  # two to tune on, two held out
QUESTION_TOKENS = 96
REPLIES_FILE = "replies.jsonl"
NONE = "NONE"
QUESTION_PROMPT = (
    "Write one search question that the passage below answers, as someone looking for this information would type "
    "it before reading the passage. Name the subject itself, so that the question makes sense on its own; never say "
    "\"the passage\", \"the paper\" or \"the study\". Use your own words: do not copy phrases from the passage. "
    f"Reply with the question alone, on one line. If the passage answers no question, reply {NONE}.\n\n"
    "Passage:\n{passage}"
)
VAGUE = re.compile(r"\b(?:the|this|these|that)\s+(?:passage|text|paper|study|article|document|abstract|report|authors?|investigation|research)\b", re.I)


@dataclass
class Question:
    """A question, the ids of the passages that answer it (with their gain) and the passage it was written from."""

    id: str
    text: str
    relevant: dict[str, int]
    source: str | None = None


def llm_key(llm: LLM) -> str:
    """Which LLM a logged reply or judgement came from: its class, model name and endpoint (the bundled model's
    server is named, not addressed: it gets a new port every run, and a rerun must find what the last one recorded)."""
    return json.dumps([type(llm).__name__, llm.metadata.model_name, endpoint(llm)])


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def copied_run(question: str, passage: str) -> int:
    """The longest run of consecutive words ``question`` shares with ``passage``."""
    q, p = words(question), words(passage)
    return difflib.SequenceMatcher(None, q, p, autojunk=False).find_longest_match(0, len(q), 0, len(p)).size


def clean(reply: str) -> str:
    """The question in a reply: its first non-empty line without a ``Question:`` prefix, numbering, quotes or bold."""
    line = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    line = re.sub(r"^(\d+[.)]\s*|[-*]\s+)", "", line).strip("*_ ")
    line = re.sub(r"^(question|q)\s*:\s*", "", line, flags=re.I)
    return line.strip("\"'`*_ ").strip()


def screen(reply: str | None, passage: str, kept: set[str]) -> tuple[str | None, str]:
    """``(question, "kept")``, or ``(None, why)`` with why one of "unwritten", "vague", "copied", "duplicate"."""
    question = clean(reply or "")
    if not question or question.upper().rstrip(".") == NONE or len(words(question)) < 3:
        return None, "unwritten"
    if VAGUE.search(question):
        return None, "vague"
    if copied_run(question, passage) >= COPY_RUN:
        return None, "copied"
    if " ".join(words(question)) in kept:
        return None, "duplicate"
    return question, "kept"


def sample(passages: Iterable[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """The passages long enough to ask about, in a seeded random order (the same store and seed, the same order)."""
    usable = sorted((pid, text) for pid, text in passages if len(words(text)) >= MIN_PASSAGE_WORDS)
    random.Random(seed).shuffle(usable)
    return usable


def prompt(llm: LLM, passage: str) -> Sequence[ChatMessage] | str:
    text = QUESTION_PROMPT.format(passage=passage)
    return [ChatMessage(role=MessageRole.USER, content=text)] if llm.metadata.is_chat_model else text


class QuestionWriter:
    """Asks the question LLM (timeout and retries of :class:`~llama_rerank.llm.LLMCaller`), logging each reply."""

    def __init__(self, llm: LLM, folder: Path, timeout: float | None = 900.0, max_retries: int = 2, workers: int = 4) -> None:
        self.llm, self.workers = llm, workers
        self.caller = LLMCaller(adapter_for(llm), resolve_encoder(llm), max_retries, timeout)
        self.model = model_identity(llm)
        self.key = json.dumps([llm_key(llm), hashlib.sha256(QUESTION_PROMPT.encode()).hexdigest()[:16]])  # another prompt asks anew
        self.log = folder / REPLIES_FILE
        self.replies: dict[str, str] = {}
        if self.log.exists():
            for line in self.log.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line: that passage is asked again
                if record.get("llm") == self.key:
                    self.replies[record["passage"]] = record["reply"]

    async def ask(self, passage_id: str, passage: str) -> str | None:
        """The reply for a passage (from the log when it was answered before); None when the call failed."""
        if passage_id in self.replies:
            return self.replies[passage_id]
        try:
            reply = (await self.caller.acall(prompt(self.llm, passage), QUESTION_TOKENS)).text
        except LLMConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a transient failure drops this passage, logged; the run goes on
            logger.warning("question LLM failed on passage %s (%s: %s); it is skipped", passage_id, type(exc).__name__, exc)
            return None
        with self.log.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"passage": passage_id, "llm": self.key, "reply": reply}, ensure_ascii=False) + "\n")
        self.replies[passage_id] = reply
        return reply


def synthetic(
    writer: QuestionWriter, passages: Sequence[tuple[str, str]], n: int, on_reply: Callable[[], object] = lambda: None,
    out_of_time: Callable[[], bool] = lambda: False,
) -> tuple[list[Question], dict[str, int]]:
    """Up to ``n`` questions from ``passages`` (in order), and how many replies were dropped for each reason.

    Passages are asked ``writer.workers`` at a time (one round on the library's driver, so Ctrl-C or an error no
    retry fixes stops the round's other calls at once), until ``n`` are kept or the passages run out. Once
    ``out_of_time()`` and at least :data:`MIN_QUESTIONS` are kept, no more is asked (the questions not written count
    as ``over budget``).
    """
    questions: list[Question] = []
    kept: set[str] = set()
    dropped = {"unwritten": 0, "vague": 0, "copied": 0, "duplicate": 0, "failed": 0, "over budget": 0}
    position = 0
    while len(questions) < n and position < len(passages):
        if len(questions) >= MIN_QUESTIONS and out_of_time():
            dropped["over budget"] = n - len(questions)
            break
        batch = passages[position : position + min(n - len(questions), writer.workers)]
        position += len(batch)
        replies = run_blocking(all_or_none, [writer.ask(*item) for item in batch])
        for (passage_id, text), reply in zip(batch, replies):
            on_reply()
            if reply is None:
                dropped["failed"] += 1
                continue
            question, why = screen(reply, text, kept)
            if question is None:
                dropped[why] += 1
                continue
            kept.add(" ".join(words(question)))
            questions.append(Question(f"q-{passage_id[:16]}", question, {passage_id: 1}, passage_id))
    return questions, dropped


def from_file(path: Path) -> list[Question]:
    """Questions from a JSONL file (see the module docstring)."""
    questions = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record.get("query") or record.get("text") or record["question"]
            relevant = record["relevant"]
            relevant = {str(k): int(v) for k, v in relevant.items()} if isinstance(relevant, dict) else {str(k): 1 for k in relevant}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LlamaRerankError(
                f'{path}:{n}: expected {{"query": "...", "relevant": ["passage or document id", ...]}}, got {line[:80]!r} ({exc!r})'
            ) from exc
        if not any(gain > 0 for gain in relevant.values()):
            raise LlamaRerankError(f"{path}:{n}: the question names no relevant passage or document")
        questions.append(Question(str(record.get("id", n)), str(text), relevant))
    if not questions:
        raise LlamaRerankError(f"{path} holds no questions")
    return questions


def from_dataset(path: Path) -> list[Question]:
    """The judged queries of a BEIR-layout or Cranfield folder, with their graded judgements (corpus ids)."""
    from llama_rerank.eval.datasets import load_dataset, select_queries

    dataset = load_dataset(path)
    return [Question(q, dataset.queries[q], dict(dataset.qrels[q])) for q in select_queries(dataset)]


def save(path: Path, questions: Sequence[Question]) -> None:
    path.write_text("".join(json.dumps(asdict(q), ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")


def load(path: Path) -> list[Question]:
    return [Question(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def relevant_unit(node_id: str, metadata: dict[str, Any], relevant: dict[str, int]) -> str:
    """What a candidate counts as for ``relevant``: the first of its node id, corpus id, file name or file path that
    the question names, else its node id."""
    for key in (node_id, metadata.get("corpus_id"), metadata.get("file_name"), metadata.get("file_path")):
        if key is not None and key in relevant:
            return key
    return node_id
