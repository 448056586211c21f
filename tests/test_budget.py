from llama_index.core.utils import get_tokenizer

from llama_rerank.budget import TRUNCATION_MARKER, pack_windows, passage_budget, resolve_encoder, truncate
from llama_rerank.prompts import answer_tokens, fence_tokens
from llama_rerank.types import Candidate
from fakes import ScriptedLLM

ENCODE = get_tokenizer()
FENCE = fence_tokens(ENCODE)


def test_short_text_is_unchanged():
    assert truncate("a short passage", 50, ENCODE) == ("a short passage", len(ENCODE("a short passage")))


def test_long_text_is_cut_at_a_word_within_budget():
    text = " ".join(f"word{i}" for i in range(2000))
    cut, tokens = truncate(text, 100, ENCODE)
    assert cut.endswith(TRUNCATION_MARKER) and tokens == len(ENCODE(cut)) <= 100
    assert text.startswith(cut[: -len(TRUNCATION_MARKER)])
    assert tokens > 80  # uses the budget, not a crude fraction of it


def test_text_without_spaces_is_still_cut():
    cut, tokens = truncate("x" * 5000, 30, ENCODE)
    assert tokens <= 30 and cut.endswith(TRUNCATION_MARKER)


def test_answer_budget_grows_with_window():
    labels = ("unlikely", "likely", "very likely")
    assert answer_tokens(20, labels, ENCODE) > answer_tokens(5, labels, ENCODE) >= 5 * 3


def _candidates(sizes):
    return [Candidate(i, "w " * n, n, None) for i, n in enumerate(sizes)]


def test_windows_respect_count_and_budget_and_keep_order():
    windows = pack_windows(_candidates([100] * 7), window_size=3, passage_budget=250, fence=FENCE, encode=ENCODE)
    assert [[c.index for c in w] for w in windows] == [[0, 1], [2, 3], [4, 5], [6]]
    windows = pack_windows(_candidates([10] * 7), window_size=3, passage_budget=10_000, fence=FENCE, encode=ENCODE)
    assert [len(w) for w in windows] == [3, 3, 1]


def test_passage_larger_than_budget_is_cut_to_fit_alone():
    [window] = pack_windows([Candidate(0, "word " * 3000, 3000, None)], 5, 200, FENCE, ENCODE)
    assert window[0].tokens < 200 and window[0].text.endswith(TRUNCATION_MARKER)


def test_resolve_encoder_falls_back_to_cl100k():
    encode = resolve_encoder(ScriptedLLM(lambda p, c: ""))
    assert encode("hello world") == ENCODE("hello world")


class SpecialTokenRefusing:
    """A tiktoken-like tokenizer whose ``encode`` refuses special-token text, as tiktoken's own does."""

    def encode(self, text):
        if "<|endoftext|>" in text:
            raise ValueError("Encountered text corresponding to disallowed special token '<|endoftext|>'")
        return ENCODE(text)


def test_special_token_text_is_counted_as_text_never_refused():
    import tiktoken

    llm = ScriptedLLM(lambda p, c: "")
    object.__setattr__(llm, "_tokenizer", tiktoken.get_encoding("cl100k_base"))  # what OpenAI(model=...) exposes
    text = "before <|endoftext|> after"
    assert len(resolve_encoder(llm)(text)) > 3
    assert len(resolve_encoder(llm, SpecialTokenRefusing().encode)(text)) > 3


def test_a_failing_tokenizer_is_estimated_not_raised():
    def broken(text):
        raise RuntimeError("tokenizer crashed")

    assert len(resolve_encoder(None, broken)("x" * 40)) == 11
