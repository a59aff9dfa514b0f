"""Cross-entropy for next-token prediction, kept outside the model.

`cross_entropy_sum` returns the summed loss and the number of counted tokens rather than a mean,
so that callers can average over every unmasked token of a whole batch, across gradient
accumulation micro-batches too, instead of taking a mean of means.

Label smoothing with epsilon trains towards (1 - epsilon) * one_hot(target) + epsilon / V
(uniform over the V classes), which is (1 - epsilon) * NLL + epsilon * mean over v of -log p_v.
"""

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits_BTV, targets_BT, mask_BT=None, label_smoothing: float = 0.0):
    """(sum over counted tokens of the loss, number of counted tokens), both float32.

    mask_BT (optional, 0/1): which tokens count; the others contribute nothing, not even
    through their gradient.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll_BT = (1.0 - label_smoothing) * nll_BT - label_smoothing * logp_BTV.mean(axis=-1)
    if mask_BT is None:
        return nll_BT.sum(), jnp.asarray(nll_BT.size, jnp.float32)
    mask_BT = mask_BT.astype(jnp.float32)
    return jnp.where(mask_BT > 0, nll_BT, 0.0).sum(), mask_BT.sum()


def cross_entropy(logits_BTV, targets_BT, mask_BT=None, label_smoothing: float = 0.0):
    """Mean next-token cross-entropy over the counted tokens."""
    total, count = cross_entropy_sum(logits_BTV, targets_BT, mask_BT, label_smoothing)
    return total / jnp.maximum(count, 1.0)
