"""Speed and memory of the attention implementations (llm_jax/attention.py) as T grows.

    python bench/attention_speed.py                       # T = 256 ... 8192, H=12, K=64, causal
    python bench/attention_speed.py --sizes 256 512 --heads 4 --repeats 5

For each T and implementation: one jitted forward + backward, value_and_grad of
sum(attention(q, k, v, causal=True) * cotangent) w.r.t. q, k, v, at batch 1 with GPT-2's heads
(H=12, K=64). Time: the median of --repeats runs after one warm-up run. Memory: the temporary
buffers XLA allocates for that step (`compile().memory_analysis().temp_size_in_bytes`;
deterministic, read before running). An implementation whose temporaries exceed --max-temp-gb is
compiled (so its memory is still reported) but not run. The growth of memory from one T to the
next is printed, and the growth law is read from the measured figures for T >= block size (below
that, flash's one tile is T x T): the increments of temp between successive doublings of T grow
x2 if memory is linear in T plus a fixed part (flash's tiles), x4 if quadratic. Prints a table
and one JSON line last.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def forward_backward(impl: str, block_size: int):
    import jax
    import jax.numpy as jnp
    from llm_jax.attention import attention

    def loss(q_BTHK, k_BTHK, v_BTHK, ct_BTHK):
        y_BTHK = attention(q_BTHK, k_BTHK, v_BTHK, causal=True, impl=impl, block_size=block_size)
        return jnp.sum(y_BTHK * ct_BTHK)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def timed_runs(compiled, args, repeats: int, budget_s: float) -> list[float]:
    """Seconds per call: one warm-up, then up to `repeats` runs while within budget_s."""
    import jax

    jax.block_until_ready(compiled(*args))
    times = []
    while len(times) < repeats and sum(times) < budget_s:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[256 * 2**i for i in range(6)])
    p.add_argument("--impls", nargs="*", default=["reference", "xla", "flash"])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=512, help="flash's tile length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=30.0,
                   help="stop repeating once this many seconds are spent on one measurement")
    p.add_argument("--max-temp-gb", type=float, default=6.0,
                   help="do not run an implementation whose temporaries exceed this")
    args = p.parse_args()

    import jax
    import numpy as np

    H, K = args.heads, args.head_dim
    setup = {"device": jax.devices()[0].platform, "cpu": platform.processor() or platform.machine(),
             "cpu_count": os.cpu_count(), "jax": jax.__version__, "B": 1, "H": H, "K": K,
             "causal": True, "dtype": "float32", "block_size": args.block_size,
             "repeats": args.repeats}
    print("attention forward+backward: " + ", ".join(f"{k}={v}" for k, v in setup.items()))
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'T':>6} {'impl':>10} {'ms (median)':>12} {'temp MB':>10} {'x prev T':>9}")
    for T in args.sizes:
        qkvc = [jax.device_put(rng.standard_normal((1, T, H, K), dtype=np.float32))
                for _ in range(4)]
        for impl in args.impls:
            compiled = forward_backward(impl, args.block_size).lower(*qkvc).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            row = {"T": T, "impl": impl, "temp_bytes": temp, "ms": None, "runs": 0}
            if temp > args.max_temp_gb * 2**30:
                row["skipped"] = f"temporaries {temp / 2**30:.1f} GB > --max-temp-gb"
            else:
                times = timed_runs(compiled, qkvc, args.repeats, args.budget_s)
                row.update(ms=round(1000 * statistics.median(times), 1), runs=len(times))
            del compiled
            prev = [r for r in rows if r["impl"] == impl and r["T"] * 2 == T]
            row["temp_ratio_vs_half_T"] = round(temp / prev[0]["temp_bytes"], 2) if prev else None
            rows.append(row)
            ms = f"{row['ms']:.1f}" if row["ms"] is not None else "skipped"
            ratio = row["temp_ratio_vs_half_T"]
            print(f"{T:>6} {impl:>10} {ms:>12} {temp / 2**20:>10.1f} "
                  f"{'' if ratio is None else f'x{ratio:.2f}':>9}", flush=True)

    # temp(T) = fixed + growing part: the increments between successive doublings of T grow x2
    # when the growing part is linear in T, x4 when quadratic (the fixed part cancels)
    growth = {}
    for impl in args.impls:
        temps = [(r["T"], r["temp_bytes"]) for r in rows
                 if r["impl"] == impl and r["T"] >= args.block_size]
        steps = [(t1 - t0) for (T0, t0), (T1, t1) in zip(temps, temps[1:]) if T1 == 2 * T0]
        ratios = [b / a for a, b in zip(steps, steps[1:]) if a > 0 and b > 0]
        if ratios:
            per_doubling = math.exp(statistics.mean(math.log(x) for x in ratios))
            exponent = math.log2(per_doubling)
            kind = ("linear" if abs(exponent - 1) < 0.25
                    else "quadratic" if abs(exponent - 2) < 0.25 else "neither")
            growth[impl] = {"from_T": temps[0][0], "exponent": round(exponent, 2), "kind": kind,
                            "increment_x_per_doubling": round(per_doubling, 2)}
            print(f"{impl}: temporaries = fixed + a part growing x{per_doubling:.2f} per doubling "
                  f"of T (T >= {temps[0][0]}): ~T^{exponent:.2f}, {kind} in T")
    for r in rows:
        if "skipped" in r:
            print(f"skipped: {r['impl']} at T={r['T']} ({r['skipped']})")
    print(json.dumps({**setup, "results": rows, "growth": growth}))


if __name__ == "__main__":
    main()
