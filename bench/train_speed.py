"""Training throughput of llm_jax: tokens/s, FLOP/s and MFU of the jitted train step.

    python bench/train_speed.py --shape small                 # a shape of the peer baselines
    python bench/train_speed.py --preset default --steps 30   # any preset from configs/
    python bench/train_speed.py --shape small --peak-gflops 193  # MFU against a measured peak

Random tokens, the optimizer settings of nanoGPT's train.py (AdamW, weight decay 0.1, betas
0.9/0.99, lr 1e-3, grad clip 1.0), dropout 0. Times `--steps` steps after `--warmup` untimed
ones, each step ended by blocking on its loss; prints the median over `--repeats` runs and one
JSON line last.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The shapes of ../shared/bench/README.md (vocabulary 65: Tiny Shakespeare's characters).
SHAPES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--preset", default=None, help="a preset from configs/ instead of --shape")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-gflops", type=float, default=0.0, help="peak FLOP/s for MFU, in G")
    p.add_argument("--dtype", default=None, help="compute dtype override (e.g. bfloat16)")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="a ModelConfig override, e.g. matmul_dtype=bfloat16 (repeatable)")
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="split the CPU into this many devices, data-parallel (0: one per core)")
    args = p.parse_args()

    from llm_jax import cpu
    n_dev = cpu.devices_for(args.cpu_devices, 1 << 20)  # (before JAX starts: no batch check)
    cpu.configure(n_dev)
    import jax
    import numpy as np

    from llm_jax import model as gpt, parallel
    from llm_jax.config import Config, TrainConfig, apply, load_preset
    from llm_jax.optim import make_optimizer
    from llm_jax.step import make_train_step

    if args.preset:
        config = load_preset(args.preset)
        mcfg, batch_size = config.model, config.train.batch_size
        if mcfg.vocab_size == 0:
            mcfg = dataclasses.replace(mcfg, vocab_size=65)
        name = args.preset
    else:
        shape = dict(SHAPES[args.shape or "small"])
        batch_size = shape.pop("batch_size")
        mcfg = gpt.ModelConfig(vocab_size=65, vocab_multiple=1, bias=False, dropout=0.0,
                               scan_unroll=shape["n_layer"], **shape)  # as configs/tiny, small
        name = args.shape or "small"
    if args.dtype:
        mcfg = dataclasses.replace(mcfg, dtype=args.dtype)
    if args.model:  # typed and checked as train.py's --model.key=value overrides
        updates = dict(item.partition("=")[::2] for item in args.model)
        mcfg = apply(Config(model=mcfg), {"model": updates}, "--model", from_text=True).model
    tcfg = TrainConfig(learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99,
                       grad_clip=1.0, warmup_iters=100, max_iters=5000)

    graphdef, params = gpt.init_params(mcfg, jax.random.key(0))
    tx = make_optimizer(tcfg)
    opt_state = tx.init(params)
    mesh = parallel.make_mesh() if jax.device_count() > 1 else None
    if mesh is not None:
        params, opt_state = parallel.shard(params, mesh), parallel.shard(opt_state, mesh)
    step_fn = make_train_step(graphdef, tx)
    rng = np.random.default_rng(0)
    T = mcfg.block_size
    tokens = rng.integers(0, mcfg.vocab_size, size=(1, batch_size, T + 1), dtype=np.int32)
    batch = (tokens[..., :-1], tokens[..., 1:])
    if mesh is not None:
        batch = parallel.put_batch(batch, mesh)
    key = jax.random.key(1)

    t0 = time.perf_counter()
    params, opt_state, m = step_fn(params, opt_state, batch, key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        params, opt_state, m = step_fn(params, opt_state, batch, key)
    jax.block_until_ready(m)

    n_params = gpt.count_params(mcfg, params)
    flops_token = gpt.flops_per_token(mcfg, n_params)
    tokens_step = batch_size * T
    rates = []
    for _ in range(args.repeats):
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            params, opt_state, m = step_fn(params, opt_state, batch, jax.random.fold_in(key, i))
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t0)
        rates.append(tokens_step / statistics.median(times))
    tok_s = statistics.median(rates)
    gflops = tok_s * flops_token / 1e9
    result = {
        "bench": "llm_jax_train", "config": name, "dtype": mcfg.dtype, "n_params": n_params,
        "flops_per_token": flops_token, "tokens_per_step": tokens_step,
        "ms_per_step": 1000 * tokens_step / tok_s, "tokens_per_s": round(tok_s, 1),
        "tokens_per_s_runs": [round(r, 1) for r in rates], "gflop_per_s": round(gflops, 2),
        "mfu": round(gflops / args.peak_gflops, 4) if args.peak_gflops else None,
        "compile_s": round(compile_s, 2), "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    print(f"{name}: {tok_s:,.0f} tokens/s ({result['ms_per_step']:.1f} ms/step), "
          f"{gflops:.1f} GFLOP/s, {n_params / 1e6:.2f}M params, compile {compile_s:.1f}s"
          + (f", MFU {100 * result['mfu']:.1f}%" if result["mfu"] else ""))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
