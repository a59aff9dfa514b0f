"""The optimizer: AdamW with linear warmup and cosine decay, as nanoGPT's train.py.

Weight decay applies to matrices and embeddings only (leaves named `kernel` or `embedding`),
never to biases or LayerNorm scales. Decay is chosen by name, not by `ndim == 2`, because the
blocks' params are stacked along a layer axis (a LayerNorm scale is 2-D there).
"""

import jax
import jax.numpy as jnp
import optax

from llm_jax.config import TrainConfig


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


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
