import random

import pytest

from engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from engine.tokenizer import load_tokenizer

MULTILINGUAL = "你好，世界！我们去公园吧。😀🚀🎉 résumé naïve 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 done 日本語のテキスト"


@pytest.fixture(scope="module")
def byte_tok():
    return load_tokenizer("dummy:tiny")


@pytest.fixture(scope="module")
def bpe_tok():
    """A tiny byte-level BPE (Llama 3 / Qwen style), trained offline. With 44 merges, most CJK
    and emoji characters end up split over several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["你好世界，今天天气很好。我们一起去公园吧！", "日本語のテキストも少し。",
              "emoji 😀😃😄🎉🚀 and more 😀🎉", "Hello world, this is a test of byte level BPE."] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def sentencepiece_tok():
    """Llama 2 style: '▁' marks spaces, the decoder strips a sequence's leading space, and
    characters missing from the vocabulary fall back to <0xXX> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Hello world, this is a test of the sentence piece like BPE.",
              "the quick brown fox jumps over the lazy dog"] * 20
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[f"<0x{i:02X}>" for i in range(256)], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _feed(detok, ids, rng=None):
    """Add ``ids`` one token at a time (or in random chunks of 1..4 with ``rng``); returns the
    increments, the flush last."""
    pieces, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4) if rng else 1
        pieces.append(detok.add(ids[i:i + n]))
        i += n
    pieces.append(detok.flush())
    return pieces


class CountingDecoder:
    """Wraps a tokenizer and records how many ids each decode call gets."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids)


@pytest.mark.parametrize("tok_name", ["byte_tok", "bpe_tok"])
@pytest.mark.parametrize("chunked", [False, True])
def test_split_multibyte_characters_never_leak_replacement_chars(tok_name, chunked, request):
    tok = request.getfixturevalue(tok_name)
    prompt = tok.encode("Translate: ")
    ids = tok.encode(MULTILINGUAL * 3)
    # The test is only meaningful if tokens really cut characters apart.
    assert any(REPLACEMENT in tok.decode([t]) for t in ids)
    detok = IncrementalDetokenizer(tok, prompt, stop=[])
    pieces = _feed(detok, ids, random.Random(0) if chunked else None)
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == MULTILINGUAL * 3 == detok.text
    assert not detok.stopped


def test_leading_space_of_sentencepiece_tokens_survives(sentencepiece_tok):
    tok = sentencepiece_tok
    prompt_text, completion = "Hello world", " the quick brown fox 你好 😀 jumps over the lazy dog"
    prompt = tok.encode(prompt_text)
    full = tok.encode(prompt_text + completion)
    assert full[:len(prompt)] == prompt
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = _feed(detok, full[len(prompt):])
    assert all(REPLACEMENT not in p for p in pieces)
    assert detok.text == completion


def test_invalid_bytes_are_emitted_once_and_match_the_full_decode(byte_tok):
    """Random bytes (what a dummy model emits): real invalid UTF-8 must come out as U+FFFD,
    exactly as a one-shot decode gives it, however the tokens arrive."""
    rng = random.Random(1)
    for trial in range(20):
        ids = [rng.randrange(256) for _ in range(rng.randint(1, 120))]
        if trial % 3 == 0:
            ids += [0xE4, 0xB8]  # ends inside a character
        counting = CountingDecoder(byte_tok)
        detok = IncrementalDetokenizer(counting, byte_tok.encode("ok "), stop=[])
        pieces = _feed(detok, ids, rng if trial % 2 else None)
        assert "".join(pieces) == byte_tok.decode(ids)
        # Each call decodes a bounded window, not the whole sequence.
        assert max(counting.sizes) <= IncrementalDetokenizer.MAX_WINDOW + 4


def test_long_run_of_invalid_bytes(byte_tok):
    """More invalid bytes in a row than the window keeps as context."""
    ids = byte_tok.encode("start ") + [0x80] * 40 + [0xE4, 0xB8] + byte_tok.encode("a中")
    detok = IncrementalDetokenizer(byte_tok, [])
    assert "".join(_feed(detok, ids)) == byte_tok.decode(ids)
    detok = IncrementalDetokenizer(byte_tok, [])
    pieces = [detok.add([t]) for t in byte_tok.encode("x") + [0x80] * 40]
    assert "".join(pieces) == "x"  # the trailing U+FFFD run could still be an unfinished character
    assert detok.flush() == REPLACEMENT * 40


def test_window_stays_small_on_long_outputs(bpe_tok):
    counting = CountingDecoder(bpe_tok)
    ids = bpe_tok.encode(MULTILINGUAL * 40)
    detok = IncrementalDetokenizer(counting, [])
    _feed(detok, ids)
    assert detok.text == MULTILINGUAL * 40
    assert max(counting.sizes) <= IncrementalDetokenizer.MAX_WINDOW + 1
    assert len(counting.sizes) < 1.2 * len(ids)


@pytest.mark.parametrize("tok_name", ["byte_tok", "bpe_tok"])
def test_stop_string_split_across_tokens(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    completion = "The answer is 42. 完成了。END and then more text"
    ids = tok.encode(completion)
    detok = IncrementalDetokenizer(tok, tok.encode("Q: "), stop=["。END"])
    pieces = []
    for i, t in enumerate(ids):
        pieces.append(detok.add([t]))
        if detok.stopped:
            break
    assert detok.stopped
    # Cut before the stop string; nothing of it was ever emitted, even temporarily.
    assert detok.text == "".join(pieces) == "The answer is 42. 完成了"
    assert i < len(ids) - 1
    assert detok.add(ids[i + 1:]) == "" and detok.flush() == ""
    assert detok.text == "The answer is 42. 完成了"


def test_stop_at_the_very_start(byte_tok):
    detok = IncrementalDetokenizer(byte_tok, [1, 2, 3], stop=["<", "Hi"])
    assert detok.add(byte_tok.encode("H")) == ""
    assert detok.add(byte_tok.encode("i there")) == ""
    assert detok.stopped and detok.text == ""


def test_earliest_stop_string_wins_and_overlaps_are_found(byte_tok):
    detok = IncrementalDetokenizer(byte_tok, [], stop=["cd", "abcx", "bc"])
    pieces = [detok.add([t]) for t in byte_tok.encode("zabcdef")]
    assert detok.stopped and detok.text == "".join(pieces) == "za"
    # Several stop strings complete within one call: the earliest one in the text wins.
    detok = IncrementalDetokenizer(byte_tok, [], stop=["ef", "cd", "bcd"])
    assert detok.add(byte_tok.encode("zabcdefg")) == "za"
    assert detok.stopped


def test_partial_stop_string_is_held_until_decided(byte_tok):
    detok = IncrementalDetokenizer(byte_tok, [], stop=["STOP"])
    out = [detok.add([t]) for t in byte_tok.encode("go ST")]
    assert "".join(out) == "go " and detok.text == "go "
    assert detok.add(byte_tok.encode("ART")) == "START"  # not a stop after all
    assert detok.add(byte_tok.encode(" STO")) == " "
    assert detok.flush() == "STO"  # generation ended: the held prefix is plain text
    assert detok.text == "go START STO" and not detok.stopped


def test_no_stop_strings(bpe_tok):
    text = "no stop here: STOP END ### 你好"
    detok = IncrementalDetokenizer(bpe_tok, [], stop=None)
    pieces = _feed(detok, bpe_tok.encode(text))
    assert "".join(pieces) == text and not detok.stopped


def test_character_begun_in_the_prompt_is_not_part_of_the_completion(byte_tok):
    prompt = byte_tok.encode("ab") + [0xE4]  # prompt cut inside '中'
    detok = IncrementalDetokenizer(byte_tok, prompt)
    pieces = _feed(detok, [0xB8, 0xAD] + byte_tok.encode("xyz"))
    assert "".join(pieces) == "xyz"


def test_placeholder_ids_and_special_tokens(byte_tok):
    detok = IncrementalDetokenizer(byte_tok, [])
    pieces = _feed(detok, byte_tok.encode("a") + [300] + byte_tok.encode("é") + [byte_tok.eos_token_id])
    assert "".join(pieces) == "a<|300|>é"
