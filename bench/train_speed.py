"""Training throughput of llm_jax: tokens/s, FLOP/s and MFU of the jitted train step.

    python bench/train_speed.py --shape small                 # a shape of the peer baselines
    python bench/train_speed.py --preset default --steps 30   # any preset from configs/
    python bench/train_speed.py --shape small --peak-gflops 193  # MFU against a measured peak
    python bench/train_speed.py --preset shakespeare_char --cpu-devices 2 --vs attention=xla

Random tokens, the optimizer settings of nanoGPT's train.py (AdamW, weight decay 0.1, betas
0.9/0.99, lr 1e-3, grad clip 1.0), dropout 0. Times `--steps` steps after `--warmup` untimed
ones, each step ended by blocking on its loss; prints the median over `--repeats` runs and one
JSON line last.

`--vs KEY=VALUE` (repeatable) compares the model with those overrides against the one without,
in one process (`--vs xla:OPTION=VALUE`: the same model compiled with an XLA option, e.g.
`--vs xla:xla_cpu_use_onednn=true`; `--vs step=gspmd`: on per-core devices, the GSPMD step
instead of the one written out per device; `--vs rev=REVISION`: llm_jax/step.py and optim.py
as of that git revision, loaded beside this checkout's, which they import the rest from):
both train steps are compiled, then called alternately (A B, B A, A B, ...) for `--steps`
pairs, and the ratio of each pair is taken. On a shared machine whose speed drifts by 20 % or
more between processes, the median of the pair ratios resolves differences of a few per cent.
`--vs` with no change (e.g. `--vs scan_unroll=N` equal to the preset's) is the control: it
reads 1.00 over enough pairs (0.99 over 30 or 80 pairs here; a handful of pairs is not enough).
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


def with_overrides(mcfg, items: list[str]):
    """mcfg with KEY=VALUE overrides, typed and checked as train.py's --model.key=value."""
    from llm_jax.config import Config, apply

    updates = dict(item.partition("=")[::2] for item in items)
    return apply(Config(model=mcfg), {"model": updates}, "--model", from_text=True).model


def xla_option(item: str) -> tuple[str, object]:
    """'name=value' -> (name, value as bool, int or str) for compile(compiler_options=...)."""
    name, _, value = item.partition("=")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    return name, int(value) if value.lstrip("-").isdigit() else value


def modules_at(rev: str):
    """(step, optim) modules of llm_jax as of a git revision, loaded from temporary files."""
    import importlib.util
    import subprocess
    import tempfile

    root, out = Path(__file__).resolve().parent.parent, []
    for name in ("step", "optim"):
        src = subprocess.run(["git", "show", f"{rev}:llm_jax/{name}.py"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
        path = Path(tempfile.mkdtemp()) / f"{name}_at_{rev.replace('/', '_')}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out.append(module)
    return tuple(out)


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
    p.add_argument("--vs", action="append", default=[], metavar="KEY=VALUE",
                   help="compare against the model with this override, in one process")
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="split the CPU into this many devices, data-parallel (0: one per core)")
    args = p.parse_args()

    from llm_jax import cpu
    n_dev = cpu.devices_for(args.cpu_devices, 1 << 20)  # (before JAX starts: no batch check)
    cpu.configure(n_dev)
    cpu.retain_freed_memory()  # as train.py does
    import jax
    import numpy as np

    from llm_jax import model as gpt, parallel
    from llm_jax.config import TrainConfig, load_preset
    from llm_jax.matmul import resolve_auto_dtypes, resolve_linear_vjp
    from llm_jax.optim import make_optimizer
    from llm_jax.step import make_train_step

    config = load_preset(args.preset or args.shape or "small")
    mcfg, batch_size = config.model, config.train.batch_size
    if mcfg.vocab_size == 0:
        mcfg = dataclasses.replace(mcfg, vocab_size=65)
    name = args.preset or args.shape or "small"
    if not args.preset:  # configs/tiny.toml and small.toml: the peers' shapes, their options
        got = {k: getattr(mcfg, k, batch_size) for k in SHAPES[name]}
        assert got == SHAPES[name] and not mcfg.bias and mcfg.dropout == 0, (name, got)
    if args.dtype:
        mcfg = dataclasses.replace(mcfg, dtype=args.dtype)
    if args.model:
        mcfg = with_overrides(mcfg, args.model)
    tcfg = TrainConfig(learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99,
                       grad_clip=1.0, warmup_iters=100, max_iters=5000)

    def build(cfg, xla_options=None, gspmd=False, rev=None):
        """[train step, params, opt_state] for cfg, placed on the mesh when there is one; with
        xla_options, the step compiled ahead of time with those XLA options. On a mesh of CPU
        devices the step runs per device, as train.py's (step.per_device); gspmd: the jitted
        GSPMD step instead; rev: the step and optimizer of that git revision. "auto" options
        are decided as train.py decides them."""
        step_mod, optim_mod = modules_at(rev) if rev else (None, None)
        per_device = None if gspmd or mesh is None else mesh
        cfg = resolve_auto_dtypes(dataclasses.replace(cfg, linear_vjp=resolve_linear_vjp(
            cfg.linear_vjp, per_device=per_device is not None)), jax.devices()[0].platform)
        graphdef, params = gpt.init_params(cfg, jax.random.key(0))
        tx = (optim_mod.make_optimizer if rev else make_optimizer)(tcfg)
        opt_state = tx.init(params)
        if mesh is not None:
            params, opt_state = parallel.shard(params, mesh), parallel.shard(opt_state, mesh)
        step_fn = (step_mod.make_train_step if rev else make_train_step)(graphdef, tx,
                                                                          mesh=per_device)
        if xla_options:
            step_fn = step_fn.lower(params, opt_state, batch, key).compile(
                compiler_options=xla_options)
        return [step_fn, params, opt_state]

    mesh = parallel.make_mesh() if jax.device_count() > 1 else None
    rng = np.random.default_rng(0)
    T = mcfg.block_size
    tokens = rng.integers(0, mcfg.vocab_size, size=(1, batch_size, T + 1), dtype=np.int32)
    batch = (tokens[..., :-1], tokens[..., 1:])
    if mesh is not None:
        batch = parallel.put_batch(batch, mesh)
    key = jax.random.key(1)

    def step(run, i):
        """One step of run = [step_fn, params, opt_state], in place -> seconds, loss."""
        t0 = time.perf_counter()
        run[1], run[2], m = run[0](run[1], run[2], batch, jax.random.fold_in(key, i))
        loss = float(m["loss"])  # blocks until the step is done
        return time.perf_counter() - t0, loss

    if args.vs:
        xla_options = dict(xla_option(item[4:]) for item in args.vs if item.startswith("xla:"))
        revs = [item[4:] for item in args.vs if item.startswith("rev=")]
        model_items = [item for item in args.vs if not item.startswith(("xla:", "rev="))
                       and item != "step=gspmd"]
        vs_cfg = with_overrides(mcfg, model_items) if model_items else mcfg
        runs = {"A": build(mcfg), "B": build(vs_cfg, xla_options, "step=gspmd" in args.vs,
                                              revs[-1] if revs else None)}
        first_s = {n: round(step(r, 0)[0], 2) for n, r in runs.items()}  # compiles, unless AOT
        losses = {n: [step(r, i)[1] for i in range(1, 1 + args.warmup)] for n, r in runs.items()}
        times = {"A": [], "B": []}
        for i in range(args.steps):  # A B, B A, A B, ...: neither always runs first
            for n in ("AB" if i % 2 == 0 else "BA"):
                times[n].append(step(runs[n], 1 + args.warmup + i)[0])
        a, b = np.array(times["A"]), np.array(times["B"])
        pair = a / b  # > 1: B is faster
        q1, med, q3 = np.percentile(pair, [25, 50, 75])
        result = {
            "bench": "llm_jax_train_ab", "config": name, "vs": args.vs, "pairs": args.steps,
            "ms_per_step_A": round(1000 * float(np.median(a)), 2),
            "ms_per_step_B": round(1000 * float(np.median(b)), 2),
            "speedup_B_over_A": round(float(med), 4),
            "speedup_quartiles": [round(float(q1), 4), round(float(q3), 4)],
            "warmup_losses": losses, "first_step_s": first_s, "devices": jax.device_count(),
            "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
        print(f"{name}: A {result['ms_per_step_A']:.1f} ms/step, B ({' '.join(args.vs)}) "
              f"{result['ms_per_step_B']:.1f} ms/step; B's speedup, median of {args.steps} "
              f"pairs: {med:.3f} (quartiles {q1:.3f}-{q3:.3f})")
        print(json.dumps(result))
        return

    step_fn, params, opt_state = build(mcfg)
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
    used = resolve_auto_dtypes(mcfg, jax.devices()[0].platform)
    result = {
        "bench": "llm_jax_train", "config": name, "dtype": mcfg.dtype, "n_params": n_params,
        "matmul_dtype": used.matmul_dtype, "attention_dtype": used.attention_dtype or mcfg.dtype,
        "attention": mcfg.attention, "attention_block": mcfg.attention_block,
        "flops_per_token": flops_token, "tokens_per_step": tokens_step,
        "ms_per_step": 1000 * tokens_step / tok_s, "tokens_per_s": round(tok_s, 1),
        "tokens_per_s_runs": [round(r, 1) for r in rates], "gflop_per_s": round(gflops, 2),
        "mfu": round(gflops / args.peak_gflops, 4) if args.peak_gflops else None,
        "compile_s": round(compile_s, 2), "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    print(f"{name} ({result['matmul_dtype']} products, {mcfg.attention} attention): "
          f"{tok_s:,.0f} tokens/s ({result['ms_per_step']:.1f} ms/step), "
          f"{gflops:.1f} GFLOP/s, {n_params / 1e6:.2f}M params, compile {compile_s:.1f}s"
          + (f", MFU {100 * result['mfu']:.1f}%" if result["mfu"] else ""))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
