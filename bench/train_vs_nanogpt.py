"""Training throughput of llm_jax and nanoGPT back to back on this machine, and their ratio.

    python bench/train_vs_nanogpt.py                                   # llm_jax alone
    python bench/train_vs_nanogpt.py --nanogpt-dir /tmp/nanogpt \
        --torch-python /tmp/venv-torch/bin/python

For each shape of ../shared/bench/README.md ("tiny", "small"), in rounds: llm_jax's
`bench/train_speed.py` (one device, and the CPU split into one device per core), then nanoGPT's
model through ../shared/bench/nanogpt_cpu.py (eager and torch.compile), each in its own process.
These machines are shared and noisy, so every figure is a median over the rounds and the ratio
is llm_jax's best setting against nanoGPT's best mode, both medians. Prints one JSON line last.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE.parent.parent / "shared" / "bench" / "nanogpt_cpu.py"
STEPS = {"tiny": 20, "small": 6}


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def llm_jax(shape: str, cpu_devices: int) -> float:
    cmd = [sys.executable, str(HERE / "train_speed.py"), "--shape", shape, "--steps",
           str(STEPS[shape]), "--repeats", "3", "--cpu-devices", str(cpu_devices)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return last_json(p.stdout)["tokens_per_s"]


def nanogpt(python: str, nanogpt_dir: str, shape: str) -> dict[str, float]:
    cmd = [python, str(PEERS), "--nanogpt-dir", nanogpt_dir, "--configs", shape,
           "--sample-configs", "", "--wait-quiet", "5", "--steps", str(STEPS[shape] * 2)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    train = last_json(p.stdout)["train"]
    return {mode: train[f"{shape}/{mode}"]["tokens_per_s"] for mode in ("eager", "compile")
            if f"{shape}/{mode}" in train}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["tiny", "small"], choices=sorted(STEPS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nanogpt-dir", default="", help="a checkout of nanoGPT (its model.py)")
    p.add_argument("--torch-python", default="", help="a Python with torch for nanoGPT")
    args = p.parse_args()

    runs: dict[str, dict[str, list[float]]] = {s: {} for s in args.shapes}
    for r in range(args.rounds):
        for shape in args.shapes:
            for name, devices in (("llm_jax 1 device", 1), ("llm_jax per-core devices", 0)):
                runs[shape].setdefault(name, []).append(llm_jax(shape, devices))
            if args.nanogpt_dir and args.torch_python:
                for mode, tok_s in nanogpt(args.torch_python, args.nanogpt_dir, shape).items():
                    runs[shape].setdefault(f"nanoGPT {mode}", []).append(tok_s)
            print(f"round {r + 1}: {shape}: " + ", ".join(
                f"{k} {v[-1]:,.0f}" for k, v in runs[shape].items()), flush=True)

    result = {"bench": "train_vs_nanogpt", "rounds": args.rounds, "shapes": {}}
    for shape, by_name in runs.items():
        med = {k: statistics.median(v) for k, v in by_name.items()}
        ours = max(v for k, v in med.items() if k.startswith("llm_jax"))
        peers = [v for k, v in med.items() if k.startswith("nanoGPT")]
        ratio = ours / max(peers) if peers else None
        result["shapes"][shape] = {"median_tokens_per_s": med, "runs": by_name, "ratio": ratio}
        print(f"{shape}: " + ", ".join(f"{k} {v:,.0f}" for k, v in med.items())
              + (f"; llm_jax best / nanoGPT best = {ratio:.2f}" if ratio else ""))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
