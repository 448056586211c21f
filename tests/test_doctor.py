"""`llama-rerank check-llm` against stub servers: what it reports for a chat model, a reasoning model and a server
without logprobs, and the one line a broken configuration ends in (no traceback)."""

import pytest

from llama_rerank.cli import main
from openai_stub import ERRORS, StubServer


def check(capsys, *args):
    code = main(["check-llm", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_openai_compatible_server_with_logprobs_and_structured_output(capsys):
    with StubServer("vllm") as stub:
        code, out, err = check(capsys, "--llm", stub.url, "--model", stub.profile.model)
    assert code == 0, err
    assert "3 of 3 passages labelled" in out
    assert "logprobs:        yes" in out and "structured out:  yes: 3 of 3" in out
    assert "scoring=logprobs" in out and "reasoning model: no" in out


def test_a_reasoning_model_by_name_reports_what_was_adapted(capsys, monkeypatch):
    with StubServer("openai-reasoning") as stub:
        monkeypatch.setenv("OPENAI_API_KEY", "k")
        monkeypatch.setenv("OPENAI_API_BASE", stub.url)
        code, out, err = check(capsys, "--llm", "openai:gpt-5-mini")
    assert code == 0, err
    assert "reasoning model: yes" in out and "logprobs:        no" in out
    assert "refused logprobs" in out and "reasoning_effort=minimal" in out and "scoring=label" in out
    assert "completion tokens for reasoning=512" in out


def test_an_old_ollama_without_logprobs(capsys):
    with StubServer("ollama-old") as stub:
        code, out, _ = check(capsys, "--llm", stub.url, "--model", stub.profile.model)
    assert code == 0 and "logprobs:        no" in out and "returned none" in out


@pytest.mark.parametrize("status, says", [(401, "API key"), (404, "model name")])
def test_a_refused_configuration_is_one_line(capsys, status, says):
    with StubServer("vllm", script=[ERRORS[status]]) as stub:
        code, out, err = check(capsys, "--llm", stub.url, "--model", stub.profile.model)
    assert code == 1 and out == ""
    assert err.startswith("LLMConfigError:") and says in err and len(err.strip().splitlines()) == 1


def test_nothing_listening_is_one_line_naming_the_server(capsys):
    code, out, err = check(capsys, "--llm", "http://127.0.0.1:9/v1")
    assert code == 1
    assert err.startswith("LLM error: --llm http://127.0.0.1:9/v1 failed") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
