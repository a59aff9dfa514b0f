"""The CPU split into per-core devices (llm_jax/cpu.py), the persistent compilation cache, and
the speed-minded parts: bf16 matmuls with float32 sums, blocked causal attention."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import attention as A
from llm_jax import compile_cache, cpu
from llm_jax import model as gpt
from llm_jax.errors import UserError
from llm_jax import matmul
from llm_jax.matmul import (bf16_matmul, dot_general_for, fast_bf16_products,
                            resolve_matmul_dtype, transposed_matmul)
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def test_devices_for_auto_splits_small_models_whose_batch_divides(monkeypatch):
    monkeypatch.setattr(cpu, "cores", lambda: 2)
    monkeypatch.setattr(cpu, "accelerator_installed", lambda: False)
    assert cpu.devices_for(0, 16, 128) == 2
    assert cpu.devices_for(0, 15, 128) == 1  # the batch does not split over the cores
    assert cpu.devices_for(0, 16, cpu.AUTO_MAX_WIDTH + 1) == 1  # wide: one device, all cores
    assert cpu.devices_for(3, 15, 4096) == 3  # asked for: taken as it is
    monkeypatch.setattr(cpu, "accelerator_installed", lambda: True)
    assert cpu.devices_for(0, 16, 128) == 1
    monkeypatch.setattr(cpu, "cores", lambda: 1)
    monkeypatch.setattr(cpu, "accelerator_installed", lambda: False)
    assert cpu.devices_for(0, 16, 128) == 1
    with pytest.raises(UserError, match="cpu_devices"):
        cpu.devices_for(-1, 16, 128)


def run_python(code: str, xla_flags: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    p = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


CONFIGURE = """
import json, os
from llm_jax import cpu
first = cpu.configure(2)
import jax
n = jax.device_count()
late = cpu.configure(4)  # JAX has started: too late, nothing changes
print(json.dumps({"set": first, "late": late, "devices": n, "flags": os.environ.get("XLA_FLAGS")}))
"""


def test_configure_makes_per_core_devices_before_jax_starts():
    r = run_python(CONFIGURE, None)
    assert r["set"] and not r["late"] and r["devices"] == 2
    assert "--xla_cpu_multi_thread_eigen=false" in r["flags"]


def test_configure_leaves_the_users_device_count_alone():
    r = run_python(CONFIGURE, "--xla_force_host_platform_device_count=3")
    assert not r["set"] and r["devices"] == 3
    assert r["flags"] == "--xla_force_host_platform_device_count=3"


ARENA = """
import ctypes, json, resource, threading
from llm_jax import cpu
kept = cpu.retain_freed_memory() if RETAIN else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
SIZES = [4 << 20] * 24 + [56 << 20]  # 96 MB of buffers and one 56 MB block of temporaries
def steps():  # like a train step on an XLA worker thread: buffers allocated, written, freed
    for _ in range(5):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [libc.malloc(n) for n in SIZES]
        for b, n in zip(buffers, SIZES):
            libc.memset(b, 1, n)
        for b in buffers:
            libc.free(b)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
t = threading.Thread(target=steps)
t.start(); t.join()
print(json.dumps({"kept": kept, "faults": faults}))
"""


@pytest.mark.skipif(os.uname().sysname != "Linux" or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's malloc")
def test_retained_memory_is_not_faulted_in_again_at_every_step():
    pages = (96 + 56) << 20 >> 12
    default, kept = (run_python(f"RETAIN = {retain}" + ARENA, None) for retain in (False, True))
    assert kept["kept"] is True
    # glibc unmaps the second heap and the big block each time
    assert min(default["faults"][1:]) > pages // 20
    assert max(kept["faults"][1:]) < pages // 100  # their pages are reused: no new faults


def test_compile_cache_folder_and_off_switch(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None and compile_cache.enable() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    assert compile_cache.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "llm_jax" / "jax"


def test_compile_cache_lets_a_second_process_skip_the_compile(tmp_path):
    code = f"""
import json, jax, jax.numpy as jnp
from llm_jax import compile_cache
compile_cache.enable({str(tmp_path)!r}, min_compile_s=0.0)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
print(json.dumps({{"y": float(f(jnp.ones((64, 64))))}}))
"""
    first = run_python(code, "")
    entries = list(tmp_path.iterdir())
    assert entries  # the compiled program was written
    second = run_python(code, "")
    assert second == first and sorted(tmp_path.iterdir()) == sorted(entries)  # read, not rewritten


def rounded(x):
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def test_bf16_matmul_is_the_product_of_rounded_operands_with_float32_sums():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, (64, 48)), jax.random.normal(kw, (48, 80))
    g = jax.random.normal(kg, (64, 80))
    y, vjp = jax.vjp(bf16_matmul, x, w)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), rounded(x) @ rounded(w), rtol=1e-5, atol=1e-4)
    dx, dw = vjp(g)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(dx), rounded(g) @ rounded(w).T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), rounded(x).T @ rounded(g), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="matmul_dtype"):
        dot_general_for("int8")


def next_token_loss(cfg):
    """loss(graphdef, params): a GPT's mean next-token loss on two fixed random rows."""
    idx = jax.random.randint(jax.random.key(1), (2, cfg.block_size + 1), 0, cfg.vocab_size)

    def loss(g, p):
        logits = gpt.forward(g, p, idx[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), idx[:, 1:, None], -1))

    return loss


def test_bf16_matmuls_change_a_models_loss_and_gradients_only_by_rounding():
    cfg = TINY
    graphdef, params = gpt.init_params(cfg, jax.random.key(0))
    bf_def, _ = gpt.init_params(dataclasses.replace(cfg, matmul_dtype="bfloat16"),
                                jax.random.key(0))
    loss = next_token_loss(cfg)

    l32, g32 = jax.value_and_grad(loss, argnums=1)(graphdef, params)
    l16, g16 = jax.value_and_grad(loss, argnums=1)(bf_def, params)
    assert abs(float(l16) - float(l32)) < 1e-2 and float(l16) != float(l32)
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        assert float(jnp.max(jnp.abs(a - b))) < 0.05 * scale


def test_matmul_dtype_auto_is_bf16_only_where_the_devices_multiply_bf16_fast():
    assert fast_bf16_products("gpu") and fast_bf16_products("tpu")
    assert fast_bf16_products("cpu", {"avx2", "avx512f", "avx512_bf16"})
    assert fast_bf16_products("cpu", {"avx2", "amx_bf16"})
    assert not fast_bf16_products("cpu", {"avx2", "fma", "avx512f", "avx512_vnni"})
    assert not fast_bf16_products("cpu", set())
    assert resolve_matmul_dtype("float32", "gpu") == "float32"  # a choice is kept as it is
    assert resolve_matmul_dtype("bfloat16", "cpu") == "bfloat16"
    cpuinfo = Path("/proc/cpuinfo")
    flags = " ".join(ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")
                     ) if cpuinfo.exists() else ""
    has_bf16 = " avx512_bf16" in flags or " amx_bf16" in flags
    assert resolve_matmul_dtype("auto", "cpu") == ("bfloat16" if has_bf16 else "float32")
    assert dot_general_for("auto") is jax.lax.dot_general  # outside training: float32


def test_training_with_auto_dtypes_follows_the_cpu_and_saves_auto(run_config, tmp_path,
                                                                   monkeypatch):
    """matmul_dtype=auto and attention_dtype=auto train exactly as the float32 run on a CPU
    without BF16 and as the bf16 run on one with it; the saved config keeps "auto"."""
    from llm_jax.training import train

    def run(name, flags, matmul_dtype, attention_dtype):
        monkeypatch.setattr(matmul, "_cpu_flags", lambda: set(flags))
        config = run_config(tmp_path / name, model={"matmul_dtype": matmul_dtype,
                                                    "attention_dtype": attention_dtype},
                            max_iters=3, eval_interval=3, log_interval=1)
        summary = train(config)
        saved = json.loads((tmp_path / name / "config.json").read_text())["model"]
        return summary, (saved["matmul_dtype"], saved["attention_dtype"])

    f32, _ = run("f32", ["avx512_bf16"], "float32", "")
    bf16, _ = run("bf16", [], "bfloat16", "bfloat16")
    auto_avx2, saved_avx2 = run("auto_avx2", ["avx2", "avx512f"], "auto", "auto")
    auto_bf16, saved_bf16 = run("auto_bf16", ["avx2", "avx512_bf16"], "auto", "auto")
    assert saved_avx2 == saved_bf16 == ("auto", "auto")  # the policy is saved
    assert (auto_avx2["matmul_dtype"], auto_avx2["attention_dtype"]) == ("float32", "")
    assert (auto_bf16["matmul_dtype"], auto_bf16["attention_dtype"]) == ("bfloat16", "bfloat16")
    assert auto_avx2["final_loss"] == f32["final_loss"]  # the same products, bit for bit
    assert auto_bf16["final_loss"] == bf16["final_loss"]
    assert f32["final_loss"] != bf16["final_loss"]  # (so the two above tell them apart)
    assert abs(f32["final_loss"] - bf16["final_loss"]) < 0.05


def test_unresolved_auto_dtypes_compute_in_float32():
    """Outside training (decoding, a loaded checkpoint) "auto" means float32 products."""
    graphdef, params = gpt.init_params(TINY, jax.random.key(0))
    auto_def, _ = gpt.init_params(dataclasses.replace(TINY, matmul_dtype="auto",
                                                      attention_dtype="auto"), jax.random.key(0))
    idx = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)
    assert np.array_equal(np.asarray(gpt.forward(auto_def, params, idx)),
                          np.asarray(gpt.forward(graphdef, params, idx)))


def test_transposed_matmul_is_the_float32_product_and_its_gradients():
    """linear_vjp=transposed: the product and both gradients are the float64 ones up to float32
    rounding, under jit too (where the row-major x^T residual is laid out)."""
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x, w = jax.random.normal(kx, (64, 48)), jax.random.normal(kw, (48, 80))
    g = jax.random.normal(kg, (64, 80))
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    y, (dx, dw) = jax.jit(lambda x, w: (transposed_matmul(x, w),
                                        jax.vjp(transposed_matmul, x, w)[1](g)))(x, w)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x64 @ w64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), g64 @ w64.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), x64.T @ g64, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="linear_vjp"):
        dot_general_for("float32", "fast")


def test_a_gpt_with_the_transposed_backward_has_the_same_loss_and_gradients():
    cfg = dataclasses.replace(TINY, linear_vjp="xla")
    graphdef, params = gpt.init_params(cfg, jax.random.key(0))
    t_def, _ = gpt.init_params(dataclasses.replace(cfg, linear_vjp="transposed"),
                               jax.random.key(0))
    loss = next_token_loss(cfg)

    grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    (l_x, g_x), (l_t, g_t) = grad(graphdef, params), grad(t_def, params)
    assert abs(float(l_t) - float(l_x)) < 1e-6
    for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_t)):
        assert float(jnp.max(jnp.abs(a - b))) < 1e-5 * (float(jnp.max(jnp.abs(a))) + 1e-6)


@pytest.mark.parametrize("T,block", [(32, 8), (24, 8), (20, 8)])  # 20: not a multiple, one block
def test_blocked_attention_matches_the_reference_forward_and_gradients(T, block):
    kq, kk, kv, kc = jax.random.split(jax.random.key(2), 4)
    q, k, v = (jax.random.normal(kk_, (2, T, 3, 8)) for kk_ in (kq, kk, kv))
    ct = jax.random.normal(kc, q.shape)

    def f(impl):
        def loss(q, k, v):
            return jnp.sum(A.attention(q, k, v, causal=True, impl=impl, block_size=block) * ct)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    (l_ref, g_ref), (l_blk, g_blk) = f("reference"), f("blocked")
    np.testing.assert_allclose(float(l_blk), float(l_ref), rtol=1e-5)
    for a, b in zip(g_ref, g_blk):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_blocked_attention_in_bf16_is_close_to_float32():
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (1, 32, 2, 16)) for key in keys)
    y32 = A.attention(q, k, v, causal=True, impl="reference")
    y16 = A.attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)), causal=True,
                      impl="blocked", block_size=8)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), atol=3e-2)
