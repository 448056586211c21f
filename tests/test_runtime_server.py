"""The local LLM server (llama.cpp in a child process). The slow tests load the real 1.1 GB model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_index.core.llms import ChatMessage

from llama_rerank.runtime import server

ROOT = Path(__file__).resolve().parents[1]


def answers(address: str) -> bool:
    try:
        with urllib.request.urlopen(address + "/health", timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too; it lingers only until its new parent reaps it
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.fixture(scope="module", autouse=True)
def stop_server_after_module() -> Iterator[None]:
    yield
    server.shutdown()


@pytest.mark.slow
def test_chat_with_logprobs_and_reuse() -> None:
    llm = server.local_llm(max_tokens=3)
    response = llm.chat([ChatMessage(role="user", content="Reply with the single word: yes")])
    assert "yes" in (response.message.content or "").lower()
    assert response.logprobs, "no per-token logprobs came back"
    assert len(response.logprobs[0]) >= 2  # top_logprobs alternatives for the first token

    again = server.local_llm(temperature=0.5)
    assert again.api_base == llm.api_base
    assert again.temperature == 0.5
    assert llm.api_key == "not-needed" and llm.context_window == 4096 and llm.is_chat_model


@pytest.mark.slow
def test_shutdown_frees_the_port() -> None:
    running = server.get_server()
    address, pid = running.address, running.pid
    assert answers(address)
    assert repr(running).startswith(f"LocalServer({address}")
    server.shutdown()
    assert not answers(address)
    assert pid is not None and not pid_alive(pid)
    assert "stopped" in repr(running)
    with pytest.raises(RuntimeError, match="not running"):
        running.address


@pytest.mark.slow
def test_crashed_server_is_restarted() -> None:
    first = server.get_server()
    old_pid = first.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    time.sleep(0.5)
    llm = server.local_llm(max_tokens=1)
    assert first.pid != old_pid and first.running
    assert answers(llm.api_base.removesuffix("/v1"))


@pytest.mark.slow
def test_server_dies_with_a_killed_parent() -> None:
    code = (
        "from llama_rerank.runtime import server\n"
        "s = server.get_server()\n"
        "print(s.pid, s.address, flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = 0
    try:
        pid_text, address = parent.stdout.readline().split()  # type: ignore[union-attr]
        child = int(pid_text)
        assert answers(address)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(child), "the server outlived its SIGKILLed parent"
        assert not answers(address)
    finally:
        parent.kill()
        parent.wait()
        if child and pid_alive(child):
            os.kill(child, signal.SIGKILL)  # do not leave a server behind if the test failed


def test_threads_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(server.THREADS_ENV, "3")
    assert server.LocalServer().threads == 3
    assert server.LocalServer(threads=1).threads == 1


def test_missing_xllamacpp_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"xllamacpp: pip install 'llama-rerank\[local\]'"):
        server.LocalServer(model="unused.gguf").start()


def test_bad_model_gives_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    local = server.LocalServer(model=bad, start_timeout=60)
    with pytest.raises(RuntimeError, match="exited while starting") as excinfo:
        local.start()
    assert "broken.gguf" in str(excinfo.value)  # the tail of llama.cpp's log is included
    assert not local.running


@pytest.mark.slow
def test_reranks_keep_their_cached_prefix_across_an_answer() -> None:
    """Two slots and the fixed part first: the answer step's prompt goes to the other slot, so the next rerank
    finds the system prompt and instructions still cached (llama.cpp reports them as ``timings.cache_n``)."""
    import json

    from llama_rerank.labels import LabelScale
    from llama_rerank.prompts import DEFAULT_RERANK_PROMPT, prompt_vars, render

    address = server.get_server().address
    scale = LabelScale.from_mapping({"unlikely": 0.0, "likely": 0.5, "very likely": 1.0})

    def cached_tokens(messages: list[dict]) -> int:
        body = json.dumps({"messages": messages, "max_tokens": 1, "temperature": 0}).encode()
        request = urllib.request.Request(address + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.load(response)["timings"]["cache_n"]

    def rerank(query: str, passages: list[str]) -> list[dict]:
        messages = render(DEFAULT_RERANK_PROMPT, True, prompt_vars(query, passages, scale))
        return [{"role": m.role.value, "content": m.content} for m in messages]

    answer = [{"role": "user", "content": "Context: swept wings delay drag rise.\nQuery: why sweep a wing?\nAnswer:"}]
    cached_tokens(rerank("why sweep a wing?", ["Swept wings delay drag rise.", "Flaps add lift."]))
    cached_tokens(answer)
    assert cached_tokens(rerank("what is a flap?", ["Flaps add lift at low speed.", "Jets burn fuel."])) >= 100
