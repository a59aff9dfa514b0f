"""Tokenizers: GPT-2's byte-pair encoding, offline, and a character vocabulary.

Both, and the byte-level BPE trained on your own corpus (llm_jax/bpe.py), satisfy one small
`Tokenizer` interface (encode, decode, to_json) so that data preparation, training and sampling
never ask which kind they hold; `to_json` is stored in the prepared data's meta.json and in
checkpoints, and `tokenizer_from_json` rebuilds the same tokenizer from it.

Design choices:
- GPT-2's vocabulary ships with the package (assets/gpt2: OpenAI's encoder.json and vocab.bpe,
  see the LICENSE there) and is checked against hard-coded sha256 digests on load, so a corrupt
  or edited copy fails loudly instead of tokenizing differently. We build a `tiktoken.Encoding`
  from it ourselves: `tiktoken.get_encoding` would download the same table at run time.
- In encoder.json every token is a string in GPT-2's printable alphabet (each byte stands for
  one visible character, so that the file is readable JSON); we map it back to the token's
  bytes. A token's id is its merge rank, which is what tiktoken expects.
- The char tokenizer is nanoGPT's shakespeare_char: the sorted set of characters in the corpus,
  id = position. It has no end-of-text token. Text with characters outside the vocabulary is a
  user mistake (typically a prompt), reported with the offending characters, never dropped.
- Special tokens for a chat template (llm_jax/sft.py) are appended to any of the three by
  `AddedTokens`, after the existing ids, which therefore keep their meaning; `to_json` records
  them as "added_tokens" beside the base tokenizer's own fields.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import tiktoken

from llm_jax.errors import UserError

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "gpt2"
# Digests of OpenAI's files (the same ones tiktoken checks when it downloads them).
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, whitespace. A space sticks
# to the word after it, and a whitespace run leaves its last space to the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257


class Tokenizer(Protocol):
    kind: str  # "gpt2", "char" or "bpe"
    vocab_size: int  # number of ids; every id is in [0, vocab_size)
    eot_id: int | None  # the end-of-text token separating documents, None when there is none

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...  # ids: any sequence or array of ints

    def to_json(self) -> dict: ...  # enough for tokenizer_from_json to rebuild it


def check_ids(ids, vocab_size: int) -> list[int]:
    """Any sequence or (numpy, JAX) array of ints -> a flat list, each in [0, vocab_size)."""
    flat = np.asarray(ids).reshape(-1)
    if flat.size == 0:
        return []
    if not np.issubdtype(flat.dtype, np.integer):
        raise UserError(f"token ids must be integers, got dtype {flat.dtype}")
    bad = flat[(flat < 0) | (flat >= vocab_size)]
    if bad.size:
        raise UserError(f"token id {int(bad[0])} is outside the vocabulary of {vocab_size} tokens")
    return flat.tolist()


# --- GPT-2 byte-pair encoding ------------------------------------------------------------------


def gpt2_byte_alphabet() -> list[str]:
    """The character GPT-2 writes for each byte value 0..255 in encoder.json and vocab.bpe.

    Bytes that are printable Latin-1 stand for themselves; the others (control characters, space,
    a few more) are moved, in byte order, to the code points 256, 257, ... so that no token string
    contains whitespace or control characters: a space (byte 32, the 33rd moved) is "Ġ", chr(288).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    alphabet = [""] * 256
    moved = 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + moved)
            moved += 1
    return alphabet


def read_verified(path: Path) -> bytes:
    """The bytes of one vocabulary asset, after checking its sha256 against GPT2_SHA256."""
    if not path.is_file():
        raise UserError(f"GPT-2 vocabulary file {str(path)!r} is missing: reinstall llm_jax")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_SHA256[path.name]:
        raise UserError(f"GPT-2 vocabulary file {str(path)!r} is corrupt: sha256 {digest}, "
                        f"expected {GPT2_SHA256[path.name]}; reinstall llm_jax")
    return data


def read_gpt2_ranks(asset_dir: Path) -> dict[bytes, int]:
    """Token bytes -> id (= merge rank) for GPT-2's 50256 ordinary tokens, from encoder.json."""
    read_verified(asset_dir / "vocab.bpe")  # not needed to encode, but shipped: keep it honest
    encoder = json.loads(read_verified(asset_dir / "encoder.json").decode("utf-8"))
    byte_of = {ch: b for b, ch in enumerate(gpt2_byte_alphabet())}
    return {bytes(byte_of[ch] for ch in token): rank
            for token, rank in encoder.items() if token != EOT}


def build_gpt2_encoding(asset_dir: Path) -> tiktoken.Encoding:
    """A tiktoken Encoding equal to tiktoken's "gpt2" (r50k_base), built from local files."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=read_gpt2_ranks(asset_dir),
        special_tokens={EOT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class GPT2Tokenizer:
    """GPT-2's BPE over UTF-8 bytes: any text encodes, and decode(encode(text)) == text."""

    kind = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_id = GPT2_EOT_ID

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding

    def encode(self, text: str) -> list[int]:
        # "<|endoftext|>" written in the text is the document separator, as in GPT-2's training.
        return self.encoding.encode(text, allowed_special={EOT})

    def decode(self, ids) -> str:
        # A sampled sequence may end inside a multi-byte character: decode shows it as U+FFFD.
        return self.encoding.decode(check_ids(ids, self.vocab_size))

    def to_json(self) -> dict:
        return {"kind": "gpt2"}


@functools.cache
def gpt2_tokenizer() -> GPT2Tokenizer:
    """The GPT-2 tokenizer, built once per process (reading the vocabulary takes ~0.3 s)."""
    return GPT2Tokenizer(build_gpt2_encoding(ASSET_DIR))


# --- Characters --------------------------------------------------------------------------------


def describe_chars(chars, limit: int = 5) -> str:
    """Characters named for a message, e.g. 'é' (U+00E9), then how many more past `limit`."""
    chars = list(chars)
    shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


class CharTokenizer:
    """One id per character of a fixed vocabulary: the sorted distinct characters given."""

    kind = "char"
    eot_id = None

    def __init__(self, chars: str):
        if not chars:
            raise UserError("a char tokenizer needs at least one character in its vocabulary")
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    def encode(self, text: str) -> list[int]:
        index = self.index
        if not set(text) <= index.keys():
            # Rare path: name the culprits in the order they appear in the text.
            ordered = list(dict.fromkeys(c for c in text if c not in index))
            raise UserError(
                f"text has {len(ordered)} character(s) outside the char vocabulary of "
                f"{self.vocab_size} (built from the training text): {describe_chars(ordered)}")
        return [index[c] for c in text]

    def decode(self, ids) -> str:
        chars = self.chars
        return "".join(chars[i] for i in check_ids(ids, self.vocab_size))

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}


# --- Added special tokens ----------------------------------------------------------------------


class AddedTokens:
    """A tokenizer with special tokens appended after its vocabulary.

    The added tokens get ids base.vocab_size, base.vocab_size + 1, ...: every existing id keeps
    its meaning, so a model trained with the base tokenizer keeps its embedding rows (GPT-2:
    50257, 50258, ..., inside the 50304 padded rows). Written in text, an added token is one
    special id, as GPT-2's "<|endoftext|>" is; `kind` and `eot_id` are the base's.
    """

    def __init__(self, base: Tokenizer, tokens: list[str]):
        tokens = list(tokens)
        if not tokens or len(set(tokens)) != len(tokens) or not all(tokens) or EOT in tokens:
            raise UserError(f"added tokens must be distinct, non-empty and not {EOT}: {tokens}")
        self.base, self.added = base, tokens
        self.kind, self.eot_id = base.kind, base.eot_id
        self.ids = {t: base.vocab_size + i for i, t in enumerate(tokens)}
        self.vocab_size = base.vocab_size + len(tokens)
        longest_first = sorted(tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, piece in enumerate(self._split.split(text)):  # odd pieces are added tokens
            if i % 2:
                ids.append(self.ids[piece])
            elif piece:
                ids.extend(self.base.encode(piece))
        return ids

    def decode(self, ids) -> str:
        out, run, n = [], [], self.base.vocab_size
        for i in check_ids(ids, self.vocab_size):
            if i < n:
                run.append(i)
            else:
                out += [self.base.decode(run), self.added[i - n]]
                run = []
        return "".join(out) + self.base.decode(run)

    def to_json(self) -> dict:
        return {**self.base.to_json(), "added_tokens": list(self.added)}


def with_added_tokens(tokenizer: Tokenizer, tokens: list[str]) -> AddedTokens:
    """`tokenizer` with `tokens` appended, or `tokenizer` itself when it has exactly those."""
    if isinstance(tokenizer, AddedTokens):
        if tokenizer.added == list(tokens):
            return tokenizer
        raise UserError(f"the tokenizer already has other added tokens: {tokenizer.added}")
    return AddedTokens(tokenizer, tokens)


def base_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer without its added tokens."""
    return tokenizer.base if isinstance(tokenizer, AddedTokens) else tokenizer


# --- Choosing one ------------------------------------------------------------------------------


def build_tokenizer(kind: str, text: str) -> Tokenizer:
    """The tokenizer of `kind` for a corpus: gpt2 ignores the text, char takes its vocabulary."""
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "char":
        return CharTokenizer.from_text(text)
    raise UserError(f"unknown tokenizer {kind!r}: use char or gpt2 (a bpe tokenizer is trained "
                    "or loaded by llm_jax.bpe)")


def tokenizer_from_json(d: dict) -> Tokenizer:
    """Rebuild a tokenizer saved with its `to_json()`."""
    if isinstance(d, dict) and "added_tokens" in d:
        added = d["added_tokens"]
        if not (isinstance(added, list) and all(isinstance(t, str) for t in added)):
            raise UserError("saved tokenizer's 'added_tokens' must be a list of strings")
        return AddedTokens(tokenizer_from_json({k: v for k, v in d.items()
                                                if k != "added_tokens"}), added)
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "char":
        if not isinstance(d.get("chars"), str):
            raise UserError("saved char tokenizer has no 'chars' vocabulary string")
        return CharTokenizer(d["chars"])
    if kind == "bpe":
        from llm_jax.bpe import BPETokenizer  # bpe imports this module

        return BPETokenizer.from_json(d)
    raise UserError(f"unknown saved tokenizer kind {kind!r}: expected char, gpt2 or bpe")
