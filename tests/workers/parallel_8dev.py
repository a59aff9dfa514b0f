"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_parallel.py starts
it): the same train steps on one device, data-parallel (GSPMD, and written out per device with
shard_map), fully sharded and mixed meshes; then a
checkpoint written on 8 devices restored on 1 and on 4. Prints one JSON line."""

import json
import sys
import tempfile

import jax
import numpy as np

from llm_jax import model as gpt
from llm_jax import parallel
from llm_jax.checkpoint import Checkpoints, restore
from llm_jax.config import TrainConfig
from llm_jax.optim import make_optimizer
from llm_jax.step import make_train_step

assert jax.device_count() == 8, jax.devices()
cfg = gpt.ModelConfig(vocab_size=64, vocab_multiple=8, n_layer=2, n_head=4, n_embd=32,
                      block_size=16, bias=False)
tcfg = TrainConfig(batch_size=8, grad_accum=2, learning_rate=1e-2, warmup_iters=0, max_iters=6)
tx = make_optimizer(tcfg)
graphdef, params0 = gpt.init_params(cfg, jax.random.key(0))
params0 = jax.device_get(params0)  # host copies: every run places (and donates) its own
rng = np.random.default_rng(0)
batches = [tuple(rng.integers(0, 64, size=(2, 8, 16)).astype(np.int32) for _ in range(2))
           for _ in range(6)]
train_step = make_train_step(graphdef, tx)


def run(mesh, params, opt_state, steps, train_step=train_step):
    params, opt_state = parallel.shard(params, mesh), parallel.shard(opt_state, mesh)
    want = parallel.state_shardings(params, mesh)
    metrics = []
    for i in steps:
        params, opt_state, m = train_step(params, opt_state, parallel.put_batch(batches[i], mesh),
                                          jax.random.key(i))
        metrics.append((float(m["loss"]), float(m["grad_norm"])))
    kept = all(a.sharding.is_equivalent_to(s, a.ndim)
               for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)))
    return metrics, params, opt_state, kept


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))


def grads_on(mesh):
    """The gradient of the mean loss of one micro-batch, params and batch on the mesh."""
    from llm_jax.loss import cross_entropy

    loss = lambda p, x, y: cross_entropy(gpt.forward(graphdef, p, x), y)  # noqa: E731
    x, y = parallel.put_batch(batches[0], mesh)
    return jax.jit(jax.grad(loss))(parallel.shard(params0, mesh), x[0], y[0])


out = {}
one = parallel.make_mesh(devices=jax.devices()[:1])
ref_grads = grads_on(one)
ref_metrics, ref_params, _, _ = run(one, params0, tx.init(params0), range(6))
for data, fsdp, per_device in [(8, 1, False), (1, 8, False), (2, 4, False), (8, 1, True)]:
    mesh = parallel.make_mesh(data, fsdp)
    # per_device: the step written out with shard_map (step.per_device), as on per-core CPUs
    step = make_train_step(graphdef, tx, mesh=mesh) if per_device else train_step
    metrics, params, _, kept = run(mesh, params0, tx.init(params0), range(6), step)
    out[f"{data}x{fsdp}" + ("_per_device" if per_device else "")] = {
        "loss_diff": max(abs(a[0] - b[0]) for a, b in zip(metrics, ref_metrics)),
        "grad_norm_diff": max(abs(a[1] - b[1]) for a, b in zip(metrics, ref_metrics)),
        "param_diff": max_diff(params, ref_params), "shardings_kept": kept,
        "grad_diff": max_diff(grads_on(parallel.make_mesh(data, fsdp)), ref_grads),
        "sharded_leaves": sum(not a.sharding.is_fully_replicated for a in jax.tree.leaves(params))}

# A checkpoint written on 8 devices (fully sharded), restored on 1 and on 4 devices.
eight = parallel.make_mesh(1, 8)
_, params, opt_state, _ = run(eight, params0, tx.init(params0), range(3))
with tempfile.TemporaryDirectory() as run_dir:
    ckpts = Checkpoints(run_dir)
    ckpts.save(3, params, opt_state, {"note": "8 devices"})
    ckpts.wait()
    ckpts.close()
    for n, (data, fsdp) in {"1": (1, 1), "4": (2, 2)}.items():
        mesh = parallel.make_mesh(data, fsdp, devices=jax.devices()[: data * fsdp])
        p, o, meta = restore(run_dir, parallel.abstract_on(params0, mesh),
                             parallel.abstract_on(tx.init(params0), mesh))
        on_mesh = all(a.sharding.mesh.size == data * fsdp for a in jax.tree.leaves(p))
        metrics, _, _, _ = run(mesh, jax.device_get(p), jax.device_get(o), range(3, 6))
        out[f"restore_on_{n}"] = {
            "loss_diff": max(abs(a[0] - b[0]) for a, b in zip(metrics, ref_metrics[3:])),
            "on_mesh": on_mesh, "step": meta["step"]}
print(json.dumps(out))
sys.stdout.flush()
