"""Corpora are read, split and tokenized exactly; batches are reproducible windows of the tokens."""

import hashlib
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from llm_jax import bpe, data
from llm_jax.config import DataConfig
from llm_jax.data import get_batch, load_prepared, prepare, read_corpus, split_point
from llm_jax.errors import UserError
from llm_jax.tokenizers import EOT, gpt2_tokenizer

TEXT = "".join(f"Line {i}: to be, or not to be — that is the question. ünïcödé\n"
               for i in range(60))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("the data code tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def config(tmp_path, **fields) -> DataConfig:
    return DataConfig(data_dir=str(tmp_path / "data"), **fields)


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- Sources -----------------------------------------------------------------------------------


def test_builtin_corpus_is_pythons_documentation(tmp_path):
    from pydoc_data.topics import topics

    char = read_corpus(config(tmp_path, source="builtin", tokenizer="char"))
    assert len(char.text) > 300_000
    assert 'The "if" statement is used for conditional execution' in char.text
    assert char.text.startswith(topics[sorted(topics)[0]])
    gpt2 = read_corpus(config(tmp_path, source="builtin", tokenizer="gpt2"))
    assert gpt2.text.count(EOT) == len(topics) - 1  # documents separated by end-of-text
    assert EOT not in char.text


def test_folder_of_documents_in_path_order(tmp_path):
    write(tmp_path / "corpus" / "b.txt", "second")
    write(tmp_path / "corpus" / "a.md", "first")
    write(tmp_path / "corpus" / "sub" / "c.txt", "third")
    write(tmp_path / "corpus" / "ignored.py", "print('not text')")
    write(tmp_path / "corpus" / "empty.txt", "")
    corpus = read_corpus(config(tmp_path, source="text", path=str(tmp_path / "corpus")))
    assert corpus.text == "first\n\nsecond\n\nthird"
    gpt2 = read_corpus(config(tmp_path, source="text", path=str(tmp_path / "corpus"),
                              tokenizer="gpt2"))
    assert gpt2.text == f"first{EOT}second{EOT}third"


def test_source_errors_name_the_culprit(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(UserError, match="nowhere.txt"):
        prepare(config(tmp_path, source="text", path=str(missing)))
    with pytest.raises(UserError, match="data.path"):
        prepare(config(tmp_path, source="text", path=""))
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(UserError, match="empty.*empty.txt"):
        prepare(config(tmp_path, source="text", path=str(empty)))
    folder = tmp_path / "folder"
    write(folder / "notes.py", "x = 1")
    with pytest.raises(UserError, match="no .txt or .md"):
        prepare(config(tmp_path, source="text", path=str(folder)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt.*not UTF-8"):
        prepare(config(tmp_path, source="text", path=str(latin1)))
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.bin"))


# --- Preparation -------------------------------------------------------------------------------


def test_prepare_char_writes_bins_split_at_the_right_place(tmp_path):
    source = write(tmp_path / "play.txt", TEXT)
    prepared = prepare(config(tmp_path, source="text", path=str(source)))
    meta = json.loads((prepared.directory / "meta.json").read_text())
    assert prepared.directory.parent == tmp_path / "data"
    assert prepared.directory.name.startswith("text-") and prepared.directory.name.endswith("-char")

    cut = int(len(TEXT) * 0.9)  # nanoGPT: the first 90% of the characters train
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(set(TEXT))
    assert (meta["train_chars"], meta["val_chars"]) == (cut, len(TEXT) - cut)
    assert (meta["train_tokens"], meta["val_tokens"]) == (cut, len(TEXT) - cut)
    assert meta["source_sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    assert meta["eot_id"] is None and meta["tokenizer"]["chars"] == prepared.tokenizer.chars

    train = np.fromfile(prepared.directory / "train.bin", dtype=np.uint16)
    val = np.fromfile(prepared.directory / "val.bin", dtype=np.uint16)
    assert prepared.tokenizer.decode(train) == TEXT[:cut]
    assert prepared.tokenizer.decode(val) == TEXT[cut:]
    assert np.array_equal(prepared.train, train) and not prepared.train.flags.writeable
    reopened = load_prepared(prepared.directory)
    assert reopened.meta == meta and np.array_equal(reopened.val, val)


def test_prepare_gpt2_keeps_documents_apart(tmp_path):
    write(tmp_path / "docs" / "a.txt", TEXT[:1500])
    write(tmp_path / "docs" / "b.txt", TEXT[1500:])
    prepared = prepare(config(tmp_path, source="text", path=str(tmp_path / "docs"),
                              tokenizer="gpt2"))
    tokens = np.concatenate([prepared.train, prepared.val])
    assert prepared.train.dtype == np.uint16 and prepared.meta["eot_id"] == 50256
    assert list(tokens).count(50256) == 1
    text = TEXT[:1500] + EOT + TEXT[1500:]
    assert gpt2_tokenizer().decode(prepared.train) == text[:int(len(text) * 0.9)]
    assert gpt2_tokenizer().decode(prepared.val) == text[int(len(text) * 0.9):]


def test_split_never_cuts_an_end_of_text_token():
    text = "a" * 85 + EOT + "b" * 3  # 90% of 101 characters falls inside the token
    cut = split_point(text, 0.1, EOT)
    assert cut == 85 and text[cut:].startswith(EOT)
    assert split_point("x" * 100, 0.1, EOT) == 90


def test_prepare_is_reused_until_something_changes(tmp_path):
    source = write(tmp_path / "play.txt", TEXT)
    first = prepare(config(tmp_path, source="text", path=str(source)))
    stamp = (first.directory / "train.bin").stat().st_mtime_ns
    again = prepare(config(tmp_path, source="text", path=str(source)))
    assert again.reused and not first.reused
    assert (again.directory / "train.bin").stat().st_mtime_ns == stamp

    write(source, TEXT + "A new scene.\n")  # same path, new text
    changed = prepare(config(tmp_path, source="text", path=str(source)))
    assert not changed.reused and changed.directory == first.directory
    assert changed.meta["train_chars"] + changed.meta["val_chars"] == len(TEXT) + 13

    resplit = prepare(config(tmp_path, source="text", path=str(source), val_fraction=0.5))
    total = len(TEXT) + 13
    assert not resplit.reused and resplit.meta["val_chars"] == total - int(total * 0.5)


def test_interrupted_preparation_is_redone(tmp_path):
    source = write(tmp_path / "play.txt", TEXT)
    prepared = prepare(config(tmp_path, source="text", path=str(source)))
    with open(prepared.directory / "val.bin", "r+b") as f:  # as if cut off while writing
        f.truncate(10)
    with pytest.raises(UserError, match="val.bin"):
        load_prepared(prepared.directory)
    redone = prepare(config(tmp_path, source="text", path=str(source)))
    assert not redone.reused and len(redone.val) == len(TEXT) - int(len(TEXT) * 0.9)


def test_preparation_cut_off_midway_is_never_reused(tmp_path, monkeypatch):
    source = write(tmp_path / "play.txt", TEXT)
    prepared = prepare(config(tmp_path, source="text", path=str(source)))
    write(source, TEXT.replace("Line", "LINE"))  # same length: only meta.json tells them apart
    write_atomic = data.write_atomic

    def crash_after_train_bin(path, content):
        write_atomic(path, content)
        if path.name == "train.bin":
            raise KeyboardInterrupt

    monkeypatch.setattr(data, "write_atomic", crash_after_train_bin)
    with pytest.raises(KeyboardInterrupt):
        prepare(config(tmp_path, source="text", path=str(source)))
    with pytest.raises(UserError, match="meta.json"):  # new train.bin, old val.bin: not trusted
        load_prepared(prepared.directory)

    monkeypatch.undo()
    write(source, TEXT)
    again = prepare(config(tmp_path, source="text", path=str(source)))
    assert not again.reused and again.tokenizer.decode(again.train) == TEXT[:int(len(TEXT) * 0.9)]


def test_load_prepared_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match="missing-folder"):
        load_prepared(tmp_path / "missing-folder")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="half.*meta.json"):
        load_prepared(tmp_path / "half")


def test_too_short_split_is_an_error(tmp_path):
    source = write(tmp_path / "tiny.txt", "abcdefghij")  # val gets 1 character
    with pytest.raises(UserError, match="val split.*1 token"):
        prepare(config(tmp_path, source="text", path=str(source)))


def test_prepare_bpe_trains_on_the_train_split_only(tmp_path):
    write(tmp_path / "docs" / "a.txt", TEXT[:1500])
    write(tmp_path / "docs" / "b.txt", TEXT[1500:])
    cfg = config(tmp_path, source="text", path=str(tmp_path / "docs"), tokenizer="bpe",
                 bpe_vocab_size=280)
    prepared = prepare(cfg)
    text = TEXT[:1500] + EOT + TEXT[1500:]  # documents joined by the special token
    cut = int(len(text) * 0.9)
    assert prepared.directory.name.endswith("-bpe280")
    assert prepared.tokenizer.to_json() == bpe.train_bpe(text[:cut], 280).to_json()
    saved = bpe.load(prepared.directory / "tokenizer.json")
    assert saved.to_json() == prepared.tokenizer.to_json() == prepared.meta["tokenizer"]
    meta = prepared.meta
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (280, 279, "uint16")
    assert meta["tokenizer_settings"] == {"bpe_vocab_size": 280}
    tokens = np.concatenate([prepared.train, prepared.val])
    assert list(tokens).count(279) == 1 and len(tokens) < 0.7 * len(text)  # merged
    assert prepared.tokenizer.decode(prepared.train) == text[:cut]
    assert prepared.tokenizer.decode(prepared.val) == text[cut:]

    assert prepare(cfg).reused
    smaller = prepare(config(tmp_path, source="text", path=str(tmp_path / "docs"),
                             tokenizer="bpe", bpe_vocab_size=270))
    assert not smaller.reused and smaller.tokenizer.vocab_size == 270
    assert smaller.directory != prepared.directory and prepare(cfg).reused


def test_prepare_bpe_from_a_file_follows_the_file(tmp_path):
    source = write(tmp_path / "play.txt", TEXT)
    tok_path = tmp_path / "tok.json"
    bpe.train_bpe(TEXT, 280).save(tok_path)
    cfg = config(tmp_path, source="text", path=str(source), tokenizer="bpe",
                 bpe_path=str(tok_path))
    first = prepare(cfg)
    digest = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    assert first.directory.name.endswith(f"-bpe-{digest[:8]}")
    assert first.meta["tokenizer_settings"] == {"bpe_file_sha256": digest}
    assert first.tokenizer.to_json() == bpe.load(tok_path).to_json()
    assert prepare(cfg).reused

    bpe.train_bpe(TEXT, 270).save(tok_path)  # the same path, another tokenizer
    second = prepare(cfg)
    assert not second.reused and second.tokenizer.vocab_size == 270
    tok_path.unlink()  # the prepared data carries its tokenizer
    assert load_prepared(second.directory).tokenizer.decode(second.val) == \
        TEXT[int(len(TEXT) * 0.9):]
    with pytest.raises(UserError, match="data.bpe_path.*tok.json.*does not exist"):
        prepare(cfg)
    with pytest.raises(UserError, match="bpe_vocab_size"):
        prepare(config(tmp_path, source="text", path=str(source), tokenizer="bpe"))


# --- Tiny Shakespeare --------------------------------------------------------------------------


def test_shakespeare_local_copy_is_used_as_is(tmp_path):
    local = write(tmp_path / "input.txt", TEXT)
    prepared = prepare(config(tmp_path, source="shakespeare", path=str(local)))
    assert prepared.directory.name == "shakespeare-char"
    assert prepared.meta["source_matches_canonical"] is False
    assert prepared.tokenizer.decode(prepared.train) == TEXT[: int(len(TEXT) * 0.9)]
    assert not (tmp_path / "data" / "shakespeare" / "input.txt").exists()  # nothing downloaded


def test_corrupt_cached_shakespeare_is_rejected(tmp_path):
    write(tmp_path / "data" / "shakespeare" / "input.txt", TEXT)
    with pytest.raises(UserError, match="sha256"):
        prepare(config(tmp_path, source="shakespeare"))


def test_shakespeare_download_is_verified_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(TEXT.encode())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    cfg = config(tmp_path, source="shakespeare")
    with pytest.raises(UserError, match="sha256"):  # the real digest: this text does not match
        prepare(cfg)
    assert not list((tmp_path / "data").rglob("*input.txt*"))  # a bad download is never kept

    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(TEXT.encode()).hexdigest())
    first = prepare(cfg)
    assert calls == [data.SHAKESPEARE_URL] * 2
    assert (tmp_path / "data" / "shakespeare" / "input.txt").read_text() == TEXT
    assert prepare(cfg).reused and len(calls) == 2  # the cached copy is used, no download
    assert first.meta["source_matches_canonical"] is True


def test_failed_download_suggests_a_local_copy(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="--data.path"):
        prepare(config(tmp_path, source="shakespeare"))


# --- Batches -----------------------------------------------------------------------------------


def test_get_batch_is_a_function_of_seed_stream_and_step():
    tokens = np.arange(5000, dtype=np.uint16)  # token value = position: windows are checkable
    x, y = get_batch(tokens, seed=3, step=7, batch_size=8, block_size=16)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int32
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert np.array_equal(row_x, tokens[start:start + 16])
        assert np.array_equal(row_y, tokens[start + 1:start + 17])  # targets: the next token

    x2, y2 = get_batch(tokens, seed=3, step=7, batch_size=8, block_size=16)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, get_batch(tokens, seed=3, step=8, batch_size=8, block_size=16)[0])
    assert not np.array_equal(x, get_batch(tokens, seed=4, step=7, batch_size=8, block_size=16)[0])
    assert not np.array_equal(
        x, get_batch(tokens, seed=3, step=7, batch_size=8, block_size=16, stream=1)[0])


def test_get_batch_covers_every_start_and_stays_in_bounds():
    tokens = np.arange(10, dtype=np.uint16)  # block_size 8: starts 0 and 1 only
    starts = set()
    for step in range(50):
        x, y = get_batch(tokens, seed=0, step=step, batch_size=4, block_size=8)
        starts.update(int(s) for s in x[:, 0])
        assert y.max() <= 9
    assert starts == {0, 1}


def test_get_batch_reads_a_prepared_memmap(tmp_path):
    source = write(tmp_path / "play.txt", TEXT)
    prepared = prepare(config(tmp_path, source="text", path=str(source)))
    x, y = get_batch(prepared.val, seed=0, step=0, batch_size=2, block_size=32)
    text = prepared.tokenizer.decode(x[0]) + prepared.tokenizer.decode(y[0])[-1]
    assert text in TEXT[int(len(TEXT) * 0.9):]
    assert type(x) is np.ndarray


def test_get_batch_too_few_tokens_is_an_error():
    with pytest.raises(UserError, match="has 9 tokens, fewer than block_size \\+ 2 = 10"):
        get_batch(np.arange(9), seed=0, step=0, batch_size=1, block_size=8)
