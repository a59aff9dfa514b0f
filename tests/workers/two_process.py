"""One process of a data-parallel job over loopback: `two_process.py COORDINATOR N ID`.

With an empty coordinator it runs alone (the reference). Each process holds 2 CPU devices
(XLA_FLAGS), builds only its own rows of every global batch, and prints its losses as JSON."""

import json
import sys

from llm_jax import parallel

coordinator, n, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
parallel.initialize(coordinator, n, pid, timeout_s=60)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llm_jax import model as gpt  # noqa: E402
from llm_jax.config import TrainConfig  # noqa: E402
from llm_jax.optim import make_optimizer  # noqa: E402
from llm_jax.step import make_train_step  # noqa: E402

cfg = gpt.ModelConfig(vocab_size=64, vocab_multiple=8, n_layer=2, n_head=4, n_embd=32,
                      block_size=16, bias=False)
tx = make_optimizer(TrainConfig(batch_size=8, learning_rate=1e-2, warmup_iters=0, max_iters=4))
graphdef, params = gpt.init_params(cfg, jax.random.key(0))
mesh = parallel.make_mesh()  # all devices of all processes
params = parallel.shard(jax.device_get(params), mesh)
opt_state = parallel.shard(jax.device_get(tx.init(params)), mesh)
train_step = make_train_step(graphdef, tx)
rng = np.random.default_rng(0)
losses = []
for i in range(4):
    batch = tuple(rng.integers(0, 64, size=(1, 8, 16)).astype(np.int32) for _ in range(2))
    params, opt_state, m = train_step(params, opt_state, parallel.put_batch(batch, mesh),
                                      jax.random.key(i))
    losses.append(float(m["loss"]))
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                  "losses": losses}))
