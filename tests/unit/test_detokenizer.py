"""tandem.detokenizer: streamed text equals whole decoding; stop strings cut it exactly.

The tokenizers are trained here with ``tokenizers`` (nothing is downloaded): a byte-level
BPE whose tokens split multi-byte characters, and a SentencePiece-style (Metaspace) BPE
whose decoder strips the leading space of a string's first token.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tandem.detokenizer import DetokenizerUpdate, IncrementalDetokenizer  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

SPECIAL = ["<s>", "</s>", "<unk>", "<pad>"]
WORDS = (  # noqa: SIM905
    "the a of to and in is it you that he was for on are with as his they be at one have "
    "this from or had by word but what some we can out other were all there when up use "
    "your how said each she which do their time if will way about many then write would"
).split()
ACCENTED = "café naïve résumé Zürich señor façade jalapeño crème brûlée Øresund Straße déjà garçon Ελληνικά Кириллица".split()  # noqa: SIM905
CJK = "中文 日本語 한국어 汉字 東京 北京 你好 世界 こんにちは 안녕하세요 漢字テスト".split()  # noqa: SIM905
EMOJI = ["😀", "🎉", "👍🏽", "🇫🇷", "👨\u200d👩\u200d👧", "🚀", "❤️", "🤖"]
FRAGMENTS = WORDS + ACCENTED + CJK + EMOJI + ["\n", ", ", ". ", "  ", "\u00a0", "\t"]
# Characters from 1 to 4 UTF-8 bytes, some rarely seen in training so they stay split.
CHARS = "ab éüßΩж中文語한😀🎉🇫👍🏽\u200d\n."
# Per-test settings (not a global profile: other test modules keep theirs).
BASE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _training_lines(n: int = 400) -> list[str]:
    rng = random.Random(0)
    pool = WORDS * 3 + ACCENTED + CJK + EMOJI
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(3, 15))) for _ in range(n)]


def _wrap(tok: Any) -> Any:
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def tok() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(_training_lines(), trainer)
    return _wrap(t)


@pytest.fixture(scope="module")
def sp_tok() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False)
    t.train_from_iterator([" ".join(WORDS)] * 5 + _training_lines(100), trainer)
    return _wrap(t)


class CountingTokenizer:
    """Exposes only ``decode`` and ``added_tokens_decoder`` (the detokenizer's fallback
    path) and records the longest id list it was asked to decode."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.added_tokens_decoder = inner.added_tokens_decoder
        self.longest = 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, **kwargs)


def stream(
    tokenizer: Any,
    prompt: Sequence[int],
    output: Sequence[int],
    chunks: Sequence[int] = (),
    **kwargs: Any,
) -> tuple[IncrementalDetokenizer, list[DetokenizerUpdate], str]:
    """Feed ``output`` in pieces of the sizes in ``chunks`` (then one by one); flush."""
    detok = IncrementalDetokenizer(tokenizer, prompt, **kwargs)
    updates: list[DetokenizerUpdate] = []
    i = 0
    sizes = iter(chunks)
    while i < len(output):
        n = max(1, next(sizes, 1))
        updates.append(detok.add_tokens(output[i : i + n]))
        i += n
    return detok, updates, detok.flush()


def joined(updates: list[DetokenizerUpdate], tail: str) -> str:
    return "".join(u.delta for u in updates) + tail


def expected_stop(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Reference: the stop string that is complete first as the text grows char by char."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            stop = max(hits, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


# -- the fixture ----------------------------------------------------------------------------


def test_fixture_splits_multibyte_characters(tok: Any) -> None:
    text = "Zürich café 中文 👍🏽 北京 漢字テスト 🇫🇷 Ελληνικά"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), pieces
    # Some token carries both the end of one character and more text after it.
    assert any(
        "\ufffd" in tok.decode([i]) and tok.decode([i]).strip("\ufffd") for i in range(len(tok))
    )


# -- incremental text equals whole decoding ------------------------------------------------


@settings(BASE, max_examples=400)
@given(
    data=st.data(),
    skip=st.booleans(),
    fallback=st.booleans(),
    chunks=st.lists(st.integers(1, 4), max_size=30),
)
def test_random_ids_match_decode(
    tok: Any, data: st.DataObject, skip: bool, fallback: bool, chunks: list[int]
) -> None:
    ids = st.integers(0, len(tok) - 1)
    prompt = data.draw(st.lists(ids, max_size=12))
    output = data.draw(st.lists(ids, max_size=60))
    tokenizer = CountingTokenizer(tok) if fallback else tok
    detok, updates, tail = stream(tokenizer, prompt, output, chunks, skip_special_tokens=skip)
    want = tok.decode(output, skip_special_tokens=skip)
    assert joined(updates, tail) == want
    assert detok.output_text == want
    assert all(u.stop_string is None for u in updates)


@settings(BASE, max_examples=300)
@given(data=st.data(), chunks=st.lists(st.integers(1, 4), max_size=40))
def test_undecodable_bytes_match_decode(tok: Any, data: st.DataObject, chunks: list[int]) -> None:
    # Mostly tokens that hold parts of characters, so that long runs never finish a
    # character and the window must cut them at a safe boundary.
    partial = [t for t in range(len(tok)) if "\ufffd" in tok.decode([t])]
    ids = st.sampled_from(partial) | st.integers(0, len(tok) - 1)
    prompt = data.draw(st.lists(ids, max_size=8))
    output = data.draw(st.lists(ids, max_size=120))
    counter = CountingTokenizer(tok)
    _, updates, tail = stream(counter, prompt, output, chunks)
    assert joined(updates, tail) == tok.decode(output, skip_special_tokens=True)


@settings(BASE, max_examples=300)
@given(
    prompt=st.lists(st.sampled_from(FRAGMENTS), max_size=8).map(" ".join),
    words=st.lists(
        st.sampled_from(FRAGMENTS) | st.text(CHARS, min_size=1, max_size=6), max_size=25
    ),
    chunks=st.lists(st.integers(1, 6), max_size=30),
)
def test_real_text_streams_whole_characters(
    tok: Any, prompt: str, words: list[str], chunks: list[int]
) -> None:
    text = " ".join(words)
    output = tok.encode(text)
    detok, updates, tail = stream(tok, tok.encode(prompt), output, chunks)
    assert joined(updates, tail) == text == tok.decode(output)
    assert not any("\ufffd" in u.delta for u in updates)


def test_text_is_held_only_while_a_character_is_unfinished(tok: Any) -> None:
    text = "Zürich 中文 👍🏽 🇫🇷 señor 漢字テスト 👨\u200d👩\u200d👧 ok"
    output = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("Hello"))
    held_back = 0
    for i, t in enumerate(output, 1):
        detok.add_tokens([t])
        prefix = tok.decode(output[:i])
        if prefix.endswith("\ufffd"):
            held_back += 1
            assert prefix.startswith(detok.output_text)
        else:
            assert detok.output_text == prefix
    assert held_back > 0  # the text really splits characters across tokens
    assert detok.flush() == ""


def test_prompt_ending_inside_a_character(tok: Any) -> None:
    ids = tok.encode("abc 中文 👍🏽 北京 done")
    cuts = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert cuts
    for k in cuts:
        _, updates, tail = stream(tok, ids[:k], ids[k:])
        assert joined(updates, tail) == tok.decode(ids[k:])


def test_seed_gives_the_first_token_its_leading_space(sp_tok: Any) -> None:
    prompt, output = sp_tok.encode("you said"), sp_tok.encode(" about time")
    assert sp_tok.decode(output) == "about time"  # alone, the decoder strips the space
    _, updates, tail = stream(sp_tok, prompt, output)
    assert joined(updates, tail) == " about time"
    assert sp_tok.decode(prompt + output) == "you said about time"
    # With no prompt context the stream decodes like the output alone.
    _, updates, tail = stream(sp_tok, [sp_tok.bos_token_id], output)
    assert joined(updates, tail) == "about time"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok: Any, skip: bool) -> None:
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    output = [bos, *tok.encode("hi 中文"), pad, eos]
    detok, updates, tail = stream(tok, [bos], output, skip_special_tokens=skip)
    assert joined(updates, tail) == ("hi 中文" if skip else "<s>hi 中文<pad></s>")


def test_window_stays_bounded(tok: Any) -> None:
    # A lone continuation byte never becomes valid UTF-8: a degenerate model repeating it
    # must not make every step decode the whole output.
    a = tok.encode("a")
    cont = next(
        t
        for t in range(len(tok))
        if tok.decode(a + [t, t]) == "a\ufffd\ufffd" and tok.decode([t] + a) == "\ufffda"
    )
    lead = tok.encode("中")  # several byte tokens; the first starts the character
    assert len(lead) > 1
    output = (
        [cont] * 500 + [tok.eos_token_id] * 500 + lead[:1] + [tok.pad_token_id] * 500 + lead[1:]
    )
    output += tok.encode(" end")
    counter = CountingTokenizer(tok)
    _, updates, tail = stream(counter, tok.encode("Hello"), output)
    assert joined(updates, tail) == tok.decode(output, skip_special_tokens=True)
    assert joined(updates, tail).endswith("中 end")
    assert counter.longest <= 20


# -- stop strings ---------------------------------------------------------------------------


def test_stop_string_spanning_tokens(tok: Any) -> None:
    text = "we can write 中文 👍🏽 and more text after"
    stop = "文 👍"
    output = tok.encode(text)
    assert not any(stop in tok.decode([t]) for t in output)  # it spans tokens
    detok, updates, tail = stream(tok, tok.encode("Q:"), output, stop=[stop, "never"])
    hits = [u.stop_string for u in updates if u.stop_string]
    assert hits == [stop]
    assert joined(updates, tail) == detok.output_text == "we can write 中"
    assert tail == "" and detok.stop_string == stop and detok.finished
    # Tokens after the stop (already in flight) are ignored.
    assert updates[-1].stop_string is None
    assert detok.add_tokens(tok.encode("x")) == DetokenizerUpdate("", None)


def test_include_stop_str_in_output(tok: Any) -> None:
    output = tok.encode("one two three four")
    detok, updates, tail = stream(tok, [], output, stop=["three"], include_stop_str_in_output=True)
    assert joined(updates, tail) == detok.output_text == "one two three"


def test_stop_that_ends_first_wins(tok: Any) -> None:
    output = tok.encode("xx abcd yy")
    detok, updates, _ = stream(tok, [], output, [len(output)], stop=["abcd", "bc"])
    assert updates[0].stop_string == "bc"
    assert detok.output_text == "xx a"
    # On a tie of where they end, the longer one (earlier start) wins.
    detok, updates, _ = stream(tok, [], output, [len(output)], stop=["c", "abc"])
    assert updates[0].stop_string == "abc" and detok.output_text == "xx "


def test_possible_stop_prefix_is_held_then_flushed(tok: Any) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["END!"])
    assert detok.add_tokens(tok.encode("the EN")).delta == "the "
    assert detok.add_tokens(tok.encode("D")).delta == ""  # "END" may still become "END!"
    assert detok.add_tokens(tok.encode("?")).delta == "END?"
    assert detok.add_tokens(tok.encode(" E")).delta == " "
    assert detok.flush() == "E"  # finished for another reason: release the held text
    assert detok.output_text == "the END? E" and detok.stop_string is None
    assert detok.flush() == ""


def test_stop_found_at_flush(tok: Any) -> None:
    # The stop string sits before an unfinished character: it is found when flushed.
    ids = tok.encode("ab STOP 中")
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    streamed = detok.add_tokens(ids[:-1]).delta + detok.flush()
    assert streamed == detok.output_text == "ab "
    assert detok.stop_string == "STOP"


@settings(BASE, max_examples=400)
@given(
    text=st.text(CHARS, max_size=40),
    stops=st.lists(st.text(CHARS, min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
    chunks=st.lists(st.integers(1, 4), max_size=30),
)
def test_stop_strings_match_reference(
    tok: Any, text: str, stops: list[str], include: bool, chunks: list[int]
) -> None:
    output = tok.encode(text)
    kwargs = {"stop": stops, "include_stop_str_in_output": include}
    detok, updates, tail = stream(tok, tok.encode("> "), output, chunks, **kwargs)
    want, want_stop = expected_stop(text, stops, include)
    assert joined(updates, tail) == detok.output_text == want
    assert detok.stop_string == want_stop
    assert [u.stop_string for u in updates if u.stop_string] == ([want_stop] if want_stop else [])
    if want_stop:
        assert tail == ""


@settings(BASE, max_examples=200)
@given(
    text=st.text(CHARS, max_size=40),
    stops=st.lists(st.text(CHARS, min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_holdback_is_bounded(tok: Any, text: str, stops: list[str]) -> None:
    output = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], stop=stops)
    longest = max(map(len, stops))
    for i, t in enumerate(output, 1):
        if detok.add_tokens([t]).stop_string:
            break
        decoded = tok.decode(output[:i])
        if not decoded.endswith("\ufffd"):
            assert decoded.startswith(detok.output_text)
            assert len(decoded) - len(detok.output_text) <= longest - 1


def test_rejects_empty_stop_string(tok: Any) -> None:
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(tok, [], stop=[""])


def test_module_does_not_import_torch() -> None:
    code = "import sys, tandem.detokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
