"""The encoder, the masked LM and the classifier: bidirectional attention over real tokens only,
BERT's masking recipe, a loss on the chosen positions only, blanks, the classification task."""

import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import encoder, tasks
from llm_jax.errors import UserError
from llm_jax.tokenizers import CharTokenizer, gpt2_tokenizer
from tests.conftest import TINY, make_corpus

VOCAB = tasks.SpecialVocab(CharTokenizer("abcdefghijklmnopqrstuvwxyz .,"))
MLM = dataclasses.replace(TINY, vocab_size=VOCAB.vocab_size, family="mlm")
T = MLM.block_size


def random_batch(key, lengths):
    idx_BT = jax.random.randint(key, (len(lengths), T), 0, VOCAB.n_base)
    mask_BT = jnp.arange(T)[None] < jnp.asarray(lengths)[:, None]
    return jnp.where(mask_BT, idx_BT, VOCAB.pad_id), mask_BT


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope"])
def test_every_real_token_reaches_every_real_position_and_padding_reaches_none(position):
    cfg = dataclasses.replace(MLM, position=position)
    graphdef, params = encoder.init_params(cfg, jax.random.key(0))
    forward = jax.jit(lambda idx, mask: encoder.forward(graphdef, params, idx, mask))
    lengths = [T, 11]
    idx, mask = random_batch(jax.random.key(1), lengths)
    base = forward(idx, mask)
    for b, n in enumerate(lengths):
        for j in (0, n // 2, n - 1):  # first, middle and last real token
            changed = idx.at[b, j].set((idx[b, j] + 1) % VOCAB.n_base)
            diff_T = jnp.abs(forward(changed, mask)[b, :n] - base[b, :n]).max(axis=-1)
            assert float(diff_T.min()) > 1e-6, (b, j)  # before and after j: bidirectional
    padded = idx.at[1, 11:].set(jax.random.randint(jax.random.key(2), (T - 11,), 0, VOCAB.n_base))
    np.testing.assert_array_equal(forward(padded, mask)[:, :11], base[:, :11])
    np.testing.assert_array_equal(forward(padded, mask)[0], base[0])


def test_masking_recipe_proportions():
    rng = np.random.default_rng(0)
    n_rows, width = 1000, 128
    idx = rng.integers(0, VOCAB.n_base, (n_rows, width))
    idx[:, 0], idx[:, 100] = VOCAB.cls_id, VOCAB.sep_id
    idx[:, 101:] = VOCAB.pad_id  # 99 ordinary tokens a row: 99,000 in all
    inputs, chosen = encoder.mask_tokens(idx, rng, VOCAB, prob=0.15)
    ordinary = idx < VOCAB.n_base
    assert not chosen[~ordinary].any()
    np.testing.assert_array_equal(inputs[~chosen], idx[~chosen])

    def within(count, total, p, sigmas=4.0):
        assert abs(count - p * total) < sigmas * np.sqrt(total * p * (1 - p)), (count, total, p)

    n, k = int(ordinary.sum()), int(chosen.sum())
    within(k, n, 0.15)
    masked = inputs[chosen] == VOCAB.mask_id
    same = inputs[chosen] == idx[chosen]
    other = ~masked & ~same
    within(int(masked.sum()), k, 0.8)
    # A random token equals the original one time in n_base.
    within(int(other.sum()), k, 0.1 * (1 - 1 / VOCAB.n_base))
    within(int(same.sum()), k, 0.1 + 0.1 / VOCAB.n_base)
    assert (inputs[chosen][other] < VOCAB.n_base).all()  # random tokens are never special


def test_mlm_loss_counts_only_the_chosen_positions():
    graphdef, params = encoder.init_params(MLM, jax.random.key(0))
    tokens = np.random.default_rng(1).integers(0, VOCAB.n_base, 500)
    batch = encoder.mlm_batch(tokens, VOCAB, np.random.default_rng(2), 4, T, prob=0.3)
    assert batch["chosen"].any() and (~batch["chosen"] & batch["mask"]).any()

    def loss(params, targets):
        total, count, _ = encoder.mlm_loss(graphdef, params, dict(batch, targets=targets))
        return total / count

    grad_fn = jax.jit(jax.value_and_grad(loss))
    l0, g0 = grad_fn(params, batch["targets"])
    others = np.where(batch["chosen"], batch["targets"], (batch["targets"] + 7) % VOCAB.n_base)
    l1, g1 = grad_fn(params, others)
    assert float(l0) == float(l1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_array_equal(a, b)
    moved = np.where(batch["chosen"], (batch["targets"] + 7) % VOCAB.n_base, batch["targets"])
    assert abs(float(grad_fn(params, moved)[0]) - float(l0)) > 1e-4  # chosen targets do count


def test_mlm_batch_layout_and_determinism():
    tokens = np.arange(300) % VOCAB.n_base
    b1 = encoder.mlm_batch(tokens, VOCAB, np.random.default_rng(5), 16, T)
    b2 = encoder.mlm_batch(tokens, VOCAB, np.random.default_rng(5), 16, T)
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k])
    targets, mask = b1["targets"], b1["mask"]
    assert (targets[:, 0] == VOCAB.cls_id).all()
    lengths = mask.sum(axis=1)
    assert (targets[np.arange(16), lengths - 1] == VOCAB.sep_id).all()
    assert (targets[~mask] == VOCAB.pad_id).all() and (b1["idx"][~mask] == VOCAB.pad_id).all()
    assert len(set(lengths.tolist())) > 1  # short rows as well as full ones


def test_blanks_char_and_bpe():
    ids, blanks = encoder.parse_blanks("ab __ c[MASK]", VOCAB, T)
    assert ids[0] == VOCAB.cls_id and ids[-1] == VOCAB.sep_id
    assert blanks == [4, 5, 8] and all(ids[i] == VOCAB.mask_id for i in blanks)
    assert VOCAB.decode(ids) == "[CLS]ab [MASK][MASK] c[MASK][SEP]"
    gpt2 = tasks.SpecialVocab(gpt2_tokenizer())
    ids, blanks = encoder.parse_blanks("The [MASK] statement", gpt2, 16)
    assert ids == [gpt2.cls_id, *gpt2_tokenizer().encode("The"), gpt2.mask_id,
                   *gpt2_tokenizer().encode(" statement"), gpt2.sep_id]  # " return" is a token
    with pytest.raises(UserError, match="no blank"):
        encoder.parse_blanks("no blank here", VOCAB, T)


def test_fill_returns_candidates_per_blank():
    graphdef, params = encoder.init_params(MLM, jax.random.key(0))
    candidates, filled = encoder.fill(graphdef, params, VOCAB, "ab __ c", top=3)
    assert len(candidates) == 2 and all(len(c) == 3 for c in candidates)
    for cands in candidates:
        probs = [p for _, p in cands]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert len(filled) == len("ab __ c") and filled.startswith("ab ") and "[" not in filled


def test_classifier_reads_the_cls_position():
    cfg = dataclasses.replace(MLM, family="classifier", n_class=3)
    graphdef, params = encoder.init_params(cfg, jax.random.key(0))
    idx, mask = random_batch(jax.random.key(1), [T, 6])
    logits = encoder.forward(graphdef, params, idx, mask)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    changed = idx.at[1, 5].set((idx[1, 5] + 1) % VOCAB.n_base)  # the last real token
    assert float(jnp.abs(encoder.forward(graphdef, params, changed, mask) - logits).max()) > 1e-6
    assert set(params) == {"encoder", "pooler", "head"}


def test_shuffled_task_is_deterministic_and_disjoint():
    text = make_corpus(20000, seed=3)
    cut = int(len(text) * 0.8)
    encode = CharTokenizer(text).encode
    a = tasks.shuffled_task(text[:cut], text[cut:], encode, max_tokens=120)
    b = tasks.shuffled_task(text[:cut], text[cut:], encode, max_tokens=120)
    assert a == b
    assert tasks.shuffled_task(text[:cut], text[cut:], encode, max_tokens=120, seed=1) != a
    keys = {s: {tuple(ids) for ids, _ in ex} for s, ex in a.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    labels = [label for ex in a.values() for _, label in ex]
    assert 0.35 < np.mean(labels) < 0.65
    line = "one two three four five six"
    shuffled = tasks.shuffle_words(line, random.Random(0))
    assert sorted(shuffled.split()) == sorted(line.split()) and shuffled != line
