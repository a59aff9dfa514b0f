"""Batch-1 generation speed of llm_jax and nanoGPT back to back on this machine, and the ratio.

    python bench/generate_vs_nanogpt.py --nanogpt-dir /tmp/nanogpt \
        --torch-python /tmp/venv-torch/bin/python --rounds 3

The "small" shape of ../shared/bench/README.md, random weights, a 1-token prompt and 200 new
tokens at temperature 1 with top-k 200, one sequence. Each round runs, each in its own process,
llm_jax's `bench/generate_speed.py` (the key/value cache, compiled decode chunks) and nanoGPT's
`generate()` through ../shared/bench/nanogpt_cpu.py (no cache: every token re-runs the whole
context). These machines are shared and noisy, so both figures are medians over the rounds, and
so is the ratio of each round's pair. Prints one JSON line last.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE.parent.parent / "shared" / "bench" / "nanogpt_cpu.py"


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def llm_jax(new: int) -> float:
    cmd = [sys.executable, str(HERE / "generate_speed.py"), "--new", str(new), "--batches"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return last_json(p.stdout)["tokens_per_s_batch1"]


def nanogpt(python: str, nanogpt_dir: str, new: int) -> float:
    cmd = [python, str(PEERS), "--nanogpt-dir", nanogpt_dir, "--configs", "",
           "--sample-configs", "small", "--sample-tokens", str(new), "--wait-quiet", "5"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return last_json(p.stdout)["sample"]["small/eager"]["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt-dir", required=True, help="a checkout of nanoGPT (its model.py)")
    p.add_argument("--torch-python", required=True, help="a Python with torch for nanoGPT")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new", type=int, default=200, help="new tokens per sequence")
    args = p.parse_args()

    ours, peer, ratios = [], [], []
    for r in range(args.rounds):
        ours.append(llm_jax(args.new))
        peer.append(nanogpt(args.torch_python, args.nanogpt_dir, args.new))
        ratios.append(ours[-1] / peer[-1])
        print(f"round {r + 1}: llm_jax {ours[-1]:.1f} tokens/s, nanoGPT {peer[-1]:.1f} tokens/s,"
              f" ratio {ratios[-1]:.1f}", flush=True)
    result = {"bench": "generate_vs_nanogpt", "shape": "small", "new_tokens": args.new,
              "rounds": args.rounds, "llm_jax_tokens_per_s": ours, "nanogpt_tokens_per_s": peer,
              "median_llm_jax": statistics.median(ours), "median_nanogpt": statistics.median(peer),
              "median_ratio": statistics.median(ratios)}
    print(f"medians: llm_jax {result['median_llm_jax']:.1f} tokens/s, nanoGPT"
          f" {result['median_nanogpt']:.1f} tokens/s, ratio {result['median_ratio']:.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
