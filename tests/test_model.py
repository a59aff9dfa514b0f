"""The GPT-2 model: causal, the same under jit, GPT-2 arithmetic, GPT-2 names and sizes."""

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax import model as gpt
from llm_jax.config import TrainConfig
from llm_jax.loss import cross_entropy
from llm_jax.model import Block, ModelConfig
from llm_jax.optim import make_optimizer
from llm_jax.step import make_train_step
from tests.conftest import TINY

B, T = 2, TINY.block_size


@pytest.fixture(scope="module")
def tiny():
    return gpt.init_params(TINY, jax.random.key(0))


def tokens(key=1, shape=(B, T), vocab=TINY.vocab_size):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)


def copy(tree):
    return jax.tree.map(jnp.array, tree)


FORWARD = jax.jit(gpt.forward, static_argnums=0)  # one compilation per shape, shared by the tests


# --- Causality ---------------------------------------------------------------------------------


@partial(jax.jit, static_argnums=0)
def grad_of_loss_at(graphdef, params, x_BTD, targets_BT, t):
    """d(loss of sequence 0 at position t) / d(input embeddings), shape (B, T, D)."""

    def loss_at_t(x_BTD):
        logits_BTV = gpt.merge(graphdef, params).forward_embeddings(x_BTD)
        logits_1V = jax.lax.dynamic_index_in_dim(logits_BTV[0], t, keepdims=True)
        target_1 = jax.lax.dynamic_index_in_dim(targets_BT[0], t, keepdims=True)
        return cross_entropy(logits_1V, target_1)

    return jax.grad(loss_at_t)(x_BTD)


@pytest.mark.parametrize("t", [0, 5, T - 1])
def test_loss_at_t_has_zero_gradient_wrt_later_positions(tiny, t):
    graphdef, params = tiny
    idx, targets = tokens(1), tokens(2)
    x_BTD = gpt.merge(graphdef, params).embed(idx)
    grad_BTD = np.asarray(grad_of_loss_at(graphdef, params, x_BTD, targets, t))
    per_position = np.abs(grad_BTD[0]).sum(axis=-1)
    assert np.all(per_position[t + 1:] == 0.0), per_position  # exactly zero: no peeking
    assert np.all(per_position[: t + 1] > 0.0), per_position  # every earlier token is seen
    assert np.all(grad_BTD[1] == 0.0)  # sequences of a batch never mix


def test_changing_a_later_token_leaves_earlier_logits_unchanged(tiny):
    graphdef, params = tiny
    idx = tokens(3)
    other = idx.at[:, 9].set((idx[:, 9] + 1) % TINY.vocab_size)
    a, b = FORWARD(graphdef, params, idx), FORWARD(graphdef, params, other)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


# --- jit, eager and dropout ----------------------------------------------------------------------


def test_jit_equals_eager_with_and_without_dropout(tiny):
    graphdef, params = tiny
    graphdef_drop, _ = gpt.abstract_params(dataclasses.replace(TINY, dropout=0.3))
    idx, key = tokens(4), jax.random.key(10)
    with jax.disable_jit():  # op by op, and the layer scan as a Python loop
        eager = gpt.forward(graphdef, params, idx)
        eager_drop = gpt.forward(graphdef_drop, params, idx, key)
    jitted = FORWARD(graphdef, params, idx)
    jitted_drop = FORWARD(graphdef_drop, params, idx, key)
    assert jitted.shape == (B, T, TINY.vocab_size)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jitted_drop, eager_drop, rtol=1e-5, atol=1e-5)  # the same mask
    assert np.abs(jitted_drop - jitted).max() > 1e-3  # with a key, dropout does happen


def test_dropout_depends_only_on_the_key(tiny):
    graphdef, params = tiny
    graphdef_drop, _ = gpt.abstract_params(dataclasses.replace(TINY, dropout=0.3))
    idx, k1, k2 = tokens(4), jax.random.key(10), jax.random.key(11)
    with_k1 = FORWARD(graphdef_drop, params, idx, k1)
    np.testing.assert_array_equal(with_k1, FORWARD(graphdef_drop, params, idx, k1))
    assert np.abs(with_k1 - FORWARD(graphdef_drop, params, idx, k2)).max() > 1e-3
    no_key = FORWARD(graphdef_drop, params, idx, None)  # evaluation: no dropout at all
    np.testing.assert_allclose(no_key, FORWARD(graphdef, params, idx), rtol=1e-6, atol=1e-6)


# --- Vocabulary padding --------------------------------------------------------------------------


def test_vocabulary_padding_never_changes_logits(tiny):
    graphdef_pad, params = tiny  # TINY: 65 tokens, embedding padded to 128 rows
    assert params["wte"]["embedding"].shape == (128, TINY.n_embd)
    graphdef, _ = gpt.abstract_params(dataclasses.replace(TINY, vocab_multiple=1))
    wte = params["wte"]["embedding"]
    loud = 100.0 * jax.random.normal(jax.random.key(1), (128 - 65, TINY.n_embd))
    params_plain = dict(params, wte={"embedding": wte[:65]})
    params_pad = dict(params, wte={"embedding": jnp.concatenate([wte[:65], loud])})
    idx = tokens(4)
    plain = FORWARD(graphdef, params_plain, idx)
    padded = FORWARD(graphdef_pad, params_pad, idx)
    assert padded.shape == plain.shape == (B, T, 65)
    np.testing.assert_allclose(padded, plain, rtol=1e-6, atol=1e-6)


# --- Sizes -------------------------------------------------------------------------------------


def gpt2_124m_by_hand(with_wpe: bool) -> int:
    D, L, V, ctx = 768, 12, 50257, 1024
    per_layer = (2 * 2 * D  # ln_1, ln_2: scale and bias
                 + D * 3 * D + 3 * D  # attn.c_attn
                 + D * D + D  # attn.c_proj
                 + D * 4 * D + 4 * D  # mlp.c_fc
                 + 4 * D * D + D)  # mlp.c_proj
    return L * per_layer + V * D + 2 * D + (ctx * D if with_wpe else 0)


def test_gpt2_parameter_count_matches_the_published_124m():
    cfg = ModelConfig(vocab_size=50257, vocab_multiple=64, block_size=1024, n_layer=12,
                      n_head=12, n_embd=768)
    _, abstract = gpt.abstract_params(cfg)  # shapes only: nothing is allocated
    assert abstract["wte"]["embedding"].shape == (50304, 768)  # padded, yet not counted
    assert gpt2_124m_by_hand(False) == 123_653_376  # nanoGPT: "number of parameters: 123.65M"
    assert gpt2_124m_by_hand(True) == 124_439_808  # GPT-2 small's published total
    assert gpt.count_params(cfg, abstract) == 123_653_376
    assert gpt.count_params(cfg, abstract, non_embedding=False) == 124_439_808


@pytest.mark.parametrize("n_layer, n_head, n_embd, block_size, expected", [
    (6, 6, 384, 256, 70_958_592),  # "small": 70.96 M in /work/shared/bench/README.md
    (4, 4, 128, 128, 5_561_856),  # "tiny": 5.56 M
])
def test_flops_per_token_of_the_benchmark_shapes(n_layer, n_head, n_embd, block_size, expected):
    cfg = ModelConfig(vocab_size=65, vocab_multiple=1, bias=False, n_layer=n_layer,
                      n_head=n_head, n_embd=n_embd, block_size=block_size)
    D = n_embd
    n_params = n_layer * (2 * D + 12 * D * D) + 65 * D + D  # no biases; wpe excluded
    by_hand = 6 * n_params + 12 * n_layer * n_head * (D // n_head) * block_size
    assert by_hand == expected
    _, abstract = gpt.abstract_params(cfg)
    n = gpt.count_params(cfg, abstract)
    assert n == n_params
    assert gpt.flops_per_token(cfg, n) == expected
    assert round(expected / 1e6, 2) in (70.96, 5.56)


def test_count_params_of_real_params_equals_abstract(tiny):
    _, params = tiny
    _, abstract = gpt.abstract_params(TINY)
    assert gpt.count_params(TINY, params) == gpt.count_params(TINY, abstract)
    all_rows = sum(x.size for x in jax.tree.leaves(params))
    padding = (TINY.padded_vocab_size - TINY.vocab_size) * TINY.n_embd
    assert gpt.count_params(TINY, params, non_embedding=False) == all_rows - padding


# --- Names, dtypes -------------------------------------------------------------------------------


def shapes(params) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p, simple=True, separator="."): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_params_use_gpt2_names_and_stack_the_layers(tiny):
    _, params = tiny
    L, D, V = TINY.n_layer, TINY.n_embd, TINY.padded_vocab_size
    assert set(params) == {"wte", "wpe", "h", "ln_f"}
    assert shapes(params) == {
        "wte.embedding": (V, D), "wpe.embedding": (T, D),
        "h.ln_1.scale": (L, D), "h.ln_1.bias": (L, D),
        "h.attn.c_attn.kernel": (L, D, 3 * D), "h.attn.c_attn.bias": (L, 3 * D),
        "h.attn.c_proj.kernel": (L, D, D), "h.attn.c_proj.bias": (L, D),
        "h.ln_2.scale": (L, D), "h.ln_2.bias": (L, D),
        "h.mlp.c_fc.kernel": (L, D, 4 * D), "h.mlp.c_fc.bias": (L, 4 * D),
        "h.mlp.c_proj.kernel": (L, 4 * D, D), "h.mlp.c_proj.bias": (L, D),
        "ln_f.scale": (D,), "ln_f.bias": (D,),
    }


def test_bias_false_removes_every_bias():
    _, params = gpt.abstract_params(dataclasses.replace(TINY, bias=False))
    names = set(shapes(params))
    assert not [n for n in names if n.endswith("bias")]
    assert {"h.ln_1.scale", "h.attn.c_attn.kernel", "ln_f.scale"} <= names


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny):
    graphdef, params = tiny
    cfg16 = dataclasses.replace(TINY, dtype="bfloat16")
    graphdef16, abstract16 = gpt.abstract_params(cfg16)  # the same constructor as init_params
    assert {x.dtype for x in jax.tree.leaves(abstract16)} == {jnp.dtype("float32")}
    idx = tokens(4)
    logits16 = FORWARD(graphdef16, params, idx)
    assert logits16.dtype == jnp.float32 and logits16.shape == (B, T, TINY.vocab_size)
    logits32 = FORWARD(graphdef, params, idx)
    np.testing.assert_allclose(logits16, logits32, atol=0.05)  # same model, rounder arithmetic


# --- Learning ----------------------------------------------------------------------------------


def test_tiny_model_overfits_one_batch(tiny):
    graphdef, params = tiny
    tcfg = TrainConfig(learning_rate=1e-2, min_lr=1e-3, warmup_iters=10, max_iters=100,
                       weight_decay=0.0)
    tx = make_optimizer(tcfg)
    train_step = make_train_step(graphdef, tx)
    x = tokens(8, shape=(1, 4, T))
    y = tokens(9, shape=(1, 4, T))  # random targets: only memorising can fit them
    params, opt_state = copy(params), tx.init(params)
    losses = []
    for step in range(tcfg.max_iters):
        params, opt_state, metrics = train_step(params, opt_state, (x, y), jax.random.key(step))
        losses.append(float(metrics["loss"]))
    assert abs(losses[0] - math.log(TINY.vocab_size)) < 0.2  # starts at chance
    assert losses[-1] < 0.05, losses[::10]


# --- GPT-2 arithmetic, checked against numpy ---------------------------------------------------


def np_layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias  # GPT-2's epsilon


def np_gelu(x):  # GPT-2's gelu, tanh approximation
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_block(p, x_BTD, n_head):
    Bn, Tn, D = x_BTD.shape
    K = D // n_head

    def attn(x):
        qkv = x @ p["attn"]["c_attn"]["kernel"] + p["attn"]["c_attn"]["bias"]
        q, k, v = (a.reshape(Bn, Tn, n_head, K).transpose(0, 2, 1, 3)
                   for a in np.split(qkv, 3, axis=-1))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(K)
        scores = np.where(np.tril(np.ones((Tn, Tn), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        y = (weights @ v).transpose(0, 2, 1, 3).reshape(Bn, Tn, D)
        return y @ p["attn"]["c_proj"]["kernel"] + p["attn"]["c_proj"]["bias"]

    def mlp(x):
        h = np_gelu(x @ p["mlp"]["c_fc"]["kernel"] + p["mlp"]["c_fc"]["bias"])
        return h @ p["mlp"]["c_proj"]["kernel"] + p["mlp"]["c_proj"]["bias"]

    x = x_BTD + attn(np_layer_norm(x_BTD, p["ln_1"]["scale"], p["ln_1"]["bias"]))
    return x + mlp(np_layer_norm(x, p["ln_2"]["scale"], p["ln_2"]["bias"]))


def test_block_matches_a_numpy_gpt2_block():
    cfg = dataclasses.replace(TINY, dropout=0.5)  # dropout must be off without a key
    block = Block(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(block, nnx.Param)
    rng = np.random.default_rng(0)

    def randomize(path, x):  # away from the init (zero biases, unit scales) to test every term
        name = path[-1].key
        fan_in = x.shape[0] if name == "kernel" else 1
        r = rng.standard_normal(x.shape).astype(np.float32)
        return {"kernel": r / math.sqrt(fan_in), "bias": 0.2 * r,
                "scale": 1.0 + 0.2 * r}[name]

    p = jax.tree_util.tree_map_with_path(randomize, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, p))

    Bn, Tn, D = 2, 8, cfg.n_embd
    # A residual stream of small variance: LayerNorm's epsilon then matters to the result.
    x = (0.003 * rng.standard_normal((Bn, Tn, D))).astype(np.float32)
    run = jax.jit(lambda state, x_ND: nnx.merge(graphdef, state)(x_ND, Tn))
    got = np.asarray(run(state, jnp.asarray(x.reshape(Bn * Tn, D)))).reshape(Bn, Tn, D)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    want = np_block(p64, x.astype(np.float64), cfg.n_head)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
