"""The byte-level BPE trainer merges as worked out by hand, and its encoders agree with tiktoken."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_jax import bpe, bpe_cli
from llm_jax.bpe import BPETokenizer, encode_with_ranks, train_bpe, train_bpe_naive
from llm_jax.data import read_builtin
from llm_jax.errors import UserError
from llm_jax.tokenizers import (ASSET_DIR, EOT, GPT2_EOT_ID, GPT2_PATTERN, gpt2_tokenizer,
                                read_gpt2_ranks, tokenizer_from_json)
from tests.conftest import make_corpus

ROOT = Path(__file__).resolve().parent.parent

# Sennrich et al.'s example, one word per line: GPT-2's pattern makes each word and each "\n" a
# chunk of its own, so the pairs below are those of the words alone.
HAND_TEXT = "low\n" * 5 + "lower\n" * 2 + "newest\n" * 6 + "widest\n" * 3
# Worked out by hand. Ids: d=100 e=101 i=105 l=108 n=110 o=111 r=114 s=115 t=116 w=119.
# Start: es 9, st 9, we 8, lo 7, ow 7, ne 6, ew 6, wi 3, id 3, de 3, er 2.
HAND_MERGES = [
    ((101, 115), b"es"),  # 9: ties with st (115, 116); the smaller pair wins
    ((256, 116), b"est"),  # 9: es+t; we is now 2 (only lower keeps w e)
    ((108, 111), b"lo"),  # 7: ties with ow (111, 119)
    ((258, 119), b"low"),  # 7
    ((101, 119), b"ew"),  # 6: ties with ne (110, 101) and w+est (119, 257)
    ((110, 260), b"new"),  # 6: ties with ew+est (260, 257)
    ((261, 257), b"newest"),  # 6
    ((100, 257), b"dest"),  # 3: ties with wi (119, 105), id (105, 100)
    ((105, 263), b"idest"),  # 3: ties with wi
    ((119, 264), b"widest"),  # 3
    ((101, 114), b"er"),  # 2: ties with low+e (259, 101)
    ((259, 266), b"lower"),  # 2; then no pair is left
]


def builtin_text(n_chars: int) -> str:
    """A slice of the built-in corpus (Python's docs), documents joined by <|endoftext|>."""
    return read_builtin("bpe").text[:n_chars]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return train_bpe(builtin_text(100_000), 1000)


# --- Training ----------------------------------------------------------------------------------


def test_merges_worked_out_by_hand():
    for trainer in (train_bpe, train_bpe_naive):
        t = trainer(HAND_TEXT, vocab_size=1000)
        assert t.merges == [pair for pair, _ in HAND_MERGES]
        assert t.tokens[256:] == [piece for _, piece in HAND_MERGES]
        # The text ran out of pairs: 256 bytes + 12 merges + <|endoftext|>.
        assert (t.vocab_size, t.eot_id) == (269, 268)
    assert train_bpe(HAND_TEXT, vocab_size=256 + 4 + 1).merges == t.merges[:4]
    assert t.encode("lowest newer\n") == [259, 257, 32, 261, 266, 10]


def test_ties_go_to_the_smaller_pair_not_the_first_seen():
    # "ac" comes first and both pairs occur twice: (97, 98) < (97, 99) decides on the second id.
    assert train_bpe("ac\nab\nab\nac\n", 300).merges == [(97, 98), (97, 99)]
    assert train_bpe("ba\nca\nca\nba\n", 300).merges == [(98, 97), (99, 97)]


def test_merges_never_cross_chunks():
    # " a" + "b" would be the most frequent pair of the raw bytes "ab ab ab", but the chunks are
    # "ab", " ab", " ab": the space is part of a chunk and "b a" never is.
    t = train_bpe("ab ab ab", 300)
    assert t.merges == [(97, 98), (32, 256)]
    assert all(b" " not in piece[1:] for piece in t.tokens)


def test_incremental_trainer_equals_the_naive_one():
    text = builtin_text(20_000)
    assert train_bpe(text, 600).merges == train_bpe_naive(text, 600).merges


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="aab \n!é", max_size=200), st.integers(257, 330))
def test_incremental_equals_naive_on_tie_heavy_texts(text, vocab_size):
    # Few distinct characters: many ties, runs like "aaaa" where a pair overlaps itself.
    assert train_bpe(text, vocab_size).merges == train_bpe_naive(text, vocab_size).merges


def test_training_is_deterministic_and_ignores_chunk_order():
    lines = make_corpus(20_000).splitlines(keepends=True)
    first = train_bpe("".join(lines), 400)
    assert train_bpe("".join(lines), 400).merges == first.merges
    random.Random(0).shuffle(lines)  # the same chunks with counts, met in another order
    assert train_bpe("".join(lines), 400).merges == first.merges
    assert len(first.merges) == 400 - 257


def test_vocabulary_is_bytes_then_merges_then_specials():
    t = train_bpe(builtin_text(30_000), 400, specials=[EOT, "<|pad|>"])
    assert t.vocab_size == 400 and len(t.merges) == 400 - 256 - 2
    assert t.special_tokens == {EOT: 398, "<|pad|>": 399} and t.eot_id == 398
    assert t.tokens[:256] == [bytes([i]) for i in range(256)]
    assert len(set(t.tokens)) == len(t.tokens)  # every token has its own bytes
    assert all(t.tokens[256 + i] == t.tokens[a] + t.tokens[b] for i, (a, b) in
               enumerate(t.merges))


# --- Special tokens ----------------------------------------------------------------------------


def test_special_tokens_are_not_learned_from():
    text = EOT.join(make_corpus(6000).splitlines())  # hundreds of <|endoftext|>
    learned = train_bpe(text, 400)
    assert not any(b"endoftext" in piece or b"<|" in piece for piece in learned.tokens)
    # The same text without the special token: its pieces are frequent enough to be merged.
    plain = train_bpe(text, 400, specials=[])
    assert any(b"endoftext" in piece for piece in plain.tokens)


def test_special_tokens_are_never_split(tok):
    eot = tok.eot_id
    for encode in (tok.encode, tok.encode_py):
        assert encode(EOT) == [eot]
        assert encode(f"a{EOT}{EOT} b") == [*encode("a"), eot, eot, *encode(" b")]
        assert eot not in encode("<|endoftext| and |endoftext|> and <|endoftex|>")
    assert tok.decode([eot]) == EOT


# --- Encoding ----------------------------------------------------------------------------------

TEXTS = [
    "",
    "Hello world",
    "  leading and trailing spaces   \n\n\t\r\n",
    "contractions: it's, don't, we're, I've, I'm, you'll, he'd",
    "numbers 3.14159 and 1,000,000 and ٣٤٥",
    "Unicode: héllo wörld, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇫🇷 and a lone skin tone 🏽",
    "combining e\u0301 a\u0308\u0323, zero\u200bwidth, NBSP\u00a0, BOM \ufeff",
    "\x00\x01 control \x7f\x1c\x1f chars \x85",
    f"first document{EOT}second document",
]

text_and_specials = st.lists(st.one_of(st.text(), st.just(EOT)), max_size=5).map("".join)


@settings(max_examples=300, deadline=None)
@given(text_and_specials)
def test_round_trip_and_own_encoder_equals_tiktoken(tok, text):
    ids = tok.encode(text)
    assert tok.encode_py(text) == ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_on_hard_cases(tok, text):
    ids = tok.encode(text)
    assert tok.encode_py(text) == ids and tok.decode(ids) == text


def test_own_encoder_equals_tiktoken_on_real_text(tok):
    text = read_builtin("bpe").text[100_000:400_000]  # not the part it was trained on
    ids = tok.encode(text)
    assert tok.encode_py(text) == ids
    assert len(ids) < len(text.encode()) / 2.5  # the merges do compress this kind of text
    assert tok.decode(ids) == text


def test_own_encoder_reproduces_gpt2_with_gpt2_ranks():
    ranks = read_gpt2_ranks(ASSET_DIR)
    text = builtin_text(60_000)
    gpt2 = gpt2_tokenizer()
    for sample in [text, *TEXTS]:
        assert encode_with_ranks(sample, ranks, GPT2_PATTERN, {EOT: GPT2_EOT_ID}) == \
            gpt2.encode(sample)


def test_lone_surrogates_are_refused_and_bad_utf8_decodes_with_replacement(tok):
    for encode in (tok.encode, tok.encode_py):
        with pytest.raises(UserError, match="surrogate U\\+D800 at character 1"):
            encode("a\ud800b")
    with pytest.raises(UserError, match="surrogate"):
        train_bpe("ok \udfff", 300)
    euro = "€".encode()  # three bytes, three byte tokens
    assert tok.decode(list(euro[:2])) == "\ufffd"  # a sequence cut inside a character
    assert tok.decode_bytes(list(euro[:2])) == euro[:2]  # the exact bytes are still there
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"
    with pytest.raises(UserError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


# --- Saving and loading ------------------------------------------------------------------------


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    d = json.loads(path.read_text(encoding="utf-8"))
    assert d == tok.to_json()
    assert (d["kind"], d["format_version"], d["pattern"]) == ("bpe", 1, GPT2_PATTERN)
    assert d["special_tokens"] == {EOT: 999} and len(d["merges"]) == 1000 - 257
    again = bpe.load(path)
    assert again.merges == tok.merges and again.special_tokens == tok.special_tokens
    rebuilt = tokenizer_from_json(json.loads(json.dumps(tok.to_json())))  # meta.json's way
    for t in (again, rebuilt):
        assert t.encode(TEXTS[5]) == tok.encode(TEXTS[5])


def test_bad_tokenizer_files_name_the_culprit(tok, tmp_path):
    with pytest.raises(UserError, match="missing.json.*does not exist"):
        bpe.load(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(tok.dumps()[:500])
    with pytest.raises(UserError, match="corrupt.json.*not valid JSON"):
        bpe.load(corrupt)

    def broken(name, **changes):
        path = tmp_path / name
        path.write_text(json.dumps({**tok.to_json(), **changes}))
        return path

    cases = {
        "version.json": ({"format_version": 9}, "format_version 9"),
        "kind.json": ({"kind": "char"}, "not a bpe tokenizer"),
        "future.json": ({"merges": [[256, 97]], "special_tokens": {}}, "merge 0 \\(256, 97"),
        "twice.json": ({"merges": [[97, 98], [97, 98]], "special_tokens": {}}, "same bytes"),
        "ids.json": ({"special_tokens": {EOT: 5}}, "special token ids"),
        "pattern.json": ({"pattern": "(unclosed"}, "not a valid regex"),
        "merges.json": ({"merges": [[1, "a"]]}, "pairs"),
    }
    for name, (changes, message) in cases.items():
        with pytest.raises(UserError, match=f"{name}.*{message}"):
            bpe.load(broken(name, **changes))
    with pytest.raises(UserError, match="vocab size 257 is too small.*258"):
        train_bpe("text", 257, specials=[EOT, "<|pad|>"])
    with pytest.raises(UserError, match="'<\\|a\\|>' is the start of another"):
        train_bpe("text", 300, specials=["<|a|>", "<|a|>b"])


# --- Command line ------------------------------------------------------------------------------


def test_train_command_prints_merges_and_show_prints_pieces(tmp_path, capsys):
    source = tmp_path / "words.txt"
    source.write_text(HAND_TEXT, encoding="utf-8")
    out = tmp_path / "tok.json"
    bpe_cli.main(["train", "--input", str(source), "--vocab-size", "1000", "--out", str(out),
              "--verbose"])
    printed = capsys.readouterr().out
    assert "merge 1: 'e' + 's' -> 'es' (count 9, id 256)\n" in printed
    assert "merge 12: 'low' + 'er' -> 'lower' (count 2, id 267)\n" in printed
    assert "ran out of pairs" in printed
    assert bpe.load(out).merges == [pair for pair, _ in HAND_MERGES]

    bpe_cli.main(["show", "--tokenizer", str(out), f"lowest newer{EOT}é"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "26 characters, 27 bytes -> 8 tokens (vocabulary 269)"
    pieces = [line.split(maxsplit=1) for line in lines[1:]]
    assert pieces == [["259", "'low'"], ["257", "'est'"], ["32", "' '"], ["261", "'new'"],
                      ["266", "'er'"], ["268", "'<|endoftext|>'"], ["195", "b'\\xc3'"],
                      ["169", "b'\\xa9'"]]


def test_command_line_mistakes_are_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(*args):
        result = subprocess.run([sys.executable, "-m", "llm_jax.bpe", *args], cwd=tmp_path,
                                capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        return result.stderr.strip().splitlines()[-1]

    assert run("train", "--input", "nowhere.txt", "--vocab-size", "300", "--out", "t.json") \
        == "error: --input 'nowhere.txt' does not exist"
    (tmp_path / "bad.json").write_text('{"kind": "bpe",')
    assert run("show", "--tokenizer", "bad.json", "x").startswith(
        "error: tokenizer file 'bad.json' is not valid JSON")


# --- Training a model with it ------------------------------------------------------------------


def test_config_asks_for_a_file_or_a_size():
    from llm_jax.config import load_config

    cfg = load_config(["--data.tokenizer=bpe", "--data.bpe_vocab_size=300"])
    assert (cfg.data.tokenizer, cfg.data.bpe_vocab_size) == ("bpe", 300)
    for args, message in [(["--data.tokenizer=bpe"], "bpe_path.*bpe_vocab_size"),
                          (["--data.tokenizer=bpe", "--data.bpe_vocab_size=300",
                            "--data.bpe_path=t.json"], "one of"),
                          (["--data.tokenizer=bpe", "--data.bpe_vocab_size=256"], "257"),
                          (["--data.bpe_vocab_size=300"], "need data.tokenizer=bpe")]:
        with pytest.raises(UserError, match=message):
            load_config(args)


def test_train_a_model_with_a_bpe_trained_on_the_fly_then_sample(run_config, tmp_path, capsys):
    import dataclasses

    import sample  # the script, run in this process: a subprocess would import JAX again
    from llm_jax.training import train

    cfg = run_config(tmp_path / "out", model={"n_layer": 1}, max_iters=4, eval_interval=4,
                     eval_iters=1, log_interval=2)
    data_dir = tmp_path / "data"
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, tokenizer="bpe", bpe_vocab_size=300, data_dir=str(data_dir)))
    assert train(cfg)["steps"] == 4
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 300 and saved["data"]["bpe_vocab_size"] == 300
    prepared = next(data_dir.iterdir())
    assert prepared.name.endswith("-bpe300") and (prepared / "tokenizer.json").is_file()
    assert "training a BPE tokenizer of 300 tokens" in capsys.readouterr().out

    shutil.rmtree(data_dir)  # sampling needs only the run: the tokenizer is in its checkpoint
    sample.main(["--out_dir", str(tmp_path / "out"), "--prompt", f"The quick{EOT}",
                 "--max_new_tokens", "5", "--temperature", "0"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"The quick{EOT}") and len(printed) > len(f"The quick{EOT}\n")
