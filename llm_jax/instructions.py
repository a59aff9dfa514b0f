"""The built-in instruction dataset: questions with one right answer, no download.

`builtin_examples(n, tasks, seed)` generates conversations deterministically from the seed, in
five kinds (data.sft_tasks):
- add, sub: "what is 12 + 7?" -> "19", "what is 15 - 8?" -> "7" (numbers below 100, never
  negative);
- reverse: "reverse: cat" -> "tac" (words of 3 to 6 letters from the built-in corpus);
- upper: "uppercase: list" -> "LIST" (words of 3 to 8 letters from the corpus);
- first: "first word: <a line of Python's documentation>" -> its first word (a question about
  the built-in corpus, which the pretrained model has read).
Most conversations ask one question; MULTI_TURN of them chain two or three, so that a chat can
go on past its first turn. Every character comes from the built-in corpus, so the pretrained
char model's vocabulary encodes them all. Held out: the questions whose sha256 falls in
val_fraction (`question_held_out`); a conversation's questions are all held out or none is, so
a held-out question never appears in training, not even as history.
"""

from __future__ import annotations

import hashlib
import random
import re

from llm_jax.data import read_builtin
from llm_jax.errors import UserError

TASKS = ("add", "sub", "reverse", "upper", "first")
MULTI_TURN = 0.25  # the share of conversations with two or three questions


def corpus_words_and_lines() -> tuple[list[str], list[str]]:
    """Lower-case words and short one-line sentences of the built-in corpus (Python's docs)."""
    text = read_builtin("char").text
    words = sorted(set(re.findall(r"\b[a-z]{3,8}\b", text)))
    lines = sorted({s for s in (line.strip() for line in text.splitlines())
                    if 20 <= len(s) <= 60 and s[0].isalpha() and s.isascii()
                    and len(s.split()) >= 3})
    return words, lines


def builtin_examples(n: int, tasks: str = ",".join(TASKS), seed: int = 0,
                     val_fraction: float = 0.1) -> list[dict]:
    """n conversations {"messages", "task" (the last question's), "where"}, repeats possible;
    the same for the same arguments."""
    chosen = [t.strip() for t in tasks.split(",") if t.strip()]
    for t in chosen:
        if t not in TASKS:
            raise UserError(f"unknown data.sft_tasks entry {t!r}: use some of {', '.join(TASKS)}")
    if not chosen:
        raise UserError(f"data.sft_tasks is empty: use some of {', '.join(TASKS)}")
    words, lines = corpus_words_and_lines()
    short = [w for w in words if len(w) <= 6]
    rng = random.Random(seed)

    def exchange() -> tuple[str, str, str]:
        task = chosen[rng.randrange(len(chosen))]
        if task in ("add", "sub"):
            a, b = rng.randrange(100), rng.randrange(100)
            a, b = (a, b) if task == "add" or a >= b else (b, a)
            return (task, f"what is {a} {'+' if task == 'add' else '-'} {b}?",
                    str(a + b if task == "add" else a - b))
        if task == "reverse":
            word = rng.choice(short)
            return task, f"reverse: {word}", word[::-1]
        if task == "upper":
            word = rng.choice(words)
            return task, f"uppercase: {word}", word.upper()
        line = rng.choice(lines)
        return task, f"first word: {line}", line.split()[0]

    examples = []
    for i in range(n):
        turns = [exchange()]
        held = question_held_out(turns[0][1], val_fraction)
        n_turns = 1 if rng.random() >= MULTI_TURN else rng.randint(2, 3)
        while len(turns) < n_turns:
            turn = exchange()
            if question_held_out(turn[1], val_fraction) == held:
                turns.append(turn)
        messages = [{"role": role, "content": text} for _, prompt, answer in turns
                    for role, text in (("user", prompt), ("assistant", answer))]
        examples.append({"messages": messages, "task": turns[-1][0],
                         "where": f"built-in example {i}"})
    return examples


def question_held_out(question: str, val_fraction: float) -> bool:
    """Whether a question is held out: its sha256 read as a fraction is below val_fraction."""
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
