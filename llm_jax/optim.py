"""The optimizer: AdamW with linear warmup and cosine decay, as nanoGPT's train.py.

Weight decay applies to matrices and embeddings only (leaves named `kernel` or `embedding`),
never to biases or LayerNorm scales. Decay is chosen by name, not by `ndim == 2`, because the
blocks' params are stacked along a layer axis (a LayerNorm scale is 2-D there).

Freezing (`train.freeze`, for fine-tuning): comma-separated regular expressions over parameter
paths as GPT-2 names them per layer (`wte.embedding`, `h.3.attn.c_attn.kernel`, `ln_f.scale`),
each matching a path from its start up to a dot: "wte" freezes the token embedding, "h.0" the
first block (not h.10), "h" every block, "h.[0-5].mlp" the MLPs of blocks 0-5. Leaves frozen
whole get `optax.set_to_zero` through `optax.multi_transform` (no Adam state is kept for them,
and they are left out of gradient clipping); layers frozen inside a stacked leaf are zeroed
by a mask along its layer axis, on the gradients (before clipping) and on the updates (after
weight decay). A frozen param is bit for bit what it was.

Gradient clipping (`train.grad_clip`) scales the gradients by min(1, grad_clip / global norm),
as `optax.clip_by_global_norm`, written as one scalar multiply that XLA fuses into the Adam
update. The train step passes the global norm it already took for its metrics
(`tx.update(..., grad_norm=)`), so the gradients are read once less; with frozen params the
clip takes the norm of the trained ones itself.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax.config import TrainConfig
from llm_jax.errors import UserError


def learning_rate(cfg: TrainConfig):
    """step -> learning rate: linear warmup to learning_rate, cosine down to min_lr, then flat."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
        progress = (step - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
        decayed = cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)
        return jnp.where(step < cfg.warmup_iters, warm, decayed)

    return schedule


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def frozen_mask(params, spec: str):
    """Per leaf of params (arrays or shapes): False (trained), True (frozen whole), or a bool
    array (L, 1, ..., 1) marking the frozen layers of a stacked block param."""
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    try:
        compiled = [re.compile(rf"(?:{p})(?:\..*)?") for p in patterns]
    except re.error as e:
        raise UserError(f"train.freeze={spec!r} is not a list of regular expressions: {e}") \
            from None
    used = set()

    def frozen(name: str) -> bool:
        hits = {i for i, c in enumerate(compiled) if c.fullmatch(name)}
        used.update(hits)
        return bool(hits)

    def leaf(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if not name.startswith("h."):
            return frozen(name)
        layers = np.array([frozen(f"h.{i}.{name[2:]}") for i in range(x.shape[0])])
        if layers.all() or not layers.any():
            return bool(layers.all())
        return layers.reshape((-1,) + (1,) * (len(x.shape) - 1))

    mask = jax.tree_util.tree_map_with_path(leaf, params)
    for i, p in enumerate(patterns):
        if i not in used:
            raise UserError(f"train.freeze pattern {p!r} matches no parameter; paths look like "
                            "wte.embedding, h.0.attn.c_attn.kernel, ln_f.scale")
    return mask


def zero_frozen_layers(mask) -> optax.GradientTransformation:
    """Zero the updates of the layers that `mask`'s array leaves mark (whole leaves pass)."""
    def zero(updates, params=None):
        del params
        return jax.tree.map(lambda u, m: u if isinstance(m, bool) else jnp.where(m, 0.0, u),
                            updates, mask)

    return optax.stateless(zero)


def clip_by_global_norm(max_norm: float, given_norm: bool = True):
    """Scale the updates by min(1, max_norm / their global norm). With given_norm, a
    `grad_norm=` extra argument to update (the norm of exactly these updates) is used instead
    of taking it again."""
    def update(updates, state, params=None, grad_norm=None, **extra_args):
        del params, extra_args
        norm = grad_norm if given_norm and grad_norm is not None else optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: TrainConfig, params=None) -> optax.GradientTransformationExtraArgs:
    """AdamW as configured; with train.freeze, `params` (arrays or shapes) names the leaves."""
    adamw = optax.adamw(learning_rate(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    clip = clip_by_global_norm(cfg.grad_clip, given_norm=not cfg.freeze)
    tx = optax.chain(clip, adamw) if cfg.grad_clip > 0 else adamw
    if not cfg.freeze:
        return tx
    if params is None:
        raise ValueError("train.freeze needs the params (or their shapes) to name the leaves")
    mask = frozen_mask(params, cfg.freeze)
    labels = jax.tree.map(lambda m: "frozen" if m is True else "trained", mask)
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    if all(isinstance(m, bool) for m in jax.tree.leaves(mask)):
        return tx
    return optax.chain(zero_frozen_layers(mask), tx, zero_frozen_layers(mask))
