"""The encoder-decoder: a causal decoder, cross-attention that ignores source padding, cached
decoding equal to full recompute, beam search of width 1 equal to greedy, the toy tasks."""

import dataclasses
import datetime

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import seq2seq, tasks
from tests.conftest import TINY

VOCAB = tasks.seq2seq_vocab("dates")
CFG = dataclasses.replace(TINY, vocab_size=VOCAB.vocab_size, family="seq2seq", n_layer=1,
                          n_dec_layer=2)
S = T = CFG.block_size


@pytest.fixture(scope="module")
def model():
    return seq2seq.init_params(CFG, jax.random.key(0))


def tokens(key, shape):
    return jax.random.randint(key, shape, 0, VOCAB.n_base)


def padded(idx, lengths):
    mask = jnp.arange(idx.shape[1])[None] < jnp.asarray(lengths)[:, None]
    return jnp.where(mask, idx, VOCAB.pad_id), mask


def test_decoder_is_causal_and_reads_the_source(model):
    graphdef, params = model
    fwd = jax.jit(lambda *a: seq2seq.forward(graphdef, params, *a))
    src, src_mask = padded(tokens(jax.random.key(1), (2, S)), [S, 9])
    tgt, tgt_mask = padded(tokens(jax.random.key(2), (2, T)), [T, 12])
    base = fwd(src, src_mask, tgt, tgt_mask)
    for j in (0, 5, 11):
        changed = tgt.at[:, j].set((tgt[:, j] + 1) % VOCAB.n_base)
        diff_BT = jnp.abs(fwd(src, src_mask, changed, tgt_mask) - base).max(axis=-1)
        assert float(diff_BT[:, :j].max(initial=0.0)) == 0.0  # the past never sees the future
        assert float(diff_BT[:, j:12].min()) > 1e-6
    changed = src.at[:, 3].set((src[:, 3] + 1) % VOCAB.n_base)  # a real source token
    assert float(jnp.abs(fwd(changed, src_mask, tgt, tgt_mask) - base)[:, :12].min(
        axis=-1).min()) > 0


def test_padding_is_ignored_on_both_sides(model):
    graphdef, params = model
    fwd = jax.jit(lambda *a: seq2seq.forward(graphdef, params, *a))
    src, src_mask = padded(tokens(jax.random.key(1), (2, S)), [S, 9])
    tgt, tgt_mask = padded(tokens(jax.random.key(2), (2, T)), [T, 12])
    base = fwd(src, src_mask, tgt, tgt_mask)
    noise = tokens(jax.random.key(3), (2, S))
    src2 = jnp.where(src_mask, src, noise)  # other tokens in the padded source slots
    tgt2 = jnp.where(tgt_mask, tgt, noise)
    out = fwd(src2, src_mask, tgt2, tgt_mask)
    np.testing.assert_array_equal(out[0], base[0])
    np.testing.assert_array_equal(out[1, :12], base[1, :12])


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_cached_steps_equal_the_full_forward(position):
    cfg = dataclasses.replace(CFG, position=position)
    graphdef, params = seq2seq.init_params(cfg, jax.random.key(4))
    src, src_mask = padded(tokens(jax.random.key(1), (2, S)), [S, 7])
    tgt = tokens(jax.random.key(2), (2, 10))
    full = jax.jit(seq2seq.forward, static_argnums=0)(graphdef, params, src, src_mask, tgt,
                                                      jnp.ones_like(tgt, bool))
    cross, cache = jax.jit(seq2seq.start, static_argnums=(0, 4))(graphdef, params, src,
                                                                  src_mask, 10)
    step = jax.jit(seq2seq.step, static_argnums=0)
    for t in range(10):
        logits, cache = step(graphdef, params, cross, cache, tgt[:, t], t)
        np.testing.assert_allclose(logits, full[:, t], atol=2e-5, rtol=1e-5)


def recompute_greedy(graphdef, params, src, src_mask, steps):
    """Greedy decoding by running the whole decoder again for every new token (the target is
    padded to `steps` tokens; causality makes what follows position t irrelevant to it)."""
    fwd = jax.jit(lambda tgt: seq2seq.forward(graphdef, params, src, src_mask, tgt,
                                              jnp.ones_like(tgt, bool)))
    tgt = np.full((src.shape[0], steps), VOCAB.pad_id)
    tgt[:, 0] = VOCAB.cls_id
    out = np.zeros_like(tgt)
    for t in range(steps):
        out[:, t] = np.asarray(jnp.argmax(fwd(jnp.asarray(tgt))[:, t], axis=-1))
        if t + 1 < steps:
            tgt[:, t + 1] = out[:, t]
    return [list(r[: list(r).index(VOCAB.sep_id)]) if VOCAB.sep_id in r else list(r)
            for r in out.tolist()]


def test_cached_greedy_equals_recompute_and_beam_of_one(model):
    graphdef, params = model
    sources = ["march 3, 1998", "1 may 2000", "dec 9 1950"]
    greedy = seq2seq.decode_ids(graphdef, params, VOCAB, sources, max_len=8)
    src, src_mask = seq2seq._sources(VOCAB, sources, S)
    assert greedy == recompute_greedy(graphdef, params, src, src_mask, 8)
    assert seq2seq.decode_ids(graphdef, params, VOCAB, sources, max_len=8, beam=1,
                              length_penalty=0.0) == greedy


def test_toy_tasks_are_deterministic_disjoint_and_right():
    for name in ("dates", "reverse"):
        a, b = tasks.seq2seq_splits(name, seed=0), tasks.seq2seq_splits(name, seed=0)
        assert a == b and tasks.seq2seq_splits(name, seed=1) != a
        assert [len(a[s]) for s in ("train", "val", "test")] == list(
            tasks.SEQ2SEQ_TASKS[name].sizes)
        # Disjoint by the underlying item: a target (the date, the reversed string) never
        # appears in two splits, whatever its written form.
        targets = {s: {t for _, t in pairs} for s, pairs in a.items()}
        assert not targets["train"] & targets["val"]
        assert not targets["train"] & targets["test"] and not targets["val"] & targets["test"]
        chars = set(tasks.SEQ2SEQ_TASKS[name].chars)
        assert all(set(s) <= chars and set(t) <= chars for p in a.values() for s, t in p)
    months = {m: i + 1 for i, m in enumerate(tasks.MONTHS)}
    for source, target in tasks.seq2seq_splits("dates")["test"][:200]:
        words = source.replace(",", "").split()
        day_word = next(w for w in words[:2] if w[0].isdigit())
        month_word = next(w for w in words[:2] if not w[0].isdigit())
        month = next(n for m, n in months.items() if m.startswith(month_word))
        day = int(day_word.rstrip("stndrh"))
        assert datetime.date(int(words[2]), month, day).isoformat() == target
    assert all(t == s[::-1] for s, t in tasks.seq2seq_splits("reverse")["val"])


def test_batch_layout():
    batch = seq2seq.make_batch([("may 1 2000", "2000-05-01")], VOCAB, 12, 12)
    assert VOCAB.decode(batch["src"][0]) == "may 1 2000[SEP][PAD]"
    assert VOCAB.decode(batch["tgt_in"][0]) == "[CLS]2000-05-01[PAD]"
    assert VOCAB.decode(batch["tgt_out"][0]) == "2000-05-01[SEP][PAD]"
    assert batch["tgt_mask"][0].sum() == 11 and batch["src_mask"][0].sum() == 11


def test_remat_gives_the_same_loss_and_gradients(model):
    graphdef, params = model
    batch = seq2seq.make_batch([("may 1 2000", "2000-05-01"), ("3 june 1990", "1990-06-03")],
                               VOCAB, S, T)
    g_remat, _ = seq2seq.abstract_params(dataclasses.replace(CFG, remat=True))
    out = [jax.jit(jax.value_and_grad(lambda p, g=g: seq2seq.loss(g, p, batch)[0]))(params)
           for g in (graphdef, g_remat)]
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
