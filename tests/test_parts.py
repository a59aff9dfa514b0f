"""The selectable parts of the GPT against their closed forms: position encodings (learned,
sinusoidal, rotary), LayerNorm and RMSNorm, label smoothing and the loss mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import model as gpt
from llm_jax import sampling
from llm_jax.loss import cross_entropy

rng = np.random.default_rng(0)


def test_sinusoidal_table_is_the_closed_form():
    n_pos, d = 50, 16
    table = np.asarray(gpt.sinusoidal_table(n_pos, d))
    expected = np.zeros((n_pos, d))
    for p in range(n_pos):
        for i in range(d // 2):
            expected[p, 2 * i] = np.sin(p / 10000 ** (2 * i / d))
            expected[p, 2 * i + 1] = np.cos(p / 10000 ** (2 * i / d))
    np.testing.assert_allclose(table, expected, atol=2e-5)


def rope_score(q_K, k_K, m, n):
    rope = lambda pos: gpt.rope_angles(jnp.array([[pos]]), q_K.shape[-1])  # noqa: E731
    q = gpt.apply_rope(q_K[None, None, None], rope(m))
    k = gpt.apply_rope(k_K[None, None, None], rope(n))
    return float(jnp.sum(q * k))


def test_rope_scores_depend_only_on_the_offset():
    q, k = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
    for m, n in [(5, 2), (0, 7), (30, 30)]:
        base = rope_score(q, k, m, n)
        for shift in (1, 17, 250):
            assert rope_score(q, k, m + shift, n + shift) == pytest.approx(base, abs=2e-4)
    assert abs(rope_score(q, k, 5, 2) - rope_score(q, k, 6, 2)) > 1e-3  # it does see positions
    # A rotation: norms are kept, and position 0 is the identity.
    x = jnp.asarray(rng.normal(size=(1, 3, 2, 32)), jnp.float32)
    rot = gpt.apply_rope(x, gpt.rope_angles(jnp.array([[0, 5, 9]]), 32))
    np.testing.assert_allclose(jnp.linalg.norm(rot, axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    np.testing.assert_allclose(rot[:, 0], x[:, 0], atol=1e-6)


@pytest.mark.parametrize("norm,bias", [("layernorm", True), ("layernorm", False),
                                       ("rmsnorm", False)])
def test_norms_match_their_formulas(norm, bias):
    cfg = gpt.ModelConfig(vocab_size=10, n_layer=1, n_embd=16, n_head=2, block_size=8,
                          norm=norm, bias=bias)
    from flax import nnx

    layer = gpt._norm(cfg, nnx.Rngs(0))
    scale = rng.normal(size=16).astype(np.float32)
    layer.scale[...] = jnp.asarray(scale)
    b = rng.normal(size=16).astype(np.float32) if bias and norm == "layernorm" else 0.0
    if bias and norm == "layernorm":
        layer.bias[...] = jnp.asarray(b)
    x = rng.normal(size=(5, 16)).astype(np.float32) * 3 + 1
    if norm == "layernorm":
        expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    else:
        expected = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected * scale + b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", gpt.POSITIONS)
@pytest.mark.parametrize("norm", gpt.NORMS)
def test_every_variant_runs_causally_and_the_cache_matches(position, norm):
    cfg = gpt.ModelConfig(vocab_size=30, n_layer=2, n_embd=32, n_head=4, block_size=16,
                          position=position, norm=norm)
    graphdef, params = gpt.init_params(cfg, jax.random.key(1))
    seq = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
    full = gpt.forward(graphdef, params, seq)[0]
    changed = gpt.forward(graphdef, params, np.where(np.arange(8) == 5, 7, seq))[0]
    np.testing.assert_allclose(changed[:5], full[:5], atol=1e-6)  # causal
    assert not np.allclose(changed[5:], full[5:])
    # Left padding with shifted slots and real position ids gives the same logits.
    idx = np.concatenate([np.zeros((1, 3), np.int32), seq], axis=1)
    mask = (np.arange(11) >= 3)[None]
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    valid = jnp.zeros((1, 16), bool).at[:, :11].set(mask)
    logits, _ = gpt.forward_cached(graphdef, params, idx, pos, 0, gpt.init_cache(cfg, 1), valid)
    np.testing.assert_allclose(logits[0, 3:], full, atol=1e-5, rtol=1e-5)
    # Cached greedy decoding = recomputing the full context every step.
    out = sampling.generate_batch(graphdef, params, [[3, 1, 4]], max_new_tokens=6,
                                  key=jax.random.key(0), temperature=0.0)[0]
    step = jax.jit(lambda w, t: gpt.forward(graphdef, params, w)[0, t - 1])
    tokens = [3, 1, 4]
    for _ in range(6):
        window = np.zeros((1, 16), np.int32)  # right padding: causal, so it changes nothing
        window[0, : len(tokens)] = tokens
        tokens.append(int(jnp.argmax(step(window, len(tokens)))))
    assert out == tokens[3:]


def test_position_choice_changes_the_params():
    for position, has_table in [("learned", True), ("sinusoidal", False), ("rope", False)]:
        cfg = gpt.ModelConfig(vocab_size=30, n_layer=1, n_embd=16, n_head=2, block_size=8,
                              position=position)
        assert ("wpe" in gpt.abstract_params(cfg)[1]) == has_table


def test_label_smoothing_zero_is_plain_cross_entropy_and_positive_is_the_closed_form():
    logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, size=(2, 3)))
    logp = np.asarray(jax.nn.log_softmax(logits))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()
    assert float(cross_entropy(logits, targets, label_smoothing=0.0)) == \
        pytest.approx(float(cross_entropy(logits, targets)), abs=1e-7)
    assert float(cross_entropy(logits, targets)) == pytest.approx(nll, rel=1e-6)
    eps = 0.1
    q = np.full((2, 3, 7), eps / 7)  # the smoothed target distribution
    q[np.arange(2)[:, None], np.arange(3)[None], np.asarray(targets)] += 1 - eps
    assert float(cross_entropy(logits, targets, label_smoothing=eps)) == \
        pytest.approx(-(q * logp).sum(-1).mean(), rel=1e-6)


def test_the_loss_mask_ignores_masked_tokens_exactly():
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, size=(2, 5)))
    mask = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    loss, grad = jax.value_and_grad(cross_entropy)(logits, targets, mask, 0.1)
    # Masked targets and logits may be anything: nothing changes.
    other_targets = jnp.where(mask > 0, targets, (targets + 3) % 7)
    other_logits = jnp.where(mask[..., None] > 0, logits, 1e4 * logits)
    loss2, grad2 = jax.value_and_grad(cross_entropy)(other_logits, other_targets, mask, 0.1)
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(np.asarray(grad2), np.asarray(grad))
    assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)
    # The mean over the 5 counted tokens of the per-token losses.
    per_token = [float(cross_entropy(logits[b:b + 1, t:t + 1], targets[b:b + 1, t:t + 1],
                                     label_smoothing=0.1))
                 for b in range(2) for t in range(5) if mask[b, t]]
    assert float(loss) == pytest.approx(np.mean(per_token), rel=1e-6)


@pytest.mark.parametrize("impl", ["xla", "flash"])
def test_the_attention_choice_changes_nothing_but_the_kernel(impl):
    base = gpt.ModelConfig(vocab_size=30, n_layer=2, n_embd=32, n_head=4, block_size=24)
    graphdef, params = gpt.init_params(base, jax.random.key(3))
    other = gpt.init_params(gpt.ModelConfig(**{**base.__dict__, "attention": impl,
                                               "attention_block": 8}), jax.random.key(3))[0]
    idx = jnp.asarray(rng.integers(0, 30, size=(2, 20)), jnp.int32)
    loss = lambda g: lambda p: cross_entropy(gpt.forward(g, p, idx[:, :-1]), idx[:, 1:])  # noqa: E731
    l0, g0 = jax.value_and_grad(loss(graphdef))(params)
    l1, g1 = jax.value_and_grad(loss(other))(params)
    assert float(l1) == pytest.approx(float(l0), abs=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_remat_and_bf16_compute_keep_float32_params():
    """Rematerialised blocks give the same gradients; bf16 compute keeps float32 params and
    stays close to float32 (mixed precision)."""
    base = dict(vocab_size=30, n_layer=2, n_embd=32, n_head=4, block_size=16)
    idx = jnp.asarray(rng.integers(0, 30, size=(2, 16)), jnp.int32)

    def loss_and_grads(**kw):
        graphdef, params = gpt.init_params(gpt.ModelConfig(**base, **kw), jax.random.key(0))
        f = lambda p: cross_entropy(gpt.forward(graphdef, p, idx[:, :-1]), idx[:, 1:])  # noqa
        return jax.value_and_grad(f)(params)

    l0, g0 = loss_and_grads()
    l1, g1 = loss_and_grads(remat=True)
    assert float(l1) == float(l0)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-6)
    l2, g2 = loss_and_grads(dtype="bfloat16")
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g2))
    assert abs(float(l2) - float(l0)) < 2e-2
