"""Speed of the byte-level BPE trainer and encoders (llm_jax/bpe.py).

    python bench/bpe_speed.py                          # the built-in corpus, repeated to 1 MB
    python bench/bpe_speed.py --input ../shared/data/tinyshakespeare/input.txt

Figures, each the median of --repeats runs unless said otherwise:
- splitting the text into chunks and counting them (the first step of training);
- the incremental trainer: --mb megabytes of text -> a --vocab-size vocabulary;
- the naive trainer (recounts every pair after each merge) on the same text for --naive-merges
  merges only, once, checked to give the same merges, and extrapolated linearly to the full
  vocabulary. Each naive merge rescans every chunk; the chunks shrink as merges accumulate but
  the distinct pairs to rank grow, and the cost per merge stays roughly flat (give
  --naive-merges 3839 to time the whole run);
- encoding the text with the trained tokenizer: this module's Python encoder (cache emptied
  first) and the tiktoken Encoding built from the same ranks (same ids, checked); and the Python
  encoder on GPT-2's ranks next to tiktoken's GPT-2.
The built-in corpus is 0.47 MB, so 1 MB of it repeats it: it has the chunk counts of a 1 MB
text, but fewer distinct chunks than a real 1 MB corpus (see --input). Prints one JSON line last.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, repeats: int):
    """(median seconds, last result) of `repeats` calls."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default="", help="a UTF-8 text file (default: the built-in corpus)")
    p.add_argument("--mb", type=float, default=1.0, help="megabytes of text (repeated or cut)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--naive-merges", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from llm_jax import bpe
    from llm_jax.data import read_builtin
    from llm_jax.tokenizers import (ASSET_DIR, EOT, GPT2_EOT_ID, GPT2_PATTERN, gpt2_tokenizer,
                                    read_gpt2_ranks)

    source = Path(args.input).read_text(encoding="utf-8") if args.input else \
        read_builtin("bpe").text
    n_bytes = int(args.mb * 1_000_000)
    raw = source.encode("utf-8")
    raw = (raw * (n_bytes // len(raw) + 1))[:n_bytes]
    text = raw.decode("utf-8", errors="ignore")  # a cut may split one character
    mb = len(text.encode("utf-8")) / 1e6
    name = args.input or "built-in corpus (pydoc_data.topics)"
    print(f"text: {name}, {mb:.3f} MB, {len(text):,} characters")
    result = {"input": name, "mb": round(mb, 3), "vocab_size": args.vocab_size}

    seconds, chunks = timed(lambda: bpe.count_chunks(text, GPT2_PATTERN, [EOT]), args.repeats)
    print(f"chunking and counting: {seconds:.2f} s; {len(chunks):,} distinct chunks, "
          f"{sum(chunks.values()):,} in all")
    result.update(chunk_s=round(seconds, 3), distinct_chunks=len(chunks))

    seconds, tok = timed(lambda: bpe.train_bpe(text, args.vocab_size), args.repeats)
    print(f"incremental trainer: {seconds:.2f} s for {len(tok.merges):,} merges "
          f"-> {tok.vocab_size:,} tokens")
    result.update(train_s=round(seconds, 3), merges=len(tok.merges))

    naive_vocab = 256 + args.naive_merges + 1
    start = time.perf_counter()
    naive = bpe.train_bpe_naive(text, naive_vocab)
    naive_s = time.perf_counter() - start
    assert naive.merges == tok.merges[:args.naive_merges], "naive and incremental differ"
    per_merge = naive_s / args.naive_merges
    print(f"naive trainer: {naive_s:.2f} s for {args.naive_merges} merges (once), "
          f"{per_merge:.3f} s per merge: about {per_merge * len(tok.merges) / 60:.1f} min for "
          f"{len(tok.merges):,} merges (linear extrapolation); same merges")
    result.update(naive_s=round(naive_s, 3), naive_merges=args.naive_merges,
                  naive_extrapolated_s=round(per_merge * len(tok.merges), 1))

    def own():
        tok._cache.clear()  # the Python encoder caches chunks: start cold
        return tok.encode_py(text)

    own_s, own_ids = timed(own, args.repeats)
    tik_s, tik_ids = timed(lambda: tok.encode(text), args.repeats)
    assert own_ids == tik_ids, "the two encoders differ"
    print(f"encode with the trained vocabulary: Python {mb / own_s:.2f} MB/s, tiktoken "
          f"{mb / tik_s:.2f} MB/s ({len(tik_ids):,} tokens, "
          f"{mb * 1e6 / len(tik_ids):.2f} bytes/token; same ids)")
    result.update(own_mb_s=round(mb / own_s, 3), tiktoken_mb_s=round(mb / tik_s, 3),
                  tokens=len(tik_ids))

    ranks, gpt2 = read_gpt2_ranks(ASSET_DIR), gpt2_tokenizer()
    gpt2_own_s, gpt2_own = timed(
        lambda: bpe.encode_with_ranks(text, ranks, GPT2_PATTERN, {EOT: GPT2_EOT_ID}),
        args.repeats)
    gpt2_tik_s, gpt2_tik = timed(lambda: gpt2.encode(text), args.repeats)
    assert gpt2_own == gpt2_tik, "the Python encoder differs from tiktoken's GPT-2"
    print(f"encode with GPT-2's ranks: Python {mb / gpt2_own_s:.2f} MB/s, tiktoken "
          f"{mb / gpt2_tik_s:.2f} MB/s (same ids)")
    result.update(gpt2_own_mb_s=round(mb / gpt2_own_s, 3),
                  gpt2_tiktoken_mb_s=round(mb / gpt2_tik_s, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
