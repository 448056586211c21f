"""The local LLM server: runs llama.cpp (``xllamacpp``) on the bundled GGUF in a child
process on 127.0.0.1, one per interpreter, and hands out OpenAI-compatible LLM clients.
It has two slots of ``N_CTX`` tokens each, and llama.cpp's prompt cache keeps each slot's last
prompt: a request goes to the slot whose prompt shares the most with it, so reranks (which share
their fixed first part) stay in one slot and the answer step's prompts in the other, and neither
evicts the other's cached prefix.

The xllamacpp Server cannot be stopped, so it lives in a child process
(``python -m llama_rerank.runtime.server``). The child reports its address on stdout and
exits when its stdin reaches EOF or its parent changes, so it dies with the parent even
when the parent is SIGKILLed.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import logging
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from llama_rerank._extras import MissingExtraError, require

from ..cache import name_endpoint
from .model import MODEL_NAME, model_path

if TYPE_CHECKING:
    from llama_index.llms.openai_like import OpenAILike

logger = logging.getLogger(__name__)

N_CTX = 4096  # per slot
SLOTS = 2  # one for reranking, one for answering
DEFAULT_THREADS = 2
THREADS_ENV = "LLAMA_RERANK_THREADS"
START_TIMEOUT = 180.0

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never proxy 127.0.0.1
_lock = threading.Lock()
_server: LocalServer | None = None


class LocalServer:
    """A llama.cpp server for one GGUF file, running in a child process."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        n_ctx: int = N_CTX,
        slots: int = SLOTS,
        threads: int | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.model = Path(model) if model is not None else None
        self.n_ctx = n_ctx
        self.slots = slots
        self.threads = threads or int(os.environ.get(THREADS_ENV) or DEFAULT_THREADS)
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._address: str | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def address(self) -> str:
        """Base URL such as ``http://127.0.0.1:PORT``; raises if the server is not running."""
        if not self.running or self._address is None:
            raise RuntimeError("The local LLM server is not running; call start() first.")
        return self._address

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> str:
        """Start the child process (if not running), wait until it answers, return its address."""
        if self.running:
            return self.address
        self.stop()  # reap a crashed child and close its log
        if importlib.util.find_spec("xllamacpp") is None:
            raise MissingExtraError("The local LLM server needs xllamacpp", "local")
        model = self.model or model_path()
        package_root = str(Path(__file__).resolve().parents[2])  # importable even when not installed
        pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", __name__, "--model", str(model)]
        cmd += ["--n-ctx", str(self.n_ctx), "--slots", str(self.slots), "--threads", str(self.threads)]
        started = time.monotonic()
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONPATH": pythonpath},
            start_new_session=True,  # Ctrl-C in a terminal reaches the parent only
        )
        try:
            self._address = self._read_address(started + self.start_timeout)
            self._wait_healthy(started + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("Local LLM server %s up in %.1f s", self, time.monotonic() - started)
        return self._address

    def stop(self) -> None:
        """Stop the child process; safe to call more than once."""
        proc, self._proc, self._address = self._proc, None, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()  # stdin EOF tells the child to exit
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logger.info("Local LLM server (pid %d) stopped", proc.pid)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __repr__(self) -> str:
        state = f"{self._address}, pid={self.pid}" if self.running else "stopped"
        return f"LocalServer({state}, model={self.model or MODEL_NAME}, slots={self.slots}, threads={self.threads})"

    def _read_address(self, deadline: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = self._proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http"):
            self._fail("exited while starting" if ready else f"did not start within {self.start_timeout:.0f} s")
        return line

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            try:
                with _HTTP.open(f"{self._address}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if not self.running:
                self._fail("exited before becoming healthy")
            if time.monotonic() > deadline:
                self._fail(f"was not healthy within {self.start_timeout:.0f} s")
            time.sleep(0.2)

    def _fail(self, what: str) -> NoReturn:
        log = b""
        if self._log is not None:
            self._log.seek(0)
            log = self._log.read()[-4000:]
        raise RuntimeError(f"The local LLM server {what}. Its log ends with:\n{log.decode(errors='replace')}")


def get_server() -> LocalServer:
    """The process-wide server, started on first use (thread-safe) and stopped at exit."""
    global _server
    with _lock:
        if _server is None:
            _server = LocalServer()
            atexit.register(shutdown)
        if not _server.running:
            _server.start()
        return _server


def shutdown() -> None:
    """Stop the process-wide server if it is running; the next get_server() starts a new one."""
    with _lock:
        if _server is not None:
            _server.stop()


def local_llm(**overrides: Any) -> OpenAILike:
    """An OpenAILike LLM talking to the process-wide local server (started if need be); ``overrides`` win, and
    with an ``api_base`` among them no server is started."""
    OpenAILike = require("llama_index.llms.openai_like", "local").OpenAILike
    settings: dict[str, Any] = {
        "model": MODEL_NAME,
        "api_base": overrides["api_base"] if "api_base" in overrides else get_server().address + "/v1",
        "api_key": "not-needed",
        "is_chat_model": True,
        "context_window": N_CTX,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 5,
        "timeout": 300.0,
    }
    llm = OpenAILike(**{**settings, **overrides})
    if llm.model == MODEL_NAME:  # the bundled model: its judgements are cached under its name, not the port
        name_endpoint(llm.api_base, f"bundled {MODEL_NAME}")
    return llm


def _serve(model: str, n_ctx: int, slots: int, threads: int) -> None:
    """Child process body: start llama.cpp, report the address, block until the parent goes."""
    import xllamacpp

    parent = os.getppid()
    report = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything native code prints goes to the log, not the report pipe
    params = xllamacpp.CommonParams()
    params.model.path = model
    params.n_parallel = slots
    params.n_ctx = n_ctx * slots  # split evenly between the slots
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    params.verbosity = 2  # warnings and errors
    server = xllamacpp.Server(params)
    report.write(server.listening_address + "\n")
    report.close()
    while os.getppid() == parent:
        if select.select([0], [], [], 1.0)[0] and not os.read(0, 4096):
            break
    os._exit(0)  # skip interpreter teardown: the server threads cannot be joined


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the llama-rerank local LLM server (used as a child process).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--n-ctx", type=int, default=N_CTX, help="context tokens per slot")
    parser.add_argument("--slots", type=int, default=SLOTS)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = parser.parse_args(argv)
    _serve(args.model, args.n_ctx, args.slots, args.threads)


if __name__ == "__main__":
    main()
