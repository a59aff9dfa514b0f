"""The train and eval steps: pure functions, jitted once.

`train_step(params, opt_state, batch, key) -> (params, opt_state, metrics)`. The batch holds
`grad_accum` micro-batches, (A, B, T) each: `(x, y)` (inputs, targets), or `(x, y, mask)`, or
`(x, y, mask, segment_ids)` for fine-tuning (llm_jax/sft.py): the loss counts the targets where
mask is 1 (an answer's tokens, not its prompt or padding), and segment ids keep packed
examples from attending to each other (None: one sequence per row). Gradients of the *summed*
loss are added over micro-batches in a `lax.scan` and divided once by the total count of
counted tokens, so the result is the gradient of the mean over every counted token of the step,
however it is split and however unevenly the masks fall (never a mean of means).
params and opt_state are donated: their buffers are reused for the updated values. A step
whose loss or gradient norm is NaN or Inf changes nothing (metrics["finite"] is False); the
training loop reports it, and stops with train.nonfinite=stop. The gradient norm is taken once
and handed to the optimizer's clipping (llm_jax/optim.py).

`make_train_step(graphdef, tx, inspect=True)` compiles a second variant of the same step whose
metrics also hold per-layer gradient norms, update-to-parameter ratios and residual-stream
statistics (llm_jax/inspection.py names them). Training calls it only every
`train.inspect_interval` steps, so the other steps pay nothing for inspection.

`make_train_step(..., mesh=mesh)` writes the data parallelism out (`per_device`): each device
computes the gradient of its own rows under `shard_map` and one psum adds them up. Without a
mesh, jit partitions the step itself from the shardings of its inputs (GSPMD), which also
covers fully sharded params; on per-core CPU devices the written-out step measured 3-5 %
faster (docs/benchmarks.md), so training uses it there (`parallel.Placement.per_device_mesh`).
"""

import jax
import jax.numpy as jnp
import optax

from llm_jax import model as gpt
from llm_jax.inspection import activation_stats, update_metrics
from llm_jax.loss import cross_entropy_sum


def make_train_step(graphdef, tx: optax.GradientTransformation, inspect: bool = False,
                    label_smoothing: float = 0.0, mesh=None):
    def summed_loss(params, x_BT, y_BT, mask_BT, seg_BT, key):
        logits_BTV = gpt.forward(graphdef, params, x_BT, key, segment_ids_BT=seg_BT)
        return cross_entropy_sum(logits_BTV, y_BT, mask_BT, label_smoothing=label_smoothing)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def summed_grads(params, x_ABT, y_ABT, mask_ABT, seg_ABT, key):
        """(loss summed over the counted targets, their count), gradient of that sum."""
        keys_A = jax.random.split(key, x_ABT.shape[0])
        if x_ABT.shape[0] == 1:
            first = (None if a is None else a[0] for a in (x_ABT, y_ABT, mask_ABT, seg_ABT))
            (loss_sum, count), grads = grad_fn(params, *first, keys_A[0])
            return loss_sum, count, grads

        def micro_step(carry, xs):
            grads_acc, loss_acc, count_acc = carry
            (loss_sum, count), grads = grad_fn(params, *xs)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, loss_acc + loss_sum, count_acc + count), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.float32(0), jnp.float32(0))
        (grads, loss_sum, count), _ = jax.lax.scan(
            micro_step, init, (x_ABT, y_ABT, mask_ABT, seg_ABT, keys_A))
        return loss_sum, count, grads

    if mesh is not None:
        summed_grads = per_device(summed_grads, mesh)

    def train_step(params, opt_state, batch, key):
        x_ABT, y_ABT, mask_ABT, seg_ABT = (*batch, None, None)[:4]
        loss_sum, count, grads = summed_grads(params, x_ABT, y_ABT, mask_ABT, seg_ABT, key)
        count = jnp.maximum(count, 1.0)  # all masks 0: zero gradients, not NaN
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss_sum / count, "grad_norm": grad_norm}
        if inspect:
            metrics.update(activation_stats(graphdef, params, x_ABT[0]))

        def update(params, opt_state):
            updates, opt_state = optax.with_extra_args_support(tx).update(
                grads, opt_state, params, grad_norm=grad_norm)
            extra = update_metrics(params, grads, updates) if inspect else {}
            return optax.apply_updates(params, updates), opt_state, extra

        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        params, opt_state, extra = unless_nonfinite(metrics["finite"], update, params, opt_state)
        metrics.update(extra)
        return params, opt_state, metrics

    return jax.jit(train_step, donate_argnums=(0, 1))


def unless_nonfinite(finite, update, params, opt_state, branch: bool | None = None):
    """update(params, opt_state) -> (params, opt_state, extra metrics) where `finite`, else
    params and opt_state as they were (and NaN extra metrics). branch: a `lax.cond` (True) or
    a select (False); None picks by backend, as below.

    On CPU a `lax.cond`: XLA:CPU does not fuse a select into the loops that write Adam's three
    outputs (params and both moments), so the select version copied the moments and read the
    optimizer state about twice as often; the cond made the Tiny Shakespeare step 4 % faster
    (docs/benchmarks.md). Elsewhere the select of before, which the GPU and TPU compilers fuse
    into the update (not measured here against a cond)."""
    if branch is None:
        branch = jax.default_backend() == "cpu"
    if branch:
        def skip(params, opt_state):
            extra = jax.eval_shape(update, params, opt_state)[2]
            return params, opt_state, jax.tree.map(
                lambda s: jnp.full(s.shape, jnp.nan, s.dtype), extra)

        return jax.lax.cond(finite, update, skip, params, opt_state)
    new_params, new_opt_state, extra = update(params, opt_state)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state),
            jax.tree.map(lambda e: jnp.where(finite, e, jnp.nan), extra))


def per_device(summed_grads, mesh):
    """summed_grads written out per device: each device takes its own rows of every
    micro-batch (shard_map over the data axes) and the loss sums, counts and gradients are
    added over the devices in one psum at the end. Params stay replicated; each device's
    dropout key is folded with its index, so dropout masks depend on the device count.
    Measured faster than the jitted GSPMD step on per-core CPU devices (llm_jax/cpu.py)."""
    from jax import shard_map
    from jax.sharding import PartitionSpec as P

    from llm_jax.parallel import AXES

    def local(params, x_AbT, y_AbT, mask_AbT, seg_AbT, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(AXES))
        return jax.lax.psum(summed_grads(params, x_AbT, y_AbT, mask_AbT, seg_AbT, key), AXES)

    def sharded(params, x_ABT, y_ABT, mask_ABT, seg_ABT, key):
        rows = P(None, AXES)
        specs = (P(), rows, rows, None if mask_ABT is None else rows,
                 None if seg_ABT is None else rows, P())
        # check_vma=False: the gradients inside are each device's own (no implicit sum over
        # devices for the replicated params), so the one psum above adds them exactly once.
        return shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(),
                         check_vma=False)(params, x_ABT, y_ABT, mask_ABT, seg_ABT, key)

    return sharded


def make_eval_step(graphdef):
    def eval_step(params, x_BT, y_BT, mask_BT=None, seg_BT=None):
        logits_BTV = gpt.forward(graphdef, params, x_BT, segment_ids_BT=seg_BT)
        loss_sum, count = cross_entropy_sum(logits_BTV, y_BT, mask_BT)
        return loss_sum / jnp.maximum(count, 1.0)

    return jax.jit(eval_step)
