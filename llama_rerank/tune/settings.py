"""``settings.json``: what a tune chose, written by ``llama-rerank tune`` and loaded in one line.

    {"version": 1, "created": ISO date, "reranker": {LikelihoodRerank options}, "top_k": K,
     "calibration": {"method": "isotonic", "x": [...], "y": [...]} or null,
     "target_precision": P, "fitted_on": {documents, questions, judge LLM, question LLM, split sizes}}

``reranker`` holds ``top_n``, ``window_size``, ``retrieval_weight``, ``normalize`` (false: the scores a
calibration reads), the label scale and passage budget the sweep used and, with a calibration, ``min_score``: the
probability threshold that reached the target precision on the tune split (null when none did). ``top_k`` is how
many first-stage candidates to hand the reranker. ``LikelihoodRerank.from_settings(path, llm=...)`` and
``--settings FILE`` on ``query`` and ``eval`` read it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llama_index.core.llms import LLM

from llama_rerank.errors import LlamaRerankError

VERSION = 1
FILE = "settings.json"


def write(path: str | Path, reranker: dict[str, Any], top_k: int, calibration: dict[str, Any] | None,
          target_precision: float, fitted_on: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    settings = {
        "version": VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reranker": reranker,
        "top_k": top_k, "calibration": calibration, "target_precision": target_precision, "fitted_on": fitted_on,
    }  # fmt: skip
    Path(path).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return settings


def read(path: str | Path) -> dict[str, Any]:
    """The settings in ``path``, checked; an error names the file and what is wrong with it."""
    path = Path(path).expanduser()
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LlamaRerankError(f"settings {path}: cannot read it ({exc}); give the settings.json `llama-rerank tune` wrote") from exc
    if not isinstance(settings, dict) or settings.get("version") != VERSION or not isinstance(settings.get("reranker"), dict):
        raise LlamaRerankError(
            f"settings {path}: not a version-{VERSION} settings file written by `llama-rerank tune` (run tune again to make one)"
        )
    return settings


def reranker(settings: dict[str, Any], llm: LLM | None = None, **overrides: Any) -> Any:
    """The reranker the settings describe: a ``CalibratedRerank`` when they hold a calibration, else a
    ``LikelihoodRerank``; ``overrides`` are ``LikelihoodRerank`` options that win over the file's."""
    from llama_rerank.postprocessor import LikelihoodRerank
    from llama_rerank.tune.calibration import CalibratedRerank

    options = {**settings["reranker"], **overrides}
    if settings.get("calibration"):
        return CalibratedRerank(llm=llm, calibration=settings["calibration"], **options)
    return LikelihoodRerank(llm=llm, **options)


def load(path: str | Path, llm: LLM | None = None, **overrides: Any) -> Any:
    """``reranker(read(path), llm, **overrides)``: what ``LikelihoodRerank.from_settings`` does."""
    return reranker(read(path), llm, **overrides)
