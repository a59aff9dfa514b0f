"""Cross-entropy for next-token prediction, kept outside the model.

`cross_entropy_sum` returns the summed loss and the number of counted tokens rather than a mean,
so that callers can average over every unmasked token of a whole batch, across gradient
accumulation micro-batches too, instead of taking a mean of means.
"""

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits_BTV, targets_BT, mask_BT=None):
    """(sum over counted tokens of -log p(target), number of counted tokens), both float32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    if mask_BT is None:
        return nll_BT.sum(), jnp.asarray(nll_BT.size, jnp.float32)
    mask_BT = mask_BT.astype(jnp.float32)
    return (nll_BT * mask_BT).sum(), mask_BT.sum()


def cross_entropy(logits_BTV, targets_BT, mask_BT=None):
    """Mean next-token cross-entropy over the counted tokens."""
    total, count = cross_entropy_sum(logits_BTV, targets_BT, mask_BT)
    return total / jnp.maximum(count, 1.0)
