"""Test collections on disk -> queries, corpus and graded judgments, plus the fixed query splits.

Public collections (Cranfield, SciFact) are not shipped with llama-rerank: they are read from one place,
:func:`data_root` (``$LLAMA_RERANK_DATA``, else ``../shared/data`` beside a source checkout), so ``eval cranfield``
finds ``DATA/cranfield``. Three layouts are read, detected from the files present:

- BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
  ``qrels/SPLIT.tsv`` (header ``query-id corpus-id score``; graded scores allowed). A document's text is its title
  and its text on two lines.
- Cranfield (``cran.all.1400``, ``cran.qry``, ``cranqrel``): documents are ``.I`` records whose ``.W`` field is the
  text (it already starts with the title). Queries are numbered 1..225 **in file order**, which is how
  ``cranqrel`` names them; the ``.I`` ids of ``cran.qry`` (1, 2, 4, 8, ...) are not used. Relevance codes map to
  graded gains as ``gain = 5 - code`` for codes 1..4 (1 = complete answer -> 4, ..., 4 = minimum interest -> 1)
  and 0 otherwise (``-1`` = judged not relevant).
- Known answers (the bundled demo corpus, ``llama_rerank/demo_data``): ``docs/*`` files and ``queries.json``, a
  list of ``{"query", "answer_doc"}``; each query's one known answer passage has gain 1, every other document 0.

The queries evaluated are those with at least one judgment of gain > 0. ``--queries-split`` cuts them into two
fixed halves: in id order (numeric ids by value, others as text after them), ``tune`` takes the 1st, 3rd, 5th, ...
and ``test`` the 2nd, 4th, 6th, ...; ``--exclude-queries`` removes the queries an earlier run reported (so a
half can be evaluated again on queries never looked at), and ``--limit-queries`` then draws a seeded random sample.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator

from llama_rerank.eval import EvalError

CRANFIELD_FILES = ("cran.all.1400", "cran.qry", "cranqrel")
QUERY_SPLITS = ("all", "tune", "test")
DATA_ENV = "LLAMA_RERANK_DATA"  # the folder holding the evaluation collections, one subfolder each
BESIDE_CHECKOUT = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data next to a source checkout


@dataclass
class Dataset:
    """A test collection: ``corpus`` and ``queries`` map ids to text, ``qrels`` query id -> corpus id -> gain."""

    name: str
    format: str  # "beir", "cranfield" or "known-answers"
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split: str | None = None  # the BEIR qrels split read


def data_root() -> Path | None:
    """The folder of evaluation collections: ``$LLAMA_RERANK_DATA``, else ``../shared/data`` beside the checkout
    when it exists, else ``None``."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return BESIDE_CHECKOUT if BESIDE_CHECKOUT.is_dir() else None


def collection_dir(name: str) -> Path:
    """The folder of collection ``name`` (``cranfield``, ``scifact``) in :func:`data_root`, or a clear error."""
    root = data_root()
    if root is not None and (root / name).is_dir():
        return root / name
    where = f"{root} has no {name}/ folder" if root is not None else f"${DATA_ENV} is not set"
    raise EvalError(
        f"the {name} collection was not found ({where}): llama-rerank does not ship evaluation collections; "
        f"set {DATA_ENV} to the folder that holds {name}/, or give the collection's folder as a path"
    )


def resolve(path: str | Path) -> Path:
    """``path`` as given; a bare name that is nothing here (``cranfield``) is a collection looked up in :func:`data_root`."""
    folder = Path(path).expanduser()
    if not folder.exists() and len(folder.parts) == 1:
        return collection_dir(str(folder))
    return folder


def load_dataset(path: str | Path, split: str | None = None) -> Dataset:
    """Read a BEIR-layout folder (judgments of ``qrels/{split}.tsv``; ``split`` None: see :func:`load_beir`), a Cranfield folder or a known-answers folder.

    A bare name is resolved as :func:`resolve` does.
    """
    folder = resolve(path)
    if not folder.is_dir():
        raise EvalError(f"{folder} is not a folder: give a BEIR-layout folder, the Cranfield folder or a collection name")
    if all((folder / name).is_file() for name in CRANFIELD_FILES):
        return load_cranfield(folder)
    if (folder / "corpus.jsonl").is_file() and (folder / "queries.jsonl").is_file():
        return load_beir(folder, split)
    if (folder / "queries.json").is_file() and (folder / "docs").is_dir():
        return load_known_answers(folder)
    raise EvalError(
        f"{folder} is neither a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/{split or 'SPLIT'}.tsv), "
        f"a Cranfield folder ({', '.join(CRANFIELD_FILES)}) nor a known-answers folder (docs/, queries.json)"
    )


def load_beir(folder: Path, split: str | None = None) -> Dataset:
    """``split`` None: the only ``qrels/*.tsv`` there is (SciFact's copy has ``train`` alone), else ``test``.

    Only a query's ``text`` is read: other fields (SciFact's ``metadata`` holds its evidence labels) never reach
    the first stage or the LLM.
    """
    found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
    split = split or (found[0] if len(found) == 1 else "test")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise EvalError(f"no judgments at {qrels_path}; splits found: {', '.join(found) or 'none'}")
    corpus = {str(r["_id"]): "\n".join(t for t in (r.get("title") or "", r.get("text") or "") if t.strip())
              for r in _jsonl(folder / "corpus.jsonl")}  # fmt: skip
    queries = {str(r["_id"]): r["text"] for r in _jsonl(folder / "queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8", newline="") as handle:
        for n, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or (n == 1 and row[0] == "query-id"):
                continue
            try:
                qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
            except (IndexError, ValueError) as exc:
                raise EvalError(f"{qrels_path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score', got {row!r}") from exc
    return Dataset(folder.name, "beir", corpus, queries, qrels, split)


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as handle:
        for n, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvalError(f"{path}:{n}: not a JSON object: {exc}") from exc


def load_cranfield(folder: Path) -> Dataset:
    corpus = {number: " ".join(fields.get("W", "").split())
              for number, fields in _records(folder / "cran.all.1400")}  # fmt: skip
    queries = {str(n): " ".join(fields.get("W", "").split())
               for n, (_, fields) in enumerate(_records(folder / "cran.qry"), start=1)}  # fmt: skip
    qrels: dict[str, dict[str, int]] = {}
    for n, line in enumerate((folder / "cranqrel").read_text(encoding="latin-1").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise EvalError(f"{folder / 'cranqrel'}:{n}: expected 'query doc code', got {line!r}")
        query, doc, code = parts[0], str(int(parts[1])), int(parts[2])
        qrels.setdefault(query, {})[doc] = 5 - code if 1 <= code <= 4 else 0
    return Dataset(folder.name, "cranfield", corpus, queries, qrels)


def load_known_answers(folder: Path) -> Dataset:
    """The demo layout: every file of ``docs/`` is a document (id: its file name); each query in ``queries.json``
    has one known answer document."""
    corpus = {p.name: p.read_text(encoding="utf-8") for p in sorted((folder / "docs").iterdir()) if p.is_file()}
    try:
        entries = json.loads((folder / "queries.json").read_text(encoding="utf-8"))
        pairs = [(str(e["query"]), str(e["answer_doc"])) for e in entries]
    except (ValueError, TypeError, KeyError) as exc:
        raise EvalError(f"{folder / 'queries.json'}: expected a list of {{\"query\", \"answer_doc\"}} objects ({exc})") from exc
    missing = sorted({doc for _, doc in pairs} - set(corpus))
    if missing:
        raise EvalError(f"{folder / 'queries.json'} names answer documents not in docs/: {', '.join(missing)}")
    queries = {str(n): query for n, (query, _) in enumerate(pairs, start=1)}
    qrels = {str(n): {doc: 1} for n, (_, doc) in enumerate(pairs, start=1)}
    return Dataset(folder.name, "known-answers", corpus, queries, qrels)


def _records(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """``(.I id, {field letter: text})`` for each record of a SMART-format file."""
    text = path.read_text(encoding="latin-1")
    for record in re.split(r"^\.I\s+", text, flags=re.M)[1:]:
        head, _, body = record.partition("\n")
        fields = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\.([A-Z])\s*\n(.*?)(?=^\.[A-Z]\s*$|\Z)", body, flags=re.M | re.S)}
        yield str(int(head.strip())), fields


def id_order(query_id: str) -> tuple[int, int, str]:
    """Sort key: numeric ids by value first, then the others as text."""
    return (0, int(query_id), "") if query_id.isdigit() else (1, 0, query_id)


def select_queries(
    dataset: Dataset, queries_split: str = "all", limit: int | None = None, seed: int = 0, exclude: Collection[str] = ()
) -> list[str]:
    """Judged query ids in id order, cut to the fixed ``tune``/``test`` half, without ``exclude``, then a seeded
    sample of ``limit``."""
    if queries_split not in QUERY_SPLITS:
        raise EvalError(f"unknown query split {queries_split!r}: use one of {', '.join(QUERY_SPLITS)}")
    judged = sorted((q for q, docs in dataset.qrels.items() if q in dataset.queries and any(g > 0 for g in docs.values())),
                    key=id_order)  # fmt: skip
    if not judged:
        raise EvalError(f"{dataset.name}: no query has a relevant judgment")
    ids = [q for q in {"all": judged, "tune": judged[0::2], "test": judged[1::2]}[queries_split] if q not in exclude]
    if not ids:
        raise EvalError(f"{dataset.name}: no {queries_split} query is left once the {len(exclude)} excluded ones are removed")
    if limit is not None and limit < len(ids):
        if limit < 1:
            raise EvalError(f"--limit-queries must be at least 1, got {limit}")
        ids = sorted(random.Random(seed).sample(ids, limit), key=id_order)
    return ids
