"""Looking inside a GPT: gradient norms per layer, update ratios, activation statistics,
input-token saliency and attention maps. Pure functions of (graphdef, params, ...), safe in jit.

Shapes as in llm_jax/model.py: B batch, T time, D width, H heads, K head dim, V vocabulary,
L layers, N = B*T rows of the residual stream.

The train step made by `make_train_step(graphdef, tx, inspect=True)` (llm_jax/step.py) adds
these metrics; training runs it every `train.inspect_interval` steps and writes them, one
record per inspection, to `out_dir/metrics.jsonl` under flat names:
- `grad_norm/<g>`: L2 norm of the step's gradient (the mean over the step's tokens, before
  clipping) for each group g: one per block, `h.0` ... `h.{L-1}` (the blocks' params are stacked
  along a leading layer axis), and one per other top-level entry of params (`wte`, `wpe`,
  `ln_f`);
- `update_ratio/<g>`: ||update|| / ||param|| for the same groups, where update is what the
  optimizer added to the params this step (learning rate, clipping and weight decay included):
  about 1e-3 is the usual healthy figure, much larger means the layer is changing too fast;
- `act_mean/<s>`, `act_std/<s>`, `act_absmax/<s>`: the residual stream on the step's first
  micro-batch, without dropout, after the embeddings (`s = embed`) and after each block
  (`s = h.0` ...).

Design choices:
- The blocks are run one at a time from the model's own submodules (`nnx.split(model.h)`,
  the stacked state indexed per layer), so what is measured is the model's computation, not a
  copy of it; the tests check the pieces against `model.forward`.
- Saliency differentiates with respect to a zero `delta` added to the token embedding's output
  (`model.wte(idx)`), so it measures the tokens themselves whatever `embed` does with positions.
- Rotary positions (`position="rope"`) are applied to q and k as the model does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax import model as gpt


# --- Norms per layer ----------------------------------------------------------------------------


def group_norms(tree: dict) -> dict:
    """L2 norm per group of a params-shaped tree: one per block (h.0 ...) and per other entry."""
    out = {}
    for name, sub in tree.items():
        leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(sub)]
        if name == "h":  # stacked blocks: sum the squares over every axis but the layer axis
            sq_L = sum(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in leaves)
            out.update({f"h.{i}": jnp.sqrt(sq_L[i]) for i in range(sq_L.shape[0])})
        else:
            out[name] = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))
    return out


def update_metrics(params: dict, grads: dict, updates: dict) -> dict:
    """grad_norm/<group> and update_ratio/<group> for one optimizer step (params before it)."""
    g, u, p = group_norms(grads), group_norms(updates), group_norms(params)
    out = {f"grad_norm/{k}": v for k, v in g.items()}
    out.update({f"update_ratio/{k}": u[k] / jnp.maximum(p[k], 1e-30) for k in p})
    return out


# --- The residual stream, one block at a time ---------------------------------------------------


def _blocks(model):
    """The L blocks of a merged model as separate modules, from the stacked params."""
    block_def, block_state = nnx.split(model.h)
    n_layer = jax.tree.leaves(block_state)[0].shape[0]
    return [nnx.merge(block_def, jax.tree.map(lambda a, i=i: a[i], block_state))
            for i in range(n_layer)]


def residual_streams(graphdef, params: dict, idx_BT) -> list:
    """The residual stream (N, D) after the embeddings and after each block: L + 1 arrays.
    Without dropout; the model's head applied to the last one gives `model.forward`'s logits."""
    model = gpt.merge(graphdef, params)
    B, T = idx_BT.shape
    rope = model.rope(jnp.arange(T)[None])  # None unless positions are rotary
    x_ND = model.embed(idx_BT).reshape(B * T, -1)
    streams = [x_ND]
    for block in _blocks(model):
        x_ND = block(x_ND, T, None, rope)
        streams.append(x_ND)
    return streams


def activation_stats(graphdef, params: dict, idx_BT) -> dict:
    """act_mean/<s>, act_std/<s>, act_absmax/<s> of the residual stream, s = embed, h.0, ..."""
    out = {}
    for i, x_ND in enumerate(residual_streams(graphdef, params, idx_BT)):
        where = "embed" if i == 0 else f"h.{i - 1}"
        x_ND = x_ND.astype(jnp.float32)
        out[f"act_mean/{where}"] = jnp.mean(x_ND)
        out[f"act_std/{where}"] = jnp.std(x_ND)
        out[f"act_absmax/{where}"] = jnp.max(jnp.abs(x_ND))
    return out


# --- Saliency and attention maps for one prompt -------------------------------------------------


class _ShiftedEmbed(nnx.Module):
    """The token embedding plus an additive `delta` on its output; the output head still uses
    the original table through `attend`."""

    def __init__(self, embed, delta_BTD):
        self.embed = embed
        self.delta = nnx.Variable(delta_BTD)

    def __call__(self, idx_BT):
        e_BTD = self.embed(idx_BT)
        return (e_BTD + self.delta[...]).astype(e_BTD.dtype)

    def attend(self, x):
        return self.embed.attend(x)


def token_saliency(graphdef, params: dict, idx_T, position: int = -1, target=None):
    """How much each input token matters for one prediction: (saliency (T,), target, log p).

    saliency[t] = || d log p(target | tokens 0..position) / d e_t ||, with e_t token t's
    embedding (the output of `wte`). target defaults to the model's most likely next token at
    `position`. Tokens after `position` cannot influence it (causal attention): their saliency
    is exactly zero.
    """
    T = idx_T.shape[0]
    position = position % T
    model_cfg = gpt.merge(graphdef, params).cfg

    def logp(delta_1TD):
        model = gpt.merge(graphdef, params)
        model.wte = _ShiftedEmbed(model.wte, delta_1TD)
        logp_V = jax.nn.log_softmax(model(idx_T[None])[0, position])
        chosen = jnp.argmax(logp_V) if target is None else jnp.asarray(target)
        return logp_V[chosen], chosen

    delta = jnp.zeros((1, T, model_cfg.n_embd), jnp.float32)
    (value, chosen), grad_1TD = jax.value_and_grad(logp, has_aux=True)(delta)
    return jnp.linalg.norm(grad_1TD[0], axis=-1), chosen, value


def attention_maps(graphdef, params: dict, idx_T):
    """Attention weights (L, H, T, T) of every block and head for one prompt: row t is how
    query t spreads over keys 0..t. Recomputed from each block's ln_1 and attn.c_attn the way
    `CausalSelfAttention` forms q and k; the stream then goes on through the block itself."""
    model = gpt.merge(graphdef, params)
    cfg = model.cfg
    T = idx_T.shape[0]
    rope = model.rope(jnp.arange(T)[None])  # None unless positions are rotary
    x_ND = model.embed(idx_T[None]).reshape(T, -1)
    causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
    maps = []
    for block in _blocks(model):
        q, k, _ = jnp.split(block.attn.c_attn(block.ln_1(x_ND)), 3, axis=-1)
        q_1THK, k_1THK = (a.reshape(1, T, cfg.n_head, cfg.head_dim) for a in (q, k))
        if rope is not None:
            q_1THK, k_1THK = gpt.apply_rope(q_1THK, rope), gpt.apply_rope(k_1THK, rope)
        scores_HTT = jnp.einsum("thk,shk->hts", q_1THK[0], k_1THK[0]).astype(jnp.float32)
        scores_HTT = jnp.where(causal_TT, scores_HTT / math.sqrt(cfg.head_dim), -jnp.inf)
        maps.append(jax.nn.softmax(scores_HTT, axis=-1))
        x_ND = block(x_ND, T, None, rope)
    return jnp.stack(maps)


def log_step(log, step: int, metrics: dict) -> None:
    """One console line and one metrics.jsonl record with the inspect step's statistics."""
    def order(name):  # the other groups first, then the blocks by number (h.2 before h.10)
        kind, _, group = name.partition("/")
        block = group.startswith("h.") and group[2:].isdigit()
        return (kind, int(group[2:]), "") if block else (kind, -1, group)

    stats = {k: float(metrics[k]) for k in sorted((k for k in metrics if "/" in k), key=order)}

    def per_block(prefix, fmt):
        return " ".join(format(v, fmt) for k, v in stats.items() if k.startswith(prefix + "/h."))

    log(f"step {step}: per block: grad norm {per_block('grad_norm', '.3f')}; update/param "
        f"{per_block('update_ratio', '.1e')}; residual std {per_block('act_std', '.2f')}",
        step=step, **stats)
