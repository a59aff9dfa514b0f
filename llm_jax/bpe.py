"""Byte-level BPE trained on your own corpus: watch it merge, save it, encode with it.

    python -m llm_jax.bpe train --input FILE_OR_DIR --vocab-size 4096 --out tok.json [--verbose]
    python -m llm_jax.bpe show --tokenizer tok.json "some text"       # how a text splits

(The command line is llm_jax/bpe_cli.py.)

Training (GPT-2's recipe):
- The text is cut at the special tokens (never split, never learned from), then into chunks by
  GPT-2's regular expression (words with their leading space, numbers, punctuation runs,
  whitespace); merges never cross a chunk boundary. Each chunk starts as its UTF-8 bytes, ids
  0..255, so any text encodes and nothing is ever unknown.
- Each step merges the most frequent adjacent pair of ids into a new id: 256, 257, ... Ties go
  to the smallest pair (a, b), compared as ids (first a, then b): training is deterministic.
  A pair whose bytes are already a token is skipped, so that every token has distinct bytes.
- Vocabulary: 256 bytes + merges + special tokens (ids after the merges). Training stops early
  when no pair is left (a tiny corpus), giving a smaller vocabulary.
- Incremental: each distinct chunk is stored once with its frequency; an index pair -> chunks
  holding it means a merge rewrites only those chunks and updates only their pairs' counts; a
  heap gives the most frequent pair. Entries whose count has since fallen are re-pushed when
  popped (lazy deletion), so a count only goes onto the heap when it grows.
  `train_bpe_naive` recounts every pair after every merge: the reference and the benchmark.

Encoding: a token's id is its rank, as in tiktoken, so the learned bytes -> id table builds a
`tiktoken.Encoding` (what data preparation uses, at tiktoken's speed). `encode_py` is the same
algorithm in Python: in each chunk, repeatedly merge the leftmost adjacent pair whose joined
bytes have the lowest rank; a chunk that is a token as a whole is that token. They give the same
ids (tests/test_bpe.py), and `encode_py` reproduces tiktoken's GPT-2 ids from GPT-2's ranks.
Text with lone surrogates (not Unicode text, not UTF-8-encodable) is refused with a UserError;
ids whose bytes are not valid UTF-8 decode with U+FFFD (`decode_bytes` gives the exact bytes).

File format (JSON, UTF-8; never pickle), the same dict that meta.json and checkpoints store:
    {"kind": "bpe", "format_version": 1, "pattern": <the chunking regex>,
     "merges": [[a, b], ...],            # merge i makes token 256 + i from tokens a and b
     "special_tokens": {"<|endoftext|>": 4095}}   # ids 256 + len(merges), 257 + ..., in order
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import regex
import tiktoken

from llm_jax.errors import UserError
from llm_jax.tokenizers import EOT, GPT2_PATTERN, check_ids

FORMAT_VERSION = 1
Pair = tuple[int, int]


def show_token(piece: bytes) -> str:
    """A token for people: its text if it is valid UTF-8 ('er', ' the'), else its bytes."""
    try:
        return repr(piece.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(piece)


def check_unicode(text: str) -> None:
    """Refuse lone surrogates (e.g. '\\ud800'), which have no UTF-8 encoding."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"text has a lone surrogate U+{ord(text[e.start]):04X} at character "
                        f"{e.start}: it is not valid Unicode text and cannot be encoded") from None


def check_specials(specials: list[str]) -> None:
    """Distinct, non-empty, and none the start of another (where a match would be ambiguous)."""
    if len(set(specials)) != len(specials) or "" in specials:
        raise UserError(f"special tokens must be distinct and non-empty, got {specials!r}")
    for s in specials:
        for t in specials:
            if s != t and t.startswith(s):
                raise UserError(f"special token {s!r} is the start of another, {t!r}")


def special_splitter(specials: Iterable[str]) -> regex.Pattern | None:
    """A regex cutting text at the special tokens, keeping them: re.split gives text, special,
    text, ... Longest first, so that no special is cut short by another."""
    specials = sorted(specials, key=len, reverse=True)
    return regex.compile("(" + "|".join(map(regex.escape, specials)) + ")") if specials else None


# --- Training ----------------------------------------------------------------------------------


def count_chunks(text: str, pattern: str, specials: list[str]) -> Counter[str]:
    """Each distinct chunk of the text (special tokens left out) with how often it occurs."""
    check_unicode(text)
    chunker, splitter = regex.compile(pattern), special_splitter(specials)
    segments = splitter.split(text)[::2] if splitter else [text]  # odd items: the specials
    counts: Counter[str] = Counter()
    for segment in segments:
        counts.update(chunker.findall(segment))
    return counts


def merge_pair(word: list[int], a: int, b: int, new: int) -> list[int]:
    """`word` with every occurrence of the pair (a, b), left to right, replaced by `new`."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class _Vocab:
    """What both trainers share: the token bytes so far, the merges, the log line."""

    def __init__(self, vocab_size: int, specials: list[str], log: Callable[[str], None] | None):
        check_specials(specials)
        if vocab_size < 256 + len(specials):
            raise UserError(f"vocab size {vocab_size} is too small: it must be at least 256 "
                            f"(the bytes) + {len(specials)} special token(s) = "
                            f"{256 + len(specials)}")
        self.wanted = vocab_size - 256 - len(specials)
        self.tokens = [bytes([i]) for i in range(256)]
        self.known = set(self.tokens)
        self.merges: list[Pair] = []
        self.log = log

    def allows(self, pair: Pair) -> bool:
        return self.tokens[pair[0]] + self.tokens[pair[1]] not in self.known

    def add(self, pair: Pair, count: int) -> int:
        a, b = pair
        new = len(self.tokens)
        self.tokens.append(self.tokens[a] + self.tokens[b])
        self.known.add(self.tokens[new])
        self.merges.append(pair)
        if self.log:
            self.log(f"merge {len(self.merges)}: {show_token(self.tokens[a])} + "
                     f"{show_token(self.tokens[b])} -> {show_token(self.tokens[new])} "
                     f"(count {count}, id {new})")
        return new


def _start(text: str, vocab_size: int, specials: list[str], pattern: str, log):
    """What both trainers start from: the vocabulary, each distinct chunk as a list of byte ids,
    and how often each chunk occurs."""
    chunks = count_chunks(text, pattern, specials)
    return (_Vocab(vocab_size, specials, log), [list(c.encode("utf-8")) for c in chunks],
            list(chunks.values()))


def train_bpe(text: str, vocab_size: int, specials: Iterable[str] = (EOT,),
              pattern: str = GPT2_PATTERN, log: Callable[[str], None] | None = None,
              ) -> BPETokenizer:
    """Learn `vocab_size` tokens (bytes + merges + specials) from text, incrementally."""
    specials = list(specials)
    vocab, words, freqs = _start(text, vocab_size, specials, pattern, log)
    counts: dict[Pair, int] = defaultdict(int)  # pair -> occurrences in the text
    where: dict[Pair, set[int]] = defaultdict(set)  # pair -> indices of the words holding it
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            counts[pair] += freqs[w]
            where[pair].add(w)
    heap = [(-count, a, b) for (a, b), count in counts.items()]  # smallest: most frequent, then
    heapq.heapify(heap)  # smallest a, then smallest b; lazily deleted

    while len(vocab.merges) < vocab.wanted and heap:
        negative, a, b = heapq.heappop(heap)
        pair, count = (a, b), counts.get((a, b), 0)
        if count != -negative:  # fallen since pushed: put it back at its true count
            if count:
                heapq.heappush(heap, (-count, a, b))
            continue
        if not vocab.allows(pair):  # skipped for now; it returns if its count grows again
            continue
        new = vocab.add(pair, count)
        before: dict[Pair, int] = {}  # the count of every pair touched, before this merge
        for w in where.pop(pair):
            old, f = words[w], freqs[w]
            words[w] = word = merge_pair(old, a, b, new)
            old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(word, word[1:]))
            for p in old_pairs:
                before.setdefault(p, counts[p])
                counts[p] -= f
            for p in new_pairs:
                before.setdefault(p, counts.get(p, 0))
                counts[p] += f
            for p in set(new_pairs).difference(old_pairs):
                where[p].add(w)
            for p in set(old_pairs).difference(new_pairs):
                if p != pair:
                    where[p].discard(w)
        for p, was in before.items():
            now = counts[p]
            if now == 0:
                del counts[p]
                where.pop(p, None)
            elif now > was:
                heapq.heappush(heap, (-now, *p))
    return BPETokenizer(vocab.merges, specials, pattern)


def train_bpe_naive(text: str, vocab_size: int, specials: Iterable[str] = (EOT,),
                    pattern: str = GPT2_PATTERN, log: Callable[[str], None] | None = None,
                    ) -> BPETokenizer:
    """The same merges as `train_bpe`, recounting every pair of every chunk after each merge."""
    specials = list(specials)
    vocab, words, freqs = _start(text, vocab_size, specials, pattern, log)
    while len(vocab.merges) < vocab.wanted:
        counts: dict[Pair, int] = defaultdict(int)
        for word, f in zip(words, freqs):
            for pair in zip(word, word[1:]):
                counts[pair] += f
        candidates = [(-count, pair) for pair, count in counts.items() if vocab.allows(pair)]
        if not candidates:
            break
        negative, pair = min(candidates)
        new = vocab.add(pair, -negative)
        words = [merge_pair(word, *pair, new) for word in words]
    return BPETokenizer(vocab.merges, specials, pattern)


# --- The tokenizer -----------------------------------------------------------------------------


def bpe_chunk(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's byte-pair merge of one chunk: join the leftmost lowest-ranked pair, repeat."""
    rank = ranks.get(piece)
    if rank is not None:
        return [rank]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while True:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            return [ranks[p] for p in parts]
        parts[at:at + 2] = [parts[at] + parts[at + 1]]


def encode_with_ranks(text: str, ranks: dict[bytes, int], pattern: str,
                      special_tokens: dict[str, int], cache: dict | None = None) -> list[int]:
    """Pure-Python encoding with any rank table (ours, or GPT-2's): the ids tiktoken gives."""
    check_unicode(text)
    chunker, splitter = regex.compile(pattern), special_splitter(special_tokens)
    cache = {} if cache is None else cache
    ids: list[int] = []
    for k, segment in enumerate(splitter.split(text) if splitter else [text]):
        if k % 2:
            ids.append(special_tokens[segment])
            continue
        for chunk in chunker.findall(segment):
            out = cache.get(chunk)
            if out is None:
                out = cache[chunk] = bpe_chunk(chunk.encode("utf-8"), ranks)
            ids.extend(out)
    return ids


class BPETokenizer:
    """A trained byte-level BPE: the merges, the chunking pattern, the special tokens."""

    kind = "bpe"

    def __init__(self, merges: Iterable[Pair], specials: Iterable[str] = (EOT,),
                 pattern: str = GPT2_PATTERN):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.tokens = [bytes([i]) for i in range(256)]
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise UserError(f"merge {i} ({a}, {b}) uses a token that does not exist yet")
            self.tokens.append(self.tokens[a] + self.tokens[b])
        self.ranks = {piece: i for i, piece in enumerate(self.tokens)}
        if len(self.ranks) != len(self.tokens):
            raise UserError("two merges make the same bytes: the merges are corrupt")
        specials = list(specials)
        check_specials(specials)
        self.special_tokens = {s: len(self.tokens) + k for k, s in enumerate(specials)}
        self.vocab_size = len(self.tokens) + len(specials)
        self.pieces = self.tokens + [s.encode("utf-8") for s in specials]  # id -> bytes
        self.eot_id = self.special_tokens.get(EOT)
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise UserError(f"the chunking pattern is not a valid regex: {e}") from None
        self.pattern = pattern
        self._encoding: tiktoken.Encoding | None = None
        self._cache: dict[str, list[int]] = {}

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding of these ranks (built on first use, a few milliseconds)."""
        if self._encoding is None:
            self._encoding = tiktoken.Encoding(
                name=f"llm_jax-bpe-{self.vocab_size}", pat_str=self.pattern,
                mergeable_ranks=self.ranks, special_tokens=self.special_tokens)
        return self._encoding

    def encode(self, text: str) -> list[int]:
        """Text -> ids, by tiktoken; special tokens written in the text are special."""
        check_unicode(text)  # tiktoken would silently replace lone surrogates
        return self.encoding.encode(text, allowed_special="all")

    def encode_py(self, text: str) -> list[int]:
        """The same ids as `encode`, computed by this module's own Python code."""
        if len(self._cache) > 200_000:
            self._cache.clear()
        return encode_with_ranks(text, self.ranks, self.pattern, self.special_tokens,
                                 self._cache)

    def decode_bytes(self, ids) -> bytes:
        pieces = self.pieces
        return b"".join(pieces[i] for i in check_ids(ids, self.vocab_size))

    def decode(self, ids) -> str:
        # Ids may end inside a multi-byte character (a sampled sequence): shown as U+FFFD.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": "bpe", "format_version": FORMAT_VERSION, "pattern": self.pattern,
                "merges": [[a, b] for a, b in self.merges],
                "special_tokens": dict(self.special_tokens)}

    @classmethod
    def from_json(cls, d: dict, origin: str = "saved bpe tokenizer") -> BPETokenizer:
        if not isinstance(d, dict) or d.get("kind") != "bpe":
            raise UserError(f"{origin} is not a bpe tokenizer (no \"kind\": \"bpe\")")
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{origin} has format_version {d.get('format_version')!r}, "
                            f"expected {FORMAT_VERSION}")
        merges, specials, pattern = d.get("merges"), d.get("special_tokens"), d.get("pattern")
        if not (isinstance(merges, list) and all(
                isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m)
                for m in merges)):
            raise UserError(f"{origin}: \"merges\" must be a list of [id, id] pairs")
        if not isinstance(specials, dict) or not isinstance(pattern, str):
            raise UserError(f"{origin} needs \"pattern\" (a string) and \"special_tokens\"")
        expected = list(range(256 + len(merges), 256 + len(merges) + len(specials)))
        if list(specials.values()) != expected:
            raise UserError(f"{origin}: special token ids {list(specials.values())} should be "
                            f"{expected}, right after the merges")
        try:
            return cls(merges, list(specials), pattern)
        except UserError as e:
            raise UserError(f"{origin}: {e}") from None

    def dumps(self) -> str:
        """The file format as text: `to_json()`, one merge per line so that it reads in order."""
        head = {k: v for k, v in self.to_json().items() if k != "merges"}
        merges = ",\n".join(f"  [{a}, {b}]" for a, b in self.merges)
        return (json.dumps(head, indent=1, ensure_ascii=False)[:-2]
                + f',\n "merges": [\n{merges}\n ]\n}}\n')

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.dumps(), encoding="utf-8")


def load(path) -> BPETokenizer:
    """A tokenizer file written by `save` (or `python -m llm_jax.bpe train`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file {str(path)!r} does not exist")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"tokenizer file {str(path)!r} is not valid JSON: {e}") from None
    return BPETokenizer.from_json(d, origin=f"tokenizer file {str(path)!r}")


# --- Command line ------------------------------------------------------------------------------


if __name__ == "__main__":  # python -m llm_jax.bpe train | show (llm_jax/bpe_cli.py)
    from llm_jax.bpe_cli import main
    from llm_jax.cli import run_main

    run_main(main)
