"""The Chroma store: incremental ingest of a folder, and the index/retriever over it.

``store`` is a directory (embedded ``PersistentClient``) or an ``http(s)://host:port`` URL (a ``chroma run`` server).
Every chunk carries its file's path and content hash, so re-ingesting an unchanged file adds nothing, a changed file's
new chunks are written before its old ones are deleted (an interruption never leaves a file without chunks), and
``prune`` removes files that are gone. A lock serialises ingests into the same store.
Needs ``pip install 'llama-rerank[chroma]'`` (chromadb is imported where it is used).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from llama_index.core import Document, SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import BasePydanticVectorStore
from tqdm import tqdm

from llama_rerank._extras import require
from llama_rerank.errors import StoreError

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "llama_rerank"
READER_SUFFIXES = {".pdf", ".docx", ".epub", ".ipynb", ".csv", ".mbox", ".hwp"}  # LlamaIndex readers, no model needed
LOCK_NAME = ".llama-rerank-ingest.lock"


@dataclass
class IngestReport:
    """What an ingest did, file by file."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why
    chunks_written: int = 0

    def __str__(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.replaced)} replaced", f"{len(self.unchanged)} unchanged",
                 f"{len(self.removed)} removed", f"{len(self.skipped)} skipped", f"{self.chunks_written} chunks written"]  # fmt: skip
        lines = [", ".join(parts)]
        lines += [f"  skipped {path}: {why}" for path, why in self.skipped.items()]
        return "\n".join(lines)


def _client(store: str | Path) -> Any:
    chromadb = require("chromadb", "chroma")
    settings = require("chromadb.config", "chroma").Settings(anonymized_telemetry=False)
    text = str(store)
    if text.startswith(("http://", "https://")):
        url = urlparse(text)
        return chromadb.HttpClient(host=url.hostname or "127.0.0.1", port=url.port or 8000,
                                   ssl=url.scheme == "https", settings=settings)  # fmt: skip
    return chromadb.PersistentClient(path=str(_local_dir(store)), settings=settings)


def _local_dir(store: str | Path) -> Path:
    path = Path(store).expanduser()
    if path.exists() and not path.is_dir():
        raise StoreError(f"store path {path} is a file; give a directory (it is created if missing) or a Chroma URL")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_collection(
    store: str | Path, collection: str, embed_model: BaseEmbedding, create: bool, metadata: dict[str, Any] | None = None
) -> Any:
    """The Chroma collection, checked to hold vectors of ``embed_model`` (named in its metadata).

    ``metadata`` is stored with a collection this call creates (e.g. a fingerprint of what it will hold).
    """
    client = _client(store)
    name = embed_model.model_name
    try:
        if create:
            coll = client.get_or_create_collection(
                collection, metadata={**(metadata or {}), "embed_model": name, "hnsw:space": "cosine"}
            )
        else:
            coll = client.get_collection(collection)
    except ValueError as exc:
        raise StoreError(f"collection {collection!r} in {store}: {exc}") from exc
    except Exception as exc:  # chromadb raises NotFoundError, which is not a ValueError in every version
        if "does not exist" in str(exc) or "not found" in str(exc).lower():
            raise StoreError(f"no collection {collection!r} in {store}: run `llama-rerank ingest FOLDER --store {store}` first") from exc
        raise
    stored = (coll.metadata or {}).get("embed_model")
    if stored and stored != name:
        raise StoreError(f"collection {collection!r} holds {stored} vectors, not {name}; use another --collection")
    return coll


def vector_store(store: str | Path, collection: str, embed_model: BaseEmbedding, create: bool = False) -> BasePydanticVectorStore:
    ChromaVectorStore = require("llama_index.vector_stores.chroma", "chroma").ChromaVectorStore
    return ChromaVectorStore(chroma_collection=open_collection(store, collection, embed_model, create))


def load_index(store: str | Path, embed_model: BaseEmbedding, collection: str = DEFAULT_COLLECTION) -> VectorStoreIndex:
    """A ``VectorStoreIndex`` over an ingested collection; raises ``StoreError`` if there is none."""
    return VectorStoreIndex.from_vector_store(vector_store(store, collection, embed_model), embed_model=embed_model)


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            yield path


def _read(path: Path, data: bytes) -> list[Document]:
    """Documents of one file (``data`` is its content); raises ``ValueError`` saying why it cannot be read as text."""
    if path.suffix.lower() in READER_SUFFIXES:
        try:
            documents = SimpleDirectoryReader(input_files=[str(path)], raise_on_error=True).load_data()
        except Exception as exc:  # noqa: BLE001 - a reader's failure (corrupt file, missing package) skips the file
            raise ValueError(f"could not read it: {type(exc).__name__}: {exc}") from exc
    else:
        if b"\x00" in data[:8192]:
            raise ValueError("binary file (no text reader for this type)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
            logger.warning("%s is not UTF-8; read it as Latin-1", path)
        documents = [Document(text=text, metadata={"file_name": path.name})]
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise ValueError("no text in it")
    return documents


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ingest(
    folder: str | Path,
    store: str | Path,
    embed_model: BaseEmbedding,
    collection: str = DEFAULT_COLLECTION,
    prune: bool = False,
    chunk_size: int = 256,
    chunk_overlap: int = 32,
    progress: bool = True,
) -> IngestReport:
    """Ingest every readable file under ``folder`` into the store; unchanged files are not touched."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StoreError(f"{folder} is not a folder: give a directory of documents (txt, md, pdf, docx, ...)")
    files = list(_files(folder))
    if not files:
        raise StoreError(f"{folder} holds no files to ingest")
    require("chromadb", "chroma")  # before the store folder is made
    report = IngestReport()
    splitter = SentenceSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    with require("filelock", "chroma").FileLock(str(_lock_dir(store) / LOCK_NAME), timeout=600):
        coll = open_collection(store, collection, embed_model, create=True)
        seen: set[str] = set()
        for path in tqdm(files, desc="ingest", unit="file", disable=not progress):
            key = str(path.resolve())
            seen.add(key)
            try:
                data = path.read_bytes()
                digest = _digest(data)
                existing = coll.get(where={"file_path": key}, include=["metadatas"])
                old_ids = [i for i, m in zip(existing["ids"], existing["metadatas"]) if m.get("file_hash") != digest]
                if len(old_ids) < len(existing["ids"]):
                    report.unchanged.append(key)
                    if old_ids:  # a previous ingest was interrupted between write and delete
                        coll.delete(ids=old_ids)
                    continue
                nodes = _chunks(_read(path, data), splitter, key, digest)
            except (OSError, ValueError) as exc:
                report.skipped[key] = str(exc)
                logger.warning("skipped %s: %s", path, exc)
                continue
            write_nodes(coll, nodes, embed_model)
            if old_ids:
                coll.delete(ids=old_ids)
            (report.replaced if old_ids else report.added).append(key)
            report.chunks_written += len(nodes)
        if prune:
            report.removed = _prune(coll, folder, seen)
    return report


def _chunks(documents: list[Document], splitter: SentenceSplitter, key: str, digest: str) -> list[BaseNode]:
    for document in documents:
        document.metadata.update({"file_path": key, "file_hash": digest})
        document.excluded_embed_metadata_keys = ["file_path", "file_hash", "file_name"]
        document.excluded_llm_metadata_keys = ["file_path", "file_hash"]
    nodes = splitter.get_nodes_from_documents(documents)
    for i, node in enumerate(nodes):
        node.id_ = hashlib.sha256(f"{key}\0{digest}\0{i}".encode()).hexdigest()[:32]
    return nodes


def write_nodes(coll: Any, nodes: list[BaseNode], embed_model: BaseEmbedding) -> None:
    """Embed ``nodes`` and upsert them with LlamaIndex's serialised node as metadata (what retrieval reads back)."""
    from llama_index.core.vector_stores.utils import node_to_metadata_dict

    coll.upsert(
        ids=[n.node_id for n in nodes],
        embeddings=embed_model.get_text_embedding_batch([n.get_content(metadata_mode="embed") for n in nodes]),
        documents=[n.get_content() for n in nodes],
        metadatas=[node_to_metadata_dict(n, remove_text=True, flat_metadata=True) for n in nodes],
    )


def _prune(coll: Any, folder: Path, seen: set[str]) -> list[str]:
    root = str(folder.resolve())
    stored = coll.get(include=["metadatas"])
    gone = {m["file_path"] for m in stored["metadatas"] if m.get("file_path", "").startswith(root) and m["file_path"] not in seen}
    for key in sorted(gone):
        coll.delete(where={"file_path": key})
    return sorted(gone)


def _lock_dir(store: str | Path) -> Path:
    """The store folder itself, or for a server URL a per-user folder named after it."""
    if not str(store).startswith(("http://", "https://")):
        return _local_dir(store)
    platformdirs = require("platformdirs", "chroma")
    path = Path(platformdirs.user_cache_dir("llama-rerank")) / "locks" / hashlib.sha256(str(store).encode()).hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path
