"""Shared helpers for the benchmark scripts: machine description, real passage text, table printing.

Not a test helper and not imported by the library; the scripts put this folder on ``sys.path`` by being run
from it (``python benchmarks/NAME.py``).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence



def cranfield() -> Path:
    """The Cranfield collection's folder (never in the repository: ``$LLAMA_RERANK_DATA`` or ``../shared/data``),
    relative to the working directory so that what the scripts print names no machine path."""
    from llama_rerank.eval import EvalError
    from llama_rerank.eval.datasets import collection_dir

    try:
        return Path(os.path.relpath(collection_dir("cranfield")))
    except EvalError as exc:
        raise SystemExit(f"this benchmark reads Cranfield: {exc}") from None


# -- the machine ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_header(title: str) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"== {title} ==",
        f"date        : {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"machine     : nproc={nproc()}, CPU={cpu_model()}, {platform.system()} {platform.release()}",
        f"python      : {platform.python_implementation()} {platform.python_version()}",
        f"packages    : llama-rerank {_version('llama-rerank')}, llama-index-core {_version('llama-index-core')}, "
        f"rankgpt-rerank {_version('llama-index-postprocessor-rankgpt-rerank')}, tiktoken {_version('tiktoken')}",
        f"load average: {load} (1/5/15 min at start; the machine may be shared)",
    ]
    return "\n".join(lines)


# -- the machine's other load ----------------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


def _proc_ticks(pid: int) -> int:
    parts = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12]) + int(parts[13]) + int(parts[14])  # utime stime cutime cstime


class OtherLoad:
    """Cores' worth of CPU used by processes other than this one and the LLM server during a run."""

    def __init__(self, server_pid: int | None) -> None:
        self.pids = [os.getpid()] + ([server_pid] if server_pid else [])
        self.hz = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "OtherLoad":
        self.start = (_cpu_ticks(), [_proc_ticks(p) for p in self.pids], time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        (busy0, _), own0, t0 = self.start
        busy1, _ = _cpu_ticks()
        own1 = [_proc_ticks(p) for p in self.pids]
        others = (busy1 - busy0) - sum(b - a for a, b in zip(own0, own1))
        self.cores = max(0.0, others / self.hz / (time.perf_counter() - t0))



# -- passages of real text ----------------------------------------------------------------------------------------


def text_source() -> tuple[str, list[str]]:
    """(name, documents): the Cranfield abstracts, one text per document; without Cranfield (a user's clone), the
    bundled demo corpus."""
    try:
        path = cranfield() / "cran.all.1400"
    except SystemExit:
        from llama_rerank.pipeline import demo_corpus

        docs, _ = demo_corpus()
        return "the bundled demo corpus (Cranfield not found)", [p.read_text(encoding="utf-8") for p in sorted(docs.iterdir())]
    texts = []
    for record in re.split(r"^\.I \d+\s*$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M)[1:]:
        body = record.split("\n.W\n", 1)[1] if "\n.W\n" in record else ""
        text = " ".join(body.split())
        if text:
            texts.append(text)
    return f"Cranfield abstracts ({path})", texts


def make_passages(count: int, words: int) -> tuple[str, list[str]]:
    """``count`` distinct passages of exactly ``words`` words of real text (consecutive slices of the corpus).

    Documents shorter than ``words`` are joined with the next ones, so every passage has the same length and the
    same passages come back on every call (deterministic).
    """
    source, texts = text_source()
    stream = " ".join(texts).split()
    needed = count * words
    while len(stream) < needed:  # a small corpus is reused, shifted so passages stay distinct
        stream += stream[: needed - len(stream) + 7][7:]
    return source, [" ".join(stream[i * words : (i + 1) * words]) for i in range(count)]


def nodes_for(passages: Sequence[str]):
    """NodeWithScore candidates in retrieval order, with decreasing retrieval scores."""
    from llama_index.core.schema import NodeWithScore, TextNode

    n = len(passages)
    return [
        NodeWithScore(node=TextNode(text=text, id_=f"p{i:04d}"), score=1.0 - i / max(n, 1))
        for i, text in enumerate(passages)
    ]


# -- a deterministic "right answer" per passage ------------------------------------------------------------------


def relevance(text: str) -> int:
    """A fixed relevance grade 0..9 for a passage (a stable hash of its text), shared by every simulated LLM."""
    import zlib

    return zlib.crc32(" ".join(text.split()).encode("utf-8")) % 10


def label_for(grade: int) -> str:
    return "very likely" if grade >= 8 else "likely" if grade >= 5 else "unlikely"


# -- tables -------------------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    rows = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(c.rjust(w) if _NUMERIC.match(c) else c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(out)


_NUMERIC = re.compile(r"^[-+]?[\d,.]+\s*(%|x|×|s|ms)?$")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def flush() -> None:
    sys.stdout.flush()
