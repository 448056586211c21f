"""A real `chroma run` server, started and stopped by the test: ingest and query through its URL."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_rerank.store import ingest, load_index


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory):
    import chromadb

    port = _free_port()
    chroma = Path(sys.executable).with_name("chroma")
    log = open(tmp_path_factory.mktemp("chroma-log") / "server.log", "w")
    server = subprocess.Popen(
        [str(chroma), "run", "--path", str(tmp_path_factory.mktemp("chroma-server")), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                chromadb.HttpClient(host="127.0.0.1", port=port).heartbeat()
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"chroma run did not come up on port {port}: {Path(log.name).read_text()[-2000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_ingest_and_query_through_a_chroma_server(chroma_url, tmp_path):
    from llama_rerank.runtime import LocalEmbedding

    embed = LocalEmbedding()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "shock.txt").write_text("A normal shock wave slows supersonic flow to subsonic speed.", encoding="utf-8")
    (docs / "plate.txt").write_text("Boundary layers grow thicker along a flat plate.", encoding="utf-8")
    report = ingest(docs, chroma_url, embed, collection="server-test", progress=False)
    assert len(report.added) == 2
    assert len(ingest(docs, chroma_url, embed, collection="server-test", progress=False).unchanged) == 2
    index = load_index(chroma_url, embed, collection="server-test")
    top = index.as_retriever(similarity_top_k=1).retrieve("what happens behind a shock wave?")
    assert "normal shock" in top[0].node.get_content()
