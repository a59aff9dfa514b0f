"""Vocabularies with special tokens, and the built-in tasks of the encoder families.

Nothing here is downloaded: every task is generated from a seed or cut from the corpus that
`llm_jax.data.prepare` already reads.

Design choices:
- `SpecialVocab` appends [PAD] [CLS] [SEP] [MASK] after a tokenizer's own ids (char, gpt2 or
  bpe), so every existing id keeps its meaning and a char/gpt2 token file needs no rewrite.
  `encode` takes plain text only: special tokens are placed by id, never parsed from text, so a
  corpus that happens to contain the string "[MASK]" cannot inject one.
- Seq2seq tasks ("dates": "march 3, 1998" -> "1998-03-03", and "reverse": "abc" -> "cba") are
  generated from `random.Random(seed)`, identical on every machine. Splits are cut by the
  underlying item (the date, the string) before any formatting, so a test date never appears in
  training in any of its written forms: held out means held out.
- The classification task "shuffled" asks whether a line of the corpus is real or its words
  shuffled. Both classes are whitespace-normalised the same way, so only word order can tell
  them apart. Train and val lines come from the corpus's train split, test lines from its
  validation split (and never repeat a train line).
"""

from __future__ import annotations

import datetime
import random
import string
from dataclasses import dataclass

import numpy as np

from llm_jax.errors import UserError
from llm_jax.tokenizers import CharTokenizer, Tokenizer, tokenizer_from_json

SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
FAMILIES = ("gpt", "mlm", "classifier", "seq2seq")
TASKS = {"classifier": ("shuffled",), "seq2seq": ("dates", "reverse")}  # first: the default


def default_task(family: str, task: str = "") -> str:
    return task or TASKS.get(family, ("",))[0]


# --- A vocabulary with special tokens ------------------------------------------------------


class SpecialVocab:
    """A tokenizer's ids 0..n_base-1, then [PAD], [CLS], [SEP], [MASK]."""

    kind = "special"

    def __init__(self, base: Tokenizer):
        self.base = base
        self.n_base = base.vocab_size
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = range(self.n_base, self.n_base + 4)
        self.vocab_size = self.n_base + len(SPECIALS)
        self.eot_id = base.eot_id

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def token_text(self, i: int) -> str:
        return SPECIALS[i - self.n_base] if i >= self.n_base else self.base.decode([i])

    def decode(self, ids) -> str:
        """Ordinary ids through the base tokenizer, special ones by name."""
        out, run = [], []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i >= self.n_base:
                out.append(self.base.decode(run) + self.token_text(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self.base.decode(run)

    def to_json(self) -> dict:
        return {"kind": self.kind, "specials": list(SPECIALS), "base": self.base.to_json()}


def vocab_from_json(d: dict) -> SpecialVocab:
    if not isinstance(d, dict) or d.get("kind") != SpecialVocab.kind:
        raise UserError("the checkpoint's tokenizer has no special tokens: is it a GPT run? "
                        "(use sample.py for those)")
    if d.get("specials") != list(SPECIALS):
        raise UserError(f"saved special tokens {d.get('specials')} differ from {list(SPECIALS)}")
    return SpecialVocab(tokenizer_from_json(d["base"]))


def pad_rows(rows: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad rows of ids to one length -> (ids (B, T) int32, mask (B, T) bool)."""
    idx = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for b, r in enumerate(rows):
        if len(r) > length:
            raise UserError(f"a sequence of {len(r)} tokens does not fit in {length}")
        idx[b, : len(r)], mask[b, : len(r)] = r, True
    return idx, mask


# --- Seq2seq: dates and reversal -----------------------------------------------------------

MONTHS = ("january february march april may june july august september october november "
          "december").split()
DATE_FIRST, DATE_LAST = datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def written_date(d: datetime.date, style: int) -> str:
    """One of four written forms: "march 3, 1998", "3 march 1998", "mar 3 1998",
    "march 3rd, 1998"."""
    month = MONTHS[d.month - 1]
    return (f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}",
            f"{month[:3]} {d.day} {d.year}", f"{month} {ordinal(d.day)}, {d.year}")[style]


@dataclass(frozen=True)
class Seq2SeqTask:
    name: str
    chars: str  # the character vocabulary (before the special tokens)
    sizes: tuple[int, int, int]  # train, val, test examples
    description: str


SEQ2SEQ_TASKS = {
    "dates": Seq2SeqTask("dates", string.ascii_lowercase + string.digits + " ,-",
                         (20_000, 1_000, 1_000),
                         'written dates to ISO: "march 3, 1998" -> "1998-03-03"'),
    "reverse": Seq2SeqTask("reverse", string.ascii_lowercase, (20_000, 1_000, 1_000),
                           'reverse 3-12 letters: "abcd" -> "dcba"'),
}


def seq2seq_task(name: str) -> Seq2SeqTask:
    if name not in SEQ2SEQ_TASKS:
        raise UserError(f"unknown seq2seq task {name!r}: use {', '.join(SEQ2SEQ_TASKS)}")
    return SEQ2SEQ_TASKS[name]


def seq2seq_vocab(name: str) -> SpecialVocab:
    return SpecialVocab(CharTokenizer(seq2seq_task(name).chars))


def seq2seq_splits(name: str, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """{"train", "val", "test"} -> [(source, target)], cut by distinct items (dates, strings)."""
    task = seq2seq_task(name)
    rng = random.Random(seed)
    total = sum(task.sizes)
    if name == "dates":
        first, n_days = DATE_FIRST.toordinal(), (DATE_LAST - DATE_FIRST).days + 1
        days = rng.sample(range(n_days), total)  # distinct dates
        items = [datetime.date.fromordinal(first + d) for d in days]
        pairs = [(written_date(d, rng.randrange(4)), d.isoformat()) for d in items]
    else:
        seen: set[str] = set()
        while len(seen) < total:
            seen.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12))))
        items = sorted(seen)
        rng.shuffle(items)
        pairs = [(s, s[::-1]) for s in items]
    n_train, n_val, _ = task.sizes
    return {"train": pairs[:n_train], "val": pairs[n_train:n_train + n_val],
            "test": pairs[n_train + n_val:]}


# --- Classification: a real line of the corpus, or its words shuffled ----------------------

CLASS_NAMES = {"shuffled": ("real", "shuffled")}


def corpus_lines(text: str, min_words: int = 5) -> list[str]:
    """Distinct whitespace-normalised lines of mostly letters (prose, not code), in order."""
    out = {}
    for line in text.split("\n"):
        line = " ".join(line.split())
        letters = line.replace(" ", "")
        if len(line.split()) >= min_words and sum(c.isalpha() for c in letters) >= 0.8 * len(
                letters):
            out[line] = None
    return list(out)


def shuffle_words(line: str, rng: random.Random) -> str:
    words = line.split()
    for _ in range(10):
        rng.shuffle(words)
        if " ".join(words) != line:
            break
    return " ".join(words)


def shuffled_task(train_text: str, val_text: str, encode, max_tokens: int,
                  seed: int = 0) -> dict[str, list[tuple[list[int], int]]]:
    """{"train", "val", "test"} -> [(token ids, label)]; label 1 means the words were shuffled.

    Lines longer than max_tokens are left out. Each line appears once, as itself or shuffled
    (a fair coin), so no example is the shuffle of another."""
    rng = random.Random(seed)
    train_lines = corpus_lines(train_text)
    rng.shuffle(train_lines)
    n_val = max(1, len(train_lines) // 10)
    seen = set(train_lines)
    parts = {"train": train_lines[n_val:], "val": train_lines[:n_val],
             "test": [line for line in corpus_lines(val_text) if line not in seen]}
    out = {}
    for split, lines in parts.items():
        examples = []
        for line in lines:
            text = shuffle_words(line, rng) if rng.random() < 0.5 else line
            label = int(text != line)  # a line of one repeated word cannot be shuffled
            ids = encode(text)
            if len(ids) <= max_tokens:
                examples.append((ids, label))
        if not examples:
            raise UserError(f"the classification task's {split} split is empty: the corpus has "
                            f"no line of >= 5 words within {max_tokens} tokens there")
        out[split] = examples
    return out
