"""Gradient inspection of the GPT: per-layer norms and update ratios from the train step,
activation statistics, input-token saliency and attention maps, each against an independent
computation (a separate jax.grad, the params before and after, model.forward)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax import inspection
from llm_jax import model as gpt
from llm_jax.config import TrainConfig
from llm_jax.loss import cross_entropy
from llm_jax.optim import make_optimizer
from llm_jax.step import make_train_step
from tests.conftest import TINY

T = TINY.block_size
L = TINY.n_layer
# Positions added in embed (learned; sinusoidal takes the same path) and rotary positions inside
# attention.
POSITIONS = ("learned", "rope")


def tiny(position: str):
    return TINY if position == "learned" else dataclasses.replace(TINY, position=position)


def copy(tree):
    return jax.tree.map(jnp.array, tree)


def per_layer_norm(tree_h, i):
    """Norm of layer i of the stacked blocks, by slicing: the definition, written plainly."""
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x)[i])) for x in jax.tree.leaves(tree_h))))


def norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(tree))))


@pytest.fixture(scope="module")
def stepped():
    """One optimizer step (AdamW with clipping and decay) on 2 micro-batches by the inspecting
    train step, and what a separate computation says about the same params and batch:
    (params before, params after, metrics, reference)."""
    graphdef, params = gpt.init_params(TINY, jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (2, 4, T), 0, TINY.vocab_size)
    y = jax.random.randint(jax.random.key(2), (2, 4, T), 0, TINY.vocab_size)
    tx = make_optimizer(TrainConfig(learning_rate=1e-2, warmup_iters=0, max_iters=10))
    new_params, _, metrics = make_train_step(graphdef, tx, inspect=True)(
        copy(params), tx.init(params), (x, y), jax.random.key(3))

    @jax.jit
    def reference(params):
        # The gradient of the mean loss over both micro-batches, in one call.
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(
            gpt.forward(graphdef, p, x.reshape(8, T)), y.reshape(8, T)))(params)
        streams = inspection.residual_streams(graphdef, params, x[0])
        head = gpt.merge(graphdef, params).head(streams[-1]).reshape(4, T, -1)
        return {"loss": loss, "grads": grads, "streams": streams, "head": head,
                "forward": gpt.forward(graphdef, params, x[0])}

    return params, new_params, metrics, reference(params)


def test_inspect_step_metrics_are_named_and_the_loss_is_the_steps(stepped):
    _, _, m, ref = stepped
    groups = [f"h.{i}" for i in range(L)] + ["wte", "wpe", "ln_f"]
    streams = ["embed"] + [f"h.{i}" for i in range(L)]
    assert set(m) == ({"loss", "grad_norm", "finite"} | {f"grad_norm/{g}" for g in groups}
                      | {f"update_ratio/{g}" for g in groups}
                      | {f"act_{s}/{w}" for s in ("mean", "std", "absmax") for w in streams})
    assert float(m["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-6)


def test_inspect_step_grad_norms_equal_a_separate_grad(stepped):
    _, _, m, ref = stepped
    grads = ref["grads"]
    for i in range(L):
        want = per_layer_norm(grads["h"], i)
        assert float(m[f"grad_norm/h.{i}"]) == pytest.approx(want, rel=1e-4)
    for group in ("wte", "wpe", "ln_f"):
        assert float(m[f"grad_norm/{group}"]) == pytest.approx(norm(grads[group]), rel=1e-4)
    total = sum(float(v) ** 2 for k, v in m.items() if k.startswith("grad_norm/"))
    assert np.sqrt(total) == pytest.approx(float(m["grad_norm"]), rel=1e-5)


def test_inspect_step_update_ratios_equal_the_change_in_params(stepped):
    params, new_params, m, _ = stepped
    for i in range(L):
        diff = jax.tree.map(jnp.subtract, new_params["h"], params["h"])
        want = per_layer_norm(diff, i) / per_layer_norm(params["h"], i)
        assert float(m[f"update_ratio/h.{i}"]) == pytest.approx(want, rel=1e-3)
    for group in ("wte", "wpe", "ln_f"):
        diff = jax.tree.map(jnp.subtract, new_params[group], params[group])
        assert float(m[f"update_ratio/{group}"]) == pytest.approx(
            norm(diff) / norm(params[group]), rel=1e-3)
    assert 1e-4 < float(m["update_ratio/h.0"]) < 1


def test_activation_stats_describe_the_models_own_residual_stream(stepped):
    _, _, m, ref = stepped
    streams = ref["streams"]
    assert len(streams) == L + 1 and streams[-1].shape == (4 * T, TINY.n_embd)
    # The model's head on the last stream gives model.forward's logits: the blocks were run as
    # the model runs them.
    np.testing.assert_allclose(ref["head"], ref["forward"], rtol=1e-5, atol=1e-5)
    for i, where in enumerate(["embed"] + [f"h.{j}" for j in range(L)]):
        s = np.asarray(streams[i])  # the first micro-batch, params before the update
        assert float(m[f"act_std/{where}"]) == pytest.approx(s.std(), rel=1e-4)
        assert float(m[f"act_mean/{where}"]) == pytest.approx(s.mean(), rel=1e-3, abs=1e-7)
        assert float(m[f"act_absmax/{where}"]) == pytest.approx(np.abs(s).max(), rel=1e-6)


@pytest.mark.parametrize("position_kind", POSITIONS)
def test_saliency_is_zero_after_the_predicted_position(position_kind):
    graphdef, params = gpt.init_params(tiny(position_kind), jax.random.key(0))
    idx = jax.random.randint(jax.random.key(4), (T,), 0, TINY.vocab_size)
    position = 9

    @jax.jit
    def run(params):
        saliency, target, logp = inspection.token_saliency(graphdef, params, idx, position)
        # Perturbing the token embeddings is the same as perturbing the blocks' input, since
        # embed adds the positions (or adds nothing, for rotary positions).
        m = gpt.merge(graphdef, params)

        def f(d_1TD):
            out = m.forward_embeddings(m.embed(idx[None]) + d_1TD)[0, position]
            return jax.nn.log_softmax(out)[target]

        g_1TD = jax.grad(f)(jnp.zeros((1, T, TINY.n_embd)))
        logits = gpt.forward(graphdef, params, idx[None])[0, position]
        return saliency, target, logp, logits, jnp.linalg.norm(g_1TD[0], axis=-1)

    saliency, target, logp, logits, want = jax.device_get(run(params))
    assert saliency.shape == (T,)
    assert np.all(saliency[position + 1:] == 0.0)  # exactly: causal attention
    assert np.all(saliency[: position + 1] > 0)
    assert int(target) == int(np.argmax(logits))
    assert float(logp) == pytest.approx(float(jax.nn.log_softmax(logits)[target]), rel=1e-5)
    np.testing.assert_allclose(saliency, want, rtol=1e-4, atol=1e-8)


def rebuild_from_maps(graphdef, params, idx_T, maps_LHTT):
    """The forward pass with the attention weights given: y = weights @ v, then the rest of each
    block as GPT-2 has it, then the head."""
    model = gpt.merge(graphdef, params)
    cfg = model.cfg
    x = model.embed(idx_T[None]).reshape(T, cfg.n_embd)
    block_def, block_state = nnx.split(model.h)
    for i in range(cfg.n_layer):
        blk = nnx.merge(block_def, jax.tree.map(lambda a: a[i], block_state))
        v = jnp.split(blk.attn.c_attn(blk.ln_1(x)), 3, axis=-1)[2]
        v_THK = v.reshape(T, cfg.n_head, cfg.head_dim)
        y = jnp.einsum("hts,shk->thk", maps_LHTT[i], v_THK).reshape(T, cfg.n_embd)
        x = x + blk.attn.c_proj(y)
        x = x + blk.mlp(blk.ln_2(x))
    return model.head(x)


@pytest.mark.parametrize("position_kind", POSITIONS)
def test_attention_maps_rebuild_the_models_output(position_kind):
    cfg = tiny(position_kind)
    graphdef, params = gpt.init_params(cfg, jax.random.key(5))
    # Larger query/key weights than at init, so that the weights are far from uniform and a
    # wrong map would show in the output.
    params["h"]["attn"]["c_attn"]["kernel"] = params["h"]["attn"]["c_attn"]["kernel"] * 15
    idx = jax.random.randint(jax.random.key(6), (T,), 0, cfg.vocab_size)
    uniform_TT = jnp.tril(jnp.ones((T, T))) / jnp.arange(1, T + 1)[:, None]

    @jax.jit
    def run(params):
        maps = inspection.attention_maps(graphdef, params, idx)
        uniform = jnp.broadcast_to(uniform_TT, maps.shape)
        return (maps, rebuild_from_maps(graphdef, params, idx, maps),
                rebuild_from_maps(graphdef, params, idx, uniform),
                gpt.forward(graphdef, params, idx[None])[0])

    maps, rebuilt, rebuilt_uniform, want = jax.device_get(run(params))
    assert maps.shape == (cfg.n_layer, cfg.n_head, T, T)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    above = np.triu_indices(T, 1)
    assert np.all(maps[..., above[0], above[1]] == 0.0)  # causal, exactly
    assert maps.max(-1).mean() > 0.35  # peaked: uniform weights would give 0.21
    np.testing.assert_allclose(rebuilt, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(rebuilt_uniform, want, atol=1e-3)  # a wrong map shows


def test_group_norms_of_a_deeper_stack():
    cfg = dataclasses.replace(TINY, n_layer=3)
    _, params = gpt.abstract_params(cfg)
    ones = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), params)
    norms = jax.jit(inspection.group_norms)(ones)
    assert set(norms) == {"wte", "wpe", "ln_f", "h.0", "h.1", "h.2"}
    per_block = sum(x.size for x in jax.tree.leaves(ones["h"])) / 3
    for i in range(3):
        assert float(norms[f"h.{i}"]) == pytest.approx(np.sqrt(per_block))
    assert float(norms["ln_f"]) == pytest.approx(np.sqrt(2 * cfg.n_embd))  # scale and bias
