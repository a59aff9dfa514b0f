"""Generation speed of llm_jax with the key/value cache: tokens/s and time to first token.

    python bench/generate_speed.py                 # the "small" shape, float32, on CPU
    python bench/generate_speed.py --new 100 --batches 8
    python bench/generate_speed.py --caller-ms 20 --batches   # a caller that is slow to print

Random init (speed does not depend on the weights), temperature 1 with top-k 200 as nanoGPT's
sample.py. One sequence: a 1-token prompt and `--new` new tokens, timed from the call to the
last token (after one untimed warm-up run that compiles); the time to first token is the
prefill plus its token choice. Then the throughput at each batch size: new tokens of all rows
per second. `--caller-ms` makes the caller spend that long on each chunk it receives (as a
terminal printing the text, or a stop-string test, would). Prints one JSON line last.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SMALL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False)


def timed_run(graphdef, params, batch: int, new: int, chunk: int, caller_s: float = 0.0):
    import jax
    from llm_jax import sampling

    start = time.perf_counter()
    first = None
    count = 0
    for pieces in sampling.stream(graphdef, params, [[0]] * batch, max_new_tokens=new,
                                  key=jax.random.key(0), temperature=1.0, top_k=200,
                                  chunk=chunk):
        if first is None:
            first = time.perf_counter() - start
        count += sum(len(p) for p in pieces)
        if caller_s:
            time.sleep(caller_s)
    return time.perf_counter() - start, first, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", type=int, default=200, help="new tokens per sequence")
    p.add_argument("--batches", type=int, nargs="*", default=[8, 64])
    p.add_argument("--chunk", type=int, default=16, help="decode steps per jitted scan")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--caller-ms", type=float, default=0.0,
                   help="time the caller spends on each chunk it receives")
    args = p.parse_args()

    import jax
    from llm_jax import model as gpt

    cfg = gpt.ModelConfig(**SMALL, scan_unroll=SMALL["n_layer"])
    graphdef, params = gpt.init_params(cfg, jax.random.key(0))
    result = {"shape": "small", "device": jax.devices()[0].platform, "new_tokens": args.new,
              "chunk": args.chunk, "caller_ms": args.caller_ms}
    caller_s = args.caller_ms / 1000
    timed_run(graphdef, params, 1, args.new, args.chunk)  # compile
    runs = sorted(timed_run(graphdef, params, 1, args.new, args.chunk, caller_s)
                  for _ in range(args.repeats))
    total, first, count = runs[len(runs) // 2]
    result["tokens_per_s_batch1"] = round(count / total, 1)
    result["time_to_first_token_ms"] = round(1000 * first, 2)
    print(f"batch 1: {count / total:.1f} tokens/s, first token after {1000 * first:.1f} ms")
    for b in args.batches:
        timed_run(graphdef, params, b, args.new, args.chunk)
        total, _, count = min(timed_run(graphdef, params, b, args.new, args.chunk, caller_s)
                              for _ in range(max(1, args.repeats - 1)))
        result[f"tokens_per_s_batch{b}"] = round(count / total, 1)
        print(f"batch {b}: {count / total:.1f} tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
