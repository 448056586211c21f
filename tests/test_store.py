"""Ingest into a real embedded Chroma with the real local embeddings: incremental updates and bad input."""

import pytest

from llama_rerank import StoreError
from llama_rerank.store import ingest, load_index, open_collection

def make_pdf(text: str) -> bytes:
    """A minimal valid one-page PDF that draws ``text`` (with a correct cross-reference table)."""
    stream = f"BT /F1 12 Tf 10 50 Td ({text}) Tj ET".encode()
    objects = [
        b"<</Type/Catalog/Pages 2 0 R>>",
        b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
        b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 300 100]/Contents 4 0 R/Resources<</Font<</F1 5 0 R>>>>>>",
        b"<</Length %d>>stream\n" % len(stream) + stream + b"\nendstream",
        b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj" % number + body + b"endobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture(scope="module")
def embed():
    from llama_rerank.runtime import LocalEmbedding

    return LocalEmbedding()


@pytest.fixture
def folder(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Boundary layers thicken downstream along a flat plate.", encoding="utf-8")
    (docs / "b.md").write_text("# Shocks\n\nA normal shock slows supersonic flow to subsonic speed.", encoding="utf-8")
    (docs / "c.pdf").write_bytes(make_pdf("Supersonic flutter of panels"))
    return docs


def _count(store, embed):
    return open_collection(store, "llama_rerank", embed, create=False).count()


def test_ingest_is_incremental_replaces_changed_files_and_prunes(folder, tmp_path, embed):
    store = tmp_path / "store"
    first = ingest(folder, store, embed, progress=False)
    assert len(first.added) == 3 and first.skipped == {}
    total = _count(store, embed)
    again = ingest(folder, store, embed, progress=False)
    assert len(again.unchanged) == 3 and again.chunks_written == 0 and _count(store, embed) == total

    (folder / "a.txt").write_text("Laminar flow becomes turbulent past the transition point.", encoding="utf-8")
    (folder / "b.md").unlink()
    changed = ingest(folder, store, embed, progress=False, prune=True)
    assert [p.rsplit("/", 1)[1] for p in changed.replaced] == ["a.txt"]
    assert [p.rsplit("/", 1)[1] for p in changed.removed] == ["b.md"]
    texts = [n.node.get_content() for n in load_index(store, embed).as_retriever(similarity_top_k=10).retrieve("flow")]
    assert any("turbulent" in t for t in texts) and not any("flat plate" in t for t in texts)
    assert not any("normal shock" in t for t in texts)
    assert any("Supersonic flutter" in t for t in texts)  # the PDF's text was read


def test_unreadable_binary_and_non_utf8_files(folder, tmp_path, embed):
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (folder / "latin.txt").write_bytes("Caf\xe9 au lait: a Mach number of 0.8.".encode("latin-1"))
    (folder / "empty.txt").write_text("   ", encoding="utf-8")
    report = ingest(folder, tmp_path / "store", embed, progress=False)
    skipped = {p.rsplit("/", 1)[1]: why for p, why in report.skipped.items()}
    assert set(skipped) == {"blob.bin", "broken.pdf", "empty.txt"}
    assert "binary" in skipped["blob.bin"] and "could not read" in skipped["broken.pdf"] and "no text" in skipped["empty.txt"]
    assert any(p.endswith("latin.txt") for p in report.added)


def test_missing_and_empty_folder_and_file_as_store_are_clear_errors(tmp_path, embed):
    with pytest.raises(StoreError, match="is not a folder"):
        ingest(tmp_path / "nope", tmp_path / "store", embed, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="holds no files"):
        ingest(tmp_path / "empty", tmp_path / "store", embed, progress=False)
    assert not (tmp_path / "store").exists()  # nothing half-written
    (tmp_path / "afile").write_text("x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("text")
    with pytest.raises(StoreError, match="is a file"):
        ingest(tmp_path / "docs", tmp_path / "afile", embed, progress=False)
    assert (tmp_path / "afile").read_text() == "x"


def test_querying_a_store_that_was_never_ingested(tmp_path, embed):
    with pytest.raises(StoreError, match="llama-rerank ingest"):
        load_index(tmp_path / "fresh", embed)
