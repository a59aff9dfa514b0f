"""Train the same GPT with each choice of a part and print the losses side by side.

    python bench/compare_parts.py                                  # positions, default preset
    python bench/compare_parts.py --part norm --max_iters 300
    python bench/compare_parts.py --part position --preset default --max_iters 500 --seeds 1 2

Each variant is the preset with one model option changed (`--part` = position or norm), trained
on the built-in corpus with the same data order, seed and step budget; the table shows the
final train and val losses (the mean over seeds when several are given) and the wall time.
Prints one JSON line last.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHOICES = {"position": ("learned", "sinusoidal", "rope"), "norm": ("layernorm", "rmsnorm")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=sorted(CHOICES), default="position")
    p.add_argument("--preset", default="default")
    p.add_argument("--max_iters", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337])
    p.add_argument("--choices", nargs="+", help="a subset of the part's choices")
    args = p.parse_args()

    import numpy as np

    from llm_jax.config import apply, load_preset
    from llm_jax.training import train

    rows = {}
    for choice in args.choices or CHOICES[args.part]:
        runs = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as out:
                config = apply(load_preset(args.preset), {
                    "model": {args.part: choice},
                    "train": {"max_iters": args.max_iters, "seed": seed, "out_dir": out,
                              "eval_interval": args.max_iters, "ckpt_interval": args.max_iters,
                              "log_interval": max(1, args.max_iters // 5), "progress": False}})
                s = train(config)
                runs.append((s["train_loss"], s["val_loss"], s["wall_s"]))
        rows[choice] = [float(np.mean([r[i] for r in runs])) for i in range(3)]
    print(f"\n{args.part} ({args.preset}, {args.max_iters} steps, seeds {args.seeds}):")
    print(f"| {args.part} | train loss | val loss | wall s |\n|---|---|---|---|")
    for choice, (tr, va, wall) in rows.items():
        print(f"| {choice} | {tr:.4f} | {va:.4f} | {wall:.0f} |")
    print(json.dumps({"part": args.part, "preset": args.preset, "max_iters": args.max_iters,
                      "seeds": args.seeds, **{c: {"train": round(r[0], 4), "val": round(r[1], 4),
                                                 "wall_s": round(r[2], 1)}
                                              for c, r in rows.items()}}))


if __name__ == "__main__":
    main()
