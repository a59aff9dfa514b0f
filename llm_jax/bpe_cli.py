"""The tokenizer's command line: train a byte-level BPE on your files, or show how a text splits.

    python -m llm_jax.bpe train --input FILE_OR_DIR --vocab-size 4096 --out tok.json [--verbose]
    python -m llm_jax.bpe show --tokenizer tok.json "some text"       # or --tokenizer gpt2

(`python -m llm_jax.bpe_cli` is the same.) The trainers and the tokenizer are llm_jax/bpe.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llm_jax.bpe import load, show_token, train_bpe, train_bpe_naive
from llm_jax.errors import UserError
from llm_jax.tokenizers import EOT


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llm_jax.bpe",
                                description="Train a byte-level BPE tokenizer, or show one.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="learn merges from a text file or a folder of .txt/.md")
    t.add_argument("--input", required=True, help="a UTF-8 text file or a folder of .txt/.md")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="tokens in all: 256 bytes + merges + special tokens")
    t.add_argument("--out", required=True, help="the tokenizer file to write (JSON)")
    t.add_argument("--special", action="append", default=None,
                   help=f"a special token (repeatable; default {EOT})")
    t.add_argument("--verbose", action="store_true", help="print every merge as it happens")
    t.add_argument("--naive", action="store_true", help="recount all pairs after every merge")
    s = sub.add_parser("show", help="show how a text splits into tokens")
    s.add_argument("--tokenizer", required=True, help="a tokenizer file, or gpt2")
    s.add_argument("text", help="the text, or - to read stdin")
    return p.parse_args(argv)


def train_command(args) -> None:
    from llm_jax.data import read_text_files  # documents joined by <|endoftext|>

    if not Path(args.input).expanduser().exists():
        raise UserError(f"--input {args.input!r} does not exist")
    corpus = read_text_files(args.input, "bpe")
    specials = [EOT] if args.special is None else args.special
    print(f"training on {corpus.description}: {len(corpus.text):,} characters, "
          f"{len(corpus.text.encode('utf-8')):,} bytes")
    started = time.perf_counter()
    trainer = train_bpe_naive if args.naive else train_bpe
    tok = trainer(corpus.text, args.vocab_size, specials, log=print if args.verbose else None)
    seconds = time.perf_counter() - started
    tok.save(args.out)
    n_ids = len(tok.encode(corpus.text))
    print(f"{len(tok.merges):,} merges in {seconds:.1f} s; vocabulary of {tok.vocab_size:,} "
          f"tokens written to {args.out}; the input is {n_ids:,} tokens, "
          f"{len(corpus.text.encode('utf-8')) / max(n_ids, 1):.2f} bytes per token")
    if tok.vocab_size < args.vocab_size:
        print(f"note: the input ran out of pairs to merge before {args.vocab_size:,} tokens")


def show_command(args) -> None:
    from llm_jax.tokenizers import gpt2_tokenizer

    tok = gpt2_tokenizer() if args.tokenizer == "gpt2" else load(args.tokenizer)
    text = sys.stdin.read() if args.text == "-" else args.text
    ids = tok.encode(text)
    n_bytes = len(text.encode("utf-8"))
    print(f"{len(text)} characters, {n_bytes} bytes -> {len(ids)} tokens "
          f"(vocabulary {tok.vocab_size:,})")
    for token in ids:
        print(f"{token:>7}  {show_token(tok.encoding.decode_single_token_bytes(token))}")


def main(argv: list[str]) -> None:
    args = parse(argv)
    if args.command == "train":
        train_command(args)
    else:
        show_command(args)


if __name__ == "__main__":
    from llm_jax.cli import run_main

    run_main(main)
