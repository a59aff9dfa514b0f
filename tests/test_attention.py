"""The attention ladder: every implementation against the reference, the reference against the
formula in NumPy and against llm_jax/model.py, the mask helpers, and flash's memory claim.

Tolerances: float32 throughout; forward and gradients within atol = rtol = 1e-5 of the
reference (the differences seen are ~1e-6, summation order only); the reference within 1e-5 of a
float64 NumPy evaluation; the reference and model.py's attention bit for bit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from llm_jax import attention as A
from llm_jax.attention import attention

H, K, BLOCK = 2, 8, 8
TOL = dict(atol=1e-5, rtol=1e-5)


def random_qkv(B, T, S, seed=0, dtype=np.float32):
    """q, k, v and a cotangent for the output (NumPy's generator: no random-kernel compiles)."""
    rng = np.random.default_rng(seed)
    shapes = [(B, T, H, K), (B, S, H, K), (B, S, H, K), (B, T, H, K)]
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes)


def mixed_kv_mask(S):
    """Three sequences: all real; left padding (under a causal mask its first rows see no key);
    every key padded (every row sees nothing)."""
    return jnp.stack([jnp.ones(S, bool), jnp.arange(S) >= S // 3, jnp.zeros(S, bool)])


# name: (T, S, causal, kv_mask_BS, q_mask_BT); B = 3. With BLOCK = 8: 29, 21 and 34 are not
# multiples of the block, and the 5 queries of "cross" are fewer than a block.
ENCODER_MASK_BS = A.padding_mask(jnp.array([21, 13, 0]), 21)
CASES = {
    "causal": (29, 29, True, None, None),
    "padding (encoder)": (21, 21, False, ENCODER_MASK_BS, ENCODER_MASK_BS),
    "causal+padding": (32, 32, True, mixed_kv_mask(32), None),
    "cross": (5, 34, False, A.padding_mask(jnp.array([34, 7, 0]), 34), None),
}

_results = {}


def run(impl: str, case: str):
    """(y, (dq, dk, dv)) of sum(attention(q, k, v) * cotangent), cached per (impl, case)."""
    if (impl, case) not in _results:
        T, S, causal, kv_mask_BS, q_mask_BT = CASES[case]
        q, k, v, ct = random_qkv(3, T, S)

        def loss(q, k, v):
            y = attention(q, k, v, causal=causal, kv_mask_BS=kv_mask_BS, q_mask_BT=q_mask_BT,
                          impl=impl, block_size=BLOCK)
            return jnp.sum(y * ct), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        _results[impl, case] = (np.asarray(y), [np.asarray(g) for g in grads])
    return _results[impl, case]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["xla", "flash"])
def test_matches_reference_forward_and_gradients(impl, case):
    y_ref, grads_ref = run("reference", case)
    y, grads = run(impl, case)
    np.testing.assert_allclose(y, y_ref, **TOL)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, err_msg=f"d{name}", **TOL)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", list(A.IMPLEMENTATIONS))
def test_rows_that_see_no_key_are_zero_with_zero_gradients(impl, case):
    T, S, causal, kv_mask_BS, q_mask_BT = CASES[case]
    y, (dq, dk, dv) = run(impl, case)
    assert all(np.isfinite(a).all() for a in (y, dq, dk, dv))
    sees_BT = np.asarray(A.visible_mask(T, S, causal, kv_mask_BS).any(-1))
    sees_BT = np.broadcast_to(sees_BT, (3, T))
    if q_mask_BT is not None:  # padded queries: zeros, whatever keys they see
        q_mask_BT = np.asarray(q_mask_BT)
        assert (~q_mask_BT & sees_BT).any()
        assert (y[~q_mask_BT] == 0).all() and (dq[~q_mask_BT] == 0).all()
    if kv_mask_BS is not None:
        assert not sees_BT.all()  # the case has such rows
        assert (y[~sees_BT] == 0).all() and (dq[~sees_BT] == 0).all()
        # padded keys get no gradient: no query looked at them
        assert (dk[~np.asarray(kv_mask_BS)] == 0).all() and (dv[~np.asarray(kv_mask_BS)] == 0).all()


def numpy_attention(q, k, v, visible_BTS):
    """The formula in float64, row by row over the visible keys only; rows seeing none: 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H_, K_ = q.shape
    visible_BTS = np.broadcast_to(np.asarray(visible_BTS), (B, T, k.shape[1]))
    y = np.zeros_like(q)
    for b in range(B):
        for h in range(H_):
            scores_TS = q[b, :, h] @ k[b, :, h].T / math.sqrt(K_)
            for t in range(T):
                seen = visible_BTS[b, t]
                if seen.any():
                    w = np.exp(scores_TS[t, seen] - scores_TS[t, seen].max())
                    y[b, t, h] = (w / w.sum()) @ v[b, seen, h]
    return y


@pytest.mark.parametrize("case", ["causal+padding", "cross"])
def test_reference_is_the_formula(case):
    T, S, causal, kv_mask_BS, _ = CASES[case]
    q, k, v, _ = random_qkv(3, T, S, seed=1)
    y = attention(q, k, v, causal=causal, kv_mask_BS=kv_mask_BS)
    expected = numpy_attention(q, k, v, A.visible_mask(T, S, causal, kv_mask_BS))
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5)


def dropout_as_of_issue5(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def model_attention_frozen(q_BTHK, k_BSHK, v_BSHK, visible_BTS, key=None, rate=0.0):
    """llm_jax/model.py's `attention` when this module was written, verbatim."""
    K = q_BTHK.shape[3]
    scores_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK).astype(jnp.float32)
    scores_BHTS = scores_BHTS / math.sqrt(K)
    scores_BHTS = jnp.where(visible_BTS[:, None], scores_BHTS, jnp.finfo(jnp.float32).min)
    weights_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    weights_BHTS = dropout_as_of_issue5(weights_BHTS, rate, key).astype(v_BSHK.dtype)
    return jnp.einsum("bhts,bshk->bthk", weights_BHTS, v_BSHK)


@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("which", ["as of issue 5", "model.py now"])
def test_reference_is_model_attention_bit_for_bit(which, rate):
    if which == "as of issue 5":
        other = model_attention_frozen
    else:
        from llm_jax import model
        other = getattr(model, "attention", None)
        if other is None:
            pytest.skip("model.py has no `attention` any more")
    q, k, v, ct = random_qkv(2, 16, 16, seed=2)
    # an rbg key compiles far faster than threefry; both sides draw from the same one
    key = jax.random.key(3, impl="unsafe_rbg") if rate else None
    causal_1TT = A.causal_mask(16)[None]

    def outputs_and_grads(q, k, v):
        ours = lambda *a: attention(*a, causal=True, dropout_rate=rate, dropout_key=key)
        theirs = lambda *a: other(*a, causal_1TT, key, rate)
        return [(f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1, 2))(q, k, v))
                for f in (ours, theirs)]

    (y_ours, g_ours), (y_theirs, g_theirs) = jax.jit(outputs_and_grads)(q, k, v)
    np.testing.assert_array_equal(y_ours, y_theirs)
    for a, b in zip(g_ours, g_theirs):
        np.testing.assert_array_equal(a, b)


def test_mask_helpers():
    np.testing.assert_array_equal(A.causal_mask(3), [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(A.padding_mask(jnp.array([2, 0, 3]), 3),
                                  [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    lengths = jnp.array([2, 3])
    np.testing.assert_array_equal(A.encoder_mask(lengths, 3),
                                  [[[1, 1, 0]] * 3, [[1, 1, 1]] * 3])
    np.testing.assert_array_equal(A.decoder_mask(lengths, 3),
                                  [[[1, 0, 0], [1, 1, 0], [1, 1, 0]],
                                   [[1, 0, 0], [1, 1, 0], [1, 1, 1]]])
    np.testing.assert_array_equal(A.cross_mask(jnp.array([1, 4]), 2, 4),
                                  [[[1, 0, 0, 0]] * 2, [[1, 1, 1, 1]] * 2])
    # attention's arguments stand for these masks
    pad_BT = A.padding_mask(lengths, 3)
    np.testing.assert_array_equal(A.visible_mask(3, 3, True, pad_BT), A.decoder_mask(lengths, 3))
    np.testing.assert_array_equal(A.visible_mask(3, 3, False, pad_BT), A.encoder_mask(lengths, 3))
    np.testing.assert_array_equal(A.visible_mask(3, 3, True)[0], A.causal_mask(3))


def test_refusals_are_clear():
    q, k, v, _ = random_qkv(1, 4, 6)
    trace = lambda **kw: jax.eval_shape(lambda: attention(q, k, v, **kw))  # no compiling
    with pytest.raises(ValueError, match="choose one of: reference, xla, flash"):
        trace(impl="pallas")
    with pytest.raises(ValueError, match="causal.*T=4, S=6"):
        trace(causal=True)
    with pytest.raises(ValueError, match="kv_mask_BS has shape"):
        trace(kv_mask_BS=jnp.ones((1, 4), bool))
    key = jax.random.key(0, impl="unsafe_rbg")
    for impl in ("xla", "flash"):
        with pytest.raises(ValueError, match=f"{impl!r} has no dropout"):
            trace(impl=impl, dropout_rate=0.1, dropout_key=key)
        # evaluation (no key) ignores the rate, as dropout() does
        assert trace(impl=impl, dropout_rate=0.1).shape == q.shape


def test_flash_custom_vjp_against_finite_differences():
    mask_BS = mixed_kv_mask(11)[:2]
    with jax.enable_x64(True):
        q, k, v, _ = random_qkv(2, 11, 11, seed=6, dtype=np.float64)
        f = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, kv_mask_BS=mask_BS,
                                              impl="flash", block_size=4))
        check_grads(f, (q, k, v), order=1, modes=["rev"])


def test_flash_skips_the_tiles_above_the_diagonal():
    # NaN keys and values in the last key tile: a skipped tile cannot spread them, a masked one
    # would (0 * NaN) to every query tile, in the forward and in dq.
    T = 24
    q, k, v, ct = random_qkv(1, T, T, seed=7)
    k, v = k.at[:, 16:].set(jnp.nan), v.at[:, 16:].set(jnp.nan)

    def loss(q):
        y = attention(q, k, v, causal=True, impl="flash", block_size=8)
        return jnp.sum(y[:, :16] * ct[:, :16]), y

    (_, y), dq = jax.jit(jax.value_and_grad(loss, has_aux=True))(q)
    assert np.isfinite(np.asarray(y[:, :16])).all() and np.isnan(np.asarray(y[:, 16:])).all()
    assert np.isfinite(np.asarray(dq[:, :16])).all()


def largest_intermediate(jaxpr) -> int:
    """The most elements of any value computed anywhere in a jaxpr, its loop bodies included."""
    most = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            most = max(most, math.prod(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    most = max(most, largest_intermediate(sub))
    return most


def test_flash_memory_is_linear_never_a_T_by_S_array():
    T = S = 2048  # B = 1, H = 2: a tile of the loops is (1, 2, 256, 256), an eighth of T * S
    shapes = [jax.ShapeDtypeStruct((1, T, H, K), jnp.float32)] * 4

    def forward_backward(impl):
        def loss(q, k, v, ct):
            return jnp.sum(attention(q, k, v, causal=True, impl=impl, block_size=256) * ct)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))

    flash = forward_backward("flash")
    reference = forward_backward("reference")
    assert largest_intermediate(jax.make_jaxpr(flash)(*shapes).jaxpr) < T * S
    assert largest_intermediate(jax.make_jaxpr(reference)(*shapes).jaxpr) >= T * S  # can fail
    # XLA's buffers once compiled (measured: flash 2.4 MB, reference 135 MB; T x S is 16.8 MB)
    temp = lambda f: jax.jit(f).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
    matrix_bytes = T * S * 4
    assert temp(flash) < matrix_bytes / 4
    assert temp(reference) >= matrix_bytes
