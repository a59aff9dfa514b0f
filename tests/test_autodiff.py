"""Automatic differentiation: the worked examples agree with hand derivations, finite
differences and closed forms; JAX's own gradient checker passes on the model's pieces."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from llm_jax import autodiff
from llm_jax import model as gpt
from llm_jax.errors import UserError
from llm_jax.loss import cross_entropy
from tests.conftest import TINY


# --- The demonstrations -------------------------------------------------------------------------


@pytest.mark.parametrize("w, b, x, y", [(0.6, -0.3, 2.0, 1.0), (-1.2, 0.4, -0.7, 1.0),
                                        (2.0, 1.0, 0.5, 0.0)])
def test_sigmoid_neuron_three_routes_agree_in_float64(w, b, x, y):
    with jax.enable_x64(True):
        assert jnp.asarray(1.0).dtype == jnp.float64
        r = autodiff.sigmoid_neuron(w, b, x, y)
    assert jnp.asarray(1.0).dtype == jnp.float32  # x64 mode was restored
    p = 1 / (1 + np.exp(-(w * x + b)))
    assert r["p"] == pytest.approx(p, rel=1e-14)
    want = np.array([(p - y) * x, p - y])  # the closed form, independently of the module
    for route in ("chain_rule", "simplified", "finite_diff", "autodiff"):
        got = np.array(r[route])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=route)
    assert autodiff.relative_spread(r) < 1e-6
    np.testing.assert_allclose(r["chain_rule"], r["autodiff"], rtol=1e-12)


def test_hidden_layer_backprop_by_hand_equals_jax_grad_and_a_step_lowers_the_loss():
    r = autodiff.hidden_layer()
    assert r["max_abs_diff"] < 1e-12
    for name in ("W1", "b1", "W2", "b2"):
        assert r["by_hand"][name].shape == r["autodiff"][name].shape
        assert np.max(np.abs(r["autodiff"][name])) > 1e-4, name  # a gradient that says something
    assert r["loss_after"] < r["loss"] - 0.01
    # dW1 is the sum over examples of outer(x_n, delta1_n)
    outer = sum(np.outer(x, d) for x, d in zip(r["X"], r["delta1"]))
    np.testing.assert_allclose(outer, r["by_hand"]["W1"], rtol=1e-12)


def test_film_perceptron_truth_table():
    table = {row[:3]: (row[3], row[4]) for row in autodiff.film_truth_table()}
    assert len(table) == 8
    for (weather, price, company), (total, go) in table.items():
        assert total == 8 * weather + 4 * price + 4 * company
        assert go == int(weather == 1 or (price == 1 and company == 1))


def test_logistic_neuron_learns_the_film_rule():
    r = autodiff.learn_film()
    assert r["accuracy_rule"] == 1.0 and r["accuracy_train"] == 1.0
    assert r["loss_after"] < 0.05 < r["loss_before"]
    w = r["w"]
    assert w[0] > w[1] > 0 and w[0] > w[2] > 0 and r["b"] < 0  # weather matters most
    assert np.all(r["learned"] == [row[4] for row in autodiff.film_truth_table()])


def test_compose_grad_of_grad_jacobians_and_per_example_gradients():
    r = autodiff.compose()
    assert r["second"] == pytest.approx(r["closed"], rel=1e-12)
    assert r["jac_fwd"].shape == (5, 3)
    np.testing.assert_allclose(r["jac_fwd"], r["jac_rev"], rtol=1e-12, atol=1e-14)
    assert r["per_example"].shape == (8, 3)
    np.testing.assert_allclose(r["per_example"], r["looped"], rtol=1e-12)
    np.testing.assert_allclose(r["per_example"].mean(0), r["mean_grad"], rtol=1e-12)


def test_command_line_prints_every_demonstration(capsys):
    autodiff.main(["all"])
    out = capsys.readouterr().out
    r = autodiff.sigmoid_neuron()
    assert f"{r['autodiff'][0]:18.13f}" in out
    assert "jax.grad" in out and "100.0% on all 8 inputs" in out
    assert "jacfwd and jacrev agree" in out and "one gradient-descent step" in out
    with pytest.raises(UserError, match="usage"):
        autodiff.main(["sigmoidd"])


# --- JAX's gradient checker on the model's pieces -----------------------------------------------


# attention and cross_entropy compute their softmax in float32 by design (x64 would not make them
# more precise), so they are checked in float32 with a finite-difference step of 1e-2.
F32_EPS = 1e-2


def test_check_grads_attention():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 5, 2, 4))
    visible = jnp.tril(jnp.ones((5, 5), bool))[None]
    check_grads(lambda q, k, v: gpt.attention(q, k, v, visible), (q, k, v), order=2,
                modes=("fwd", "rev"), eps=F32_EPS)


def test_check_grads_layer_norm():
    """The model's own LayerNorm (ln_f: eps 1e-5, with bias), built in float64 for a precise
    check."""
    with jax.enable_x64(True):
        cfg = dataclasses.replace(TINY, dtype="float64")
        graphdef, state = nnx.split(gpt.GPT(cfg, nnx.Rngs(0)).ln_f)
        assert set(state) == {"scale", "bias"}
        k_scale, k_bias, k_x = jax.random.split(jax.random.key(1), 3)
        scale = 1 + 0.3 * jax.random.normal(k_scale, (cfg.n_embd,), jnp.float64)
        bias = 0.1 * jax.random.normal(k_bias, (cfg.n_embd,), jnp.float64)
        x = jax.random.normal(k_x, (2, cfg.n_embd), jnp.float64)

        def norm(x, scale, bias):
            return nnx.merge(graphdef, nnx.State({"scale": scale, "bias": bias}))(x)

        assert norm(x, scale, bias).dtype == jnp.float64
        check_grads(norm, (x, scale, bias), order=2, modes=("fwd", "rev"))


def test_check_grads_cross_entropy():
    logits = 2 * jax.random.normal(jax.random.key(0), (2, 3, 7))
    targets = jnp.array([[0, 3, 6], [2, 2, 5]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    check_grads(lambda z: cross_entropy(z, targets), (logits,), order=2, modes=("fwd", "rev"),
                eps=F32_EPS)
    check_grads(lambda z: cross_entropy(z, targets, mask), (logits,), order=1,
                modes=("fwd", "rev"), eps=F32_EPS)
