"""Text corpora, tokenized once into flat token files, and random training windows from them.

The nanoGPT workflow: read a corpus, tokenize it, write `train.bin` and `val.bin` (token ids
back to back, no padding) next to a `meta.json`, then train on random windows of block_size + 1
tokens read through a memory map.

Design choices:
- Three sources, chosen by `DataConfig.source`. "builtin" is the English text of Python's
  reference documentation, which every CPython ships (`pydoc_data.topics`), so the library trains
  out of the box with no download. "text" is the user's own file or folder. "shakespeare" is
  Tiny Shakespeare, from a local copy or downloaded once into the data folder and checked by
  sha256: the only network access in the library.
- Documents are joined by the tokenizer's separator: the "<|endoftext|>" token (GPT-2's, or a
  special token of a trained BPE), or a blank line for the char tokenizer, which has none.
- The TEXT is split, not the tokens: the first (1 - val_fraction) of the characters train, the
  rest validate (nanoGPT's shakespeare_char recipe). The char vocabulary comes from the whole text
  so that validation never meets an unknown character. A BPE tokenizer (llm_jax/bpe.py) is read
  from data.bpe_path, or trained on the training split alone (data.bpe_vocab_size tokens); either
  way it is saved beside the tokens as tokenizer.json, and in meta.json like every tokenizer.
- Prepared once: a prepared folder is reused while its meta.json records the same source text
  (sha256), tokenizer (for BPE: the file's sha256, or the vocabulary size to train) and split.
  Files are written under temporary names and renamed, meta.json last, so an interrupted
  preparation is redone rather than trusted.
- Batches are a pure function of (seed, stream, step): a resumed run draws exactly the batches it
  would have drawn, and evaluation streams never disturb the training stream.

The whole corpus is held in memory while it is tokenized: fine for the tens of megabytes this
workflow is for, not for web-scale datasets.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llm_jax import bpe
from llm_jax.errors import UserError
from llm_jax.tokenizers import EOT, Tokenizer, build_tokenizer, tokenizer_from_json

if TYPE_CHECKING:  # importing config would import the model, and with it JAX
    from llm_jax.config import DataConfig

FORMAT_VERSION = 1  # of the prepared folder; bump when its files change meaning
TEXT_SUFFIXES = (".txt", ".md")
SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


# --- Sources -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    text: str  # every document, joined by the tokenizer's separator
    name: str  # names the prepared folder: builtin, shakespeare, text-<hash of the path>
    description: str  # for people: what was read, from where
    extra: dict  # source-specific facts recorded in meta.json


def document_separator(tokenizer_kind: str) -> str:
    """What goes between two documents: the end-of-text token of BPE, a blank line for char."""
    return "\n\n" if tokenizer_kind == "char" else EOT


def join_documents(documents: list[str], tokenizer_kind: str, description: str) -> str:
    text = document_separator(tokenizer_kind).join(d for d in documents if d)
    if not text:
        raise UserError(f"the corpus is empty: {description} has no text")
    return text


def read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_builtin(tokenizer_kind: str) -> Corpus:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some Linux distributions strip it out of their Python
        raise UserError("this Python has no pydoc_data.topics: use --data.source=text "
                        "or --data.source=shakespeare") from None
    description = (f"Python {sys.version.split()[0]} reference documentation "
                   f"(pydoc_data.topics, {len(topics)} topics)")
    text = join_documents([topics[k] for k in sorted(topics)], tokenizer_kind, description)
    return Corpus(text, "builtin", description, {})


def read_text_files(path: str, tokenizer_kind: str) -> Corpus:
    if not path:
        raise UserError("data.source=text needs data.path: a text file or a folder of .txt/.md")
    root = Path(path).expanduser().resolve()
    if root.is_file():
        files, description = [root], f"text file {str(root)!r}"
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*")
                       if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"folder {str(root)!r} has no .txt or .md files")
        description = f"{len(files)} text file(s) under {str(root)!r}"
    else:
        raise UserError(f"data.path {path!r} does not exist")
    text = join_documents([read_utf8(f) for f in files], tokenizer_kind, description)
    # The folder is named after the path, so that two corpora never share prepared files.
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return Corpus(text, f"text-{tag}", description, {"path": str(root)})


def write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: readers see all of the file or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def download_shakespeare(dest: Path) -> None:
    print(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL} to {dest}")
    hint = "download input.txt yourself and pass --data.path=input.txt"
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        raise UserError(f"could not download {SHAKESPEARE_URL} ({e}); {hint}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise UserError(f"the download from {SHAKESPEARE_URL} has sha256 {digest}, expected "
                        f"{SHAKESPEARE_SHA256}; {hint}")
    write_atomic(dest, data)


def read_shakespeare(path: str, data_dir: str) -> Corpus:
    if path:
        # The user's own copy is used as is (it may be edited on purpose); meta says if it differs.
        local = Path(path).expanduser().resolve()
        if not local.is_file():
            raise UserError(f"data.path {path!r} does not exist")
        text = read_utf8(local)
        canonical = hashlib.sha256(text.encode()).hexdigest() == SHAKESPEARE_SHA256
        note = "" if canonical else ", which differs from the canonical file"
        return Corpus(text, "shakespeare", f"Tiny Shakespeare, local copy {str(local)!r}{note}",
                      {"path": str(local), "matches_canonical": canonical})
    cached = Path(data_dir) / "shakespeare" / "input.txt"
    if not cached.is_file():
        download_shakespeare(cached)
    data = cached.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise UserError(f"cached {str(cached)!r} has sha256 {digest}, expected "
                        f"{SHAKESPEARE_SHA256}: delete it to download it again")
    return Corpus(data.decode("utf-8"), "shakespeare", f"Tiny Shakespeare, {SHAKESPEARE_URL}",
                  {"path": str(cached.resolve()), "matches_canonical": True})


def read_corpus(data_cfg: DataConfig) -> Corpus:
    """The text of the configured source, documents joined for the configured tokenizer."""
    if data_cfg.source == "builtin":
        return read_builtin(data_cfg.tokenizer)
    if data_cfg.source == "text":
        return read_text_files(data_cfg.path, data_cfg.tokenizer)
    if data_cfg.source == "shakespeare":
        return read_shakespeare(data_cfg.path, data_cfg.data_dir)
    if data_cfg.source in ("sft", "jsonl"):  # conversations, not a corpus: llm_jax/sft.py
        raise UserError(f"data.source={data_cfg.source} is fine-tuning data (llm_jax.sft.prepare), "
                        "not a text corpus")
    raise UserError(f"unknown data.source {data_cfg.source!r}: use builtin, text or shakespeare")


# --- Preparation -------------------------------------------------------------------------------


@dataclass
class Prepared:
    tokenizer: Tokenizer
    meta: dict  # the contents of meta.json
    train: np.ndarray  # token ids, a read-only np.memmap of train.bin
    val: np.ndarray  # token ids, a read-only np.memmap of val.bin
    directory: Path
    reused: bool = False  # True when prepare() found the folder already up to date


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def split_point(text: str, val_fraction: float, separator: str) -> int:
    """Index of the first validation character: the first (1 - val_fraction) of the text trains."""
    cut = int(len(text) * (1 - val_fraction))
    # Never cut through a separator: half of "<|endoftext|>" would become ordinary text.
    width = len(separator)
    start = text.find(separator, max(0, cut - width + 1), cut + width - 1)
    return start if start != -1 else cut


def tokenizer_settings(data_cfg: DataConfig) -> tuple[str, dict]:
    """(tag, settings) of the configured tokenizer: the tag ends the prepared folder's name, the
    settings are recorded in meta.json and must match for the prepared tokens to be reused."""
    kind = data_cfg.tokenizer
    if kind != "bpe":
        return kind, {}
    if data_cfg.bpe_path:
        path = Path(data_cfg.bpe_path).expanduser()
        if not path.is_file():
            raise UserError(f"data.bpe_path {data_cfg.bpe_path!r} does not exist")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return f"bpe-{digest[:8]}", {"bpe_file_sha256": digest}
    if data_cfg.bpe_vocab_size <= 0:
        raise UserError("data.tokenizer=bpe needs data.bpe_path (a tokenizer file) or "
                        "data.bpe_vocab_size (to train one on the corpus)")
    return f"bpe{data_cfg.bpe_vocab_size}", {"bpe_vocab_size": data_cfg.bpe_vocab_size}


def build_bpe(data_cfg: DataConfig, train_text: str) -> bpe.BPETokenizer:
    """The tokenizer file of data.bpe_path, or one trained on the training text."""
    if data_cfg.bpe_path:
        return bpe.load(data_cfg.bpe_path)
    print(f"training a BPE tokenizer of {data_cfg.bpe_vocab_size:,} tokens on the train split "
          f"({len(train_text):,} characters)")
    tokenizer = bpe.train_bpe(train_text, data_cfg.bpe_vocab_size, specials=[EOT])
    if tokenizer.vocab_size < data_cfg.bpe_vocab_size:
        print(f"note: the text ran out of pairs to merge: {tokenizer.vocab_size:,} tokens")
    return tokenizer


def prepare(data_cfg: DataConfig) -> Prepared:
    """Tokenize the configured corpus into <data_dir>/<source>-<tokenizer>, or reuse it."""
    corpus = read_corpus(data_cfg)
    kind = data_cfg.tokenizer
    tag, settings = tokenizer_settings(data_cfg)
    directory = Path(data_cfg.data_dir) / f"{corpus.name}-{tag}"
    source_sha256 = hashlib.sha256(corpus.text.encode()).hexdigest()

    try:
        found = load_prepared(directory)
    except UserError:
        found = None
    if found is not None and (found.meta.get("source_sha256") == source_sha256
                              and found.tokenizer.kind == kind
                              and found.meta.get("tokenizer_settings", {}) == settings
                              and found.meta.get("val_fraction") == data_cfg.val_fraction):
        found.reused = True
        return found

    cut = split_point(corpus.text, data_cfg.val_fraction, document_separator(kind))
    splits = {"train": corpus.text[:cut], "val": corpus.text[cut:]}
    if kind == "bpe":
        tokenizer = build_bpe(data_cfg, splits["train"])
    else:
        tokenizer = build_tokenizer(kind, corpus.text)
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = {name: np.array(tokenizer.encode(text), dtype=dtype) for name, text in splits.items()}
    for name, ids in tokens.items():
        if len(ids) < 2:
            raise UserError(
                f"the {name} split of {corpus.description} has {len(ids)} token(s), fewer than 2: "
                f"use more text or change data.val_fraction ({data_cfg.val_fraction})")

    meta = {
        "format_version": FORMAT_VERSION,
        "source": data_cfg.source,
        "source_description": corpus.description,
        "source_sha256": source_sha256,
        **{f"source_{k}": v for k, v in corpus.extra.items()},
        "tokenizer": tokenizer.to_json(),
        "tokenizer_settings": settings,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "val_fraction": data_cfg.val_fraction,
        "train_chars": len(splits["train"]),
        "val_chars": len(splits["val"]),
        "train_tokens": len(tokens["train"]),
        "val_tokens": len(tokens["val"]),
    }
    # Drop the old meta.json first: until the new one lands, the folder reads as unprepared.
    (directory / "meta.json").unlink(missing_ok=True)
    if kind == "bpe":  # for `python -m llm_jax.bpe show --tokenizer` and reuse elsewhere
        write_atomic(directory / "tokenizer.json", tokenizer.dumps().encode())
    for name, ids in tokens.items():
        write_atomic(directory / f"{name}.bin", ids.tobytes())
    write_atomic(directory / "meta.json", json.dumps(meta, indent=2).encode())
    print(f"prepared {directory}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
          f"tokens, {kind} vocabulary of {tokenizer.vocab_size}")
    return load_prepared(directory)


def load_prepared(directory) -> Prepared:
    """Reopen a folder written by prepare(): its tokenizer, meta and memory-mapped tokens."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not directory.is_dir():
        raise UserError(f"prepared data folder {str(directory)!r} does not exist")
    if not meta_path.is_file():
        raise UserError(f"{str(directory)!r} has no meta.json: it is not prepared data, "
                        "or its preparation was interrupted")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{str(meta_path)!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{str(meta_path)!r} is not prepared data format {FORMAT_VERSION}: "
                        "prepare it again")
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for name in ("train", "val"):
        path = directory / f"{name}.bin"
        expected = meta[f"{name}_tokens"] * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise UserError(f"{str(path)!r} is missing or not the size meta.json records: "
                            "prepare it again")
        arrays[name] = np.memmap(path, dtype=dtype, mode="r")
    return Prepared(tokenizer_from_json(meta["tokenizer"]), meta, arrays["train"], arrays["val"],
                    directory)


# --- Batches -----------------------------------------------------------------------------------


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, block_size: int,
              stream: int = 0, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of the token array: inputs x and targets y (x shifted by one), int32 (B, T).

    The windows depend on (seed, stream, step) alone, never on what was drawn before: resuming at
    step s replays the same batches. Use stream 0 for training and others for evaluation.
    `rows` (an index into the B rows) reads only those windows: each process of a multi-process
    job reads its own share of the global batch.
    """
    n = len(tokens)
    if n <= block_size + 1:
        raise UserError(f"the split has {n} tokens, fewer than block_size + 2 = {block_size + 2}: "
                        "lower model.block_size or use more text")
    rng = np.random.default_rng([seed, stream, step])
    starts_B = rng.integers(0, n - block_size, size=batch_size)  # last start: n - block_size - 1
    if rows is not None:
        starts_B = starts_B[rows]
    window_BT1 = np.asarray(tokens[starts_B[:, None] + np.arange(block_size + 1)], dtype=np.int32)
    x_BT = np.ascontiguousarray(window_BT1[:, :-1])
    y_BT = np.ascontiguousarray(window_BT1[:, 1:])
    return x_BT, y_BT
