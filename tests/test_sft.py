"""Supervised fine-tuning: the loss on answers only, packing, the chat template, freezing."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import bpe, checkpoint, hf, instructions, sft
from llm_jax import model as gpt
from llm_jax.config import DataConfig, TrainConfig
from llm_jax.errors import UserError
from llm_jax.inference import load_model
from llm_jax.optim import make_optimizer
from llm_jax.step import make_train_step
from llm_jax.tokenizers import (GPT2_VOCAB_SIZE, CharTokenizer, gpt2_tokenizer,
                                tokenizer_from_json)
from llm_jax.training import apply_init_from, train
from tests.conftest import TINY, WORDS, make_corpus

T = TINY.block_size


FORWARD = jax.jit(gpt.forward, static_argnums=0)


def copy(tree):
    return jax.tree.map(jnp.array, tree)


@pytest.fixture(scope="module")
def tiny():
    return gpt.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def sgd_step(tiny):
    """A train step whose update is minus the gradient, compiled once per batch shape."""
    tx = optax.sgd(1.0)
    return make_train_step(tiny[0], tx), tx


def random_batch(key, shape):
    k_x, k_y, k_m = jax.random.split(jax.random.key(key), 3)
    x = jax.random.randint(k_x, shape, 0, TINY.vocab_size)
    y = jax.random.randint(k_y, shape, 0, TINY.vocab_size)
    mask = jax.random.bernoulli(k_m, 0.4, shape).astype(jnp.float32)
    return x, y, mask


# --- The loss on answers only ------------------------------------------------------------------


def test_changing_prompt_targets_leaves_loss_and_gradient_unchanged(tiny, sgd_step):
    graphdef, params = tiny
    step, tx = sgd_step
    x, y, mask = random_batch(0, (1, 8, T))
    y_other = jnp.where(mask > 0, y, (y + 7) % TINY.vocab_size)  # only masked targets change
    assert not jnp.array_equal(y_other, y)
    key = jax.random.key(1)
    p1, _, m1 = step(copy(params), tx.init(params), (x, y, mask), key)
    p2, _, m2 = step(copy(params), tx.init(params), (x, y_other, mask), key)
    assert m1["loss"] == m2["loss"]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        assert np.array_equal(a, b)
    # ... while an answer's target does count
    y_answer = jnp.where(mask > 0, (y + 7) % TINY.vocab_size, y)
    _, _, m3 = step(copy(params), tx.init(params), (x, y_answer, mask), key)
    assert abs(float(m3["loss"]) - float(m1["loss"])) > 1e-3


def test_loss_is_the_masked_mean_over_micro_batches_of_unequal_answer_lengths(tiny, sgd_step):
    graphdef, params = tiny
    x, y, _ = random_batch(2, (2, 4, T))
    mask = np.zeros((2, 4, T), np.float32)
    mask[0, 0, 3:5] = 1  # 2 answer tokens in the first micro-batch
    mask[1, :, 8:] = 1  # 32 in the second
    logp = jax.nn.log_softmax(FORWARD(graphdef, params, x.reshape(8, T)), axis=-1)
    logp = logp.reshape(2, 4, T, -1)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(y)[..., None], axis=-1)[..., 0]
    want = (nll * mask).sum() / mask.sum()
    mean_of_means = np.mean([(nll[a] * mask[a]).sum() / mask[a].sum() for a in range(2)])
    assert abs(want - mean_of_means) > 0.01  # the test tells the two apart

    step, tx = sgd_step
    key = jax.random.key(3)
    p2, _, m2 = step(copy(params), tx.init(params), (x, y, jnp.asarray(mask)), key)
    np.testing.assert_allclose(m2["loss"], want, rtol=1e-6)
    # The gradient is the masked mean's: the same as one micro-batch of all 8 rows.
    flat = [a.reshape(1, 8, T) for a in (x, y, jnp.asarray(mask))]
    p1, _, m1 = step(copy(params), tx.init(params), tuple(flat), key)
    np.testing.assert_allclose(m1["loss"], want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)



# --- Packing -----------------------------------------------------------------------------------


def test_segment_positions_restart_at_each_example():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert gpt.segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_examples_do_not_attend_across_boundaries(position):
    cfg = dataclasses.replace(TINY, position=position)
    graphdef, params = gpt.init_params(cfg, jax.random.key(0))
    forward = jax.jit(gpt.forward, static_argnums=0)
    a, b = 6, 7  # example A, then example B, then padding
    seg = jnp.array([[1] * a + [2] * b + [0] * (T - a - b)])
    idx = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)
    other_a = idx.at[0, :a].set((idx[0, :a] + 5) % cfg.vocab_size)
    other_b = idx.at[0, a:a + b].set((idx[0, a:a + b] + 5) % cfg.vocab_size)
    logits = forward(graphdef, params, idx, None, seg)
    logits_a = forward(graphdef, params, other_a, None, seg)
    logits_b = forward(graphdef, params, other_b, None, seg)
    assert np.array_equal(logits_a[0, a:a + b], logits[0, a:a + b])  # A changed, B did not
    assert np.array_equal(logits_b[0, :a], logits[0, :a])
    assert not np.allclose(logits_a[0, :a], logits[0, :a])  # the change is seen where it is
    # ... and B packed after A is B run alone, from position 0.
    alone = forward(graphdef, params, idx[:, a:a + b], None, None)
    np.testing.assert_allclose(logits[0, a:a + b], alone[0], rtol=1e-5, atol=1e-5)
    unpacked = forward(graphdef, params, idx, None, None)  # without segments B would see A
    assert not np.allclose(unpacked[0, a:a + b], alone[0], atol=1e-3)


def test_batches_pad_or_pack_with_masks_on_answers():
    data = sft.prepare(DataConfig(source="sft", sft_examples=400, tokenizer="char"))
    tok = data.tokenizer
    kw = dict(seed=0, step=3, batch_size=4, block_size=128)
    for pack in (False, True):
        d = dataclasses.replace(data, pack=pack)
        x, y, mask, seg = d.get_batch("train", **kw)
        x2, y2, mask2, seg2 = d.get_batch("train", **kw)
        assert np.array_equal(x, x2) and np.array_equal(mask, mask2)  # a function of the step
        assert (seg is None) == (not pack)
        for row in range(4):
            if pack:
                assert seg[row].max() >= 2  # short examples: several per row
                real = seg[row] > 0
            else:
                real = np.arange(128) < np.argmax(x[row] == 0) if (x[row] == 0).any() else True
            targets = y[row][mask[row] > 0]
            # Every counted target is an answer token or <|end|>, never a role or user token.
            assert tok.ids[sft.END] in targets
            assert not set(targets.tolist()) & {tok.ids["<|user|>"], tok.ids["<|assistant|>"]}
            assert np.all(mask[row][~np.asarray(real)] == 0) if pack else True
        text = tok.decode(x[0][: (seg[0] == 1).sum()] if pack else x[0])
        assert text.startswith("<|user|>") and "<|assistant|>" in text


# --- The chat template and its tokens ----------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "what is 2 + 3?\nand < | > too"},
                {"role": "assistant", "content": "5"},
                {"role": "user", "content": ""},
                {"role": "assistant", "content": "line one\nline two"}]


def test_chat_template_round_trips():
    text = sft.render(CONVERSATION)
    assert text.startswith("<|system|>Be brief.<|end|><|user|>what is 2 + 3?")
    assert sft.parse(text) == CONVERSATION
    assert sft.render(CONVERSATION[:2], add_generation_prompt=True).endswith(
        "<|end|><|assistant|>")
    with pytest.raises(ValueError):
        sft.parse(text + "<|user|>unfinished")
    tok = sft.chat_tokenizer(CharTokenizer(text))
    ids, mask = sft.encode_conversation(tok, CONVERSATION)
    assert tok.decode(ids) == text and tok.encode(text) == ids
    answers = tok.decode([i for i, m in zip(ids, mask) if m])
    assert answers == "5<|end|>line one\nline two<|end|>"


def test_user_text_that_looks_like_a_turn_marker_stays_text():
    tok = sft.chat_tokenizer(CharTokenizer("<|end>abc"))
    ids, _ = sft.encode_conversation(tok, [{"role": "user", "content": "a<|end|>b"},
                                           {"role": "assistant", "content": "c"}])
    assert ids.count(tok.ids[sft.END]) == 2  # the two real ends, not the typed one


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_special_tokens_do_not_disturb_existing_ids(kind):
    text = "Hello world, what is 12 + 7?\nreverse: abc <|endoftext|> more"
    if kind == "char":
        base = CharTokenizer(text)
    elif kind == "gpt2":
        base = gpt2_tokenizer()
    else:
        base = bpe.train_bpe(text * 3, 300)
    tok = sft.chat_tokenizer(base)
    assert tok.encode(text) == base.encode(text)
    assert tok.decode(base.encode(text)) == text
    n = base.vocab_size
    assert [tok.ids[t] for t in sft.CHAT_TOKENS] == list(range(n, n + 4))
    assert tok.vocab_size == n + 4 and tok.eot_id == base.eot_id and tok.kind == base.kind
    assert tok.encode("<|user|>a<|end|>")[0] == n + 1
    if kind == "gpt2":
        cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size, vocab_multiple=64)
        assert n == GPT2_VOCAB_SIZE and cfg.padded_vocab_size == 50304  # within the padding
    again = tokenizer_from_json(json.loads(json.dumps(tok.to_json())))
    assert again.encode(text + "<|assistant|>") == tok.encode(text + "<|assistant|>")


def test_grown_vocabulary_keeps_the_pretrained_logits(tiny):
    graphdef, params = tiny
    cfg, grown = sft.grow_vocab(TINY, params, TINY.vocab_size + 4, jax.random.key(0))
    assert grown["wte"]["embedding"].shape == (128, TINY.n_embd)  # 69 fit in the 128 padded
    assert np.array_equal(grown["wte"]["embedding"][:65], params["wte"]["embedding"][:65])
    assert not np.array_equal(grown["wte"]["embedding"][65:69], params["wte"]["embedding"][65:69])
    idx = jax.random.randint(jax.random.key(1), (2, T), 0, TINY.vocab_size)
    before = FORWARD(graphdef, params, idx)
    after = FORWARD(gpt.abstract_params(cfg)[0], grown, idx)
    assert np.array_equal(after[..., : TINY.vocab_size], before)


def test_fit_conversation_drops_the_oldest_turns():
    tok = sft.chat_tokenizer(CharTokenizer("abcdefgh "))
    turns = [{"role": "system", "content": "ab"}]
    for i in range(5):
        turns += [{"role": "user", "content": "abcd"}, {"role": "assistant", "content": "ef"}]
    turns.append({"role": "user", "content": "gh"})
    ids, kept = sft.fit_conversation(tok, turns, 30)
    assert len(ids) <= 30 and kept[0]["role"] == "system" and kept[-1]["content"] == "gh"
    assert kept[1]["role"] == "user" and len(kept) < len(turns)
    assert ids == sft.encode_conversation(tok, kept, add_generation_prompt=True)[0]
    one_more = [turns[0]] + turns[-(len(kept) - 1) - 2:]  # the next older exchange too
    assert len(sft.encode_conversation(tok, one_more, add_generation_prompt=True)[0]) > 30
    ids, kept = sft.fit_conversation(tok, [{"role": "user", "content": "a" * 50}], 20)
    assert len(ids) == 20 and ids[-1] == tok.ids["<|assistant|>"]  # cut from the left


# --- Data ----------------------------------------------------------------------------------


def test_builtin_examples_are_deterministic_correct_and_held_out_apart():
    a = instructions.builtin_examples(600, seed=3, val_fraction=0.2)
    assert a == instructions.builtin_examples(600, seed=3, val_fraction=0.2)
    assert a != instructions.builtin_examples(600, seed=4, val_fraction=0.2)
    assert {e["task"] for e in a} == set(instructions.TASKS)
    assert 0.1 < np.mean([len(e["messages"]) > 2 for e in a]) < 0.4  # some chain questions
    for e in a:
        pairs = list(zip(e["messages"][::2], e["messages"][1::2]))
        assert all(u["role"] == "user" and r["role"] == "assistant" for u, r in pairs)
        for (user, reply), question in ((p, p[0]["content"]) for p in pairs):
            answer = reply["content"]
            if question.startswith("what is "):
                assert answer == str(eval(question[len("what is "):-1]))
            elif question.startswith("reverse: "):
                assert answer[::-1] == question[len("reverse: "):]
            elif question.startswith("uppercase: "):
                assert answer == question[len("uppercase: "):].upper()
            else:
                assert answer == question[len("first word: "):].split()[0]
        # A conversation's questions are all held out or none is.
        held = {instructions.question_held_out(u["content"], 0.2) for u, _ in pairs}
        assert len(held) == 1
    data = sft.prepare(DataConfig(source="sft", sft_examples=600, val_fraction=0.2))
    val_questions = {m["content"] for e in data.val_examples for m in e["messages"]
                     if m["role"] == "user"}
    train_questions = {m["content"] for e in a if not sft.held_out(e["messages"], 0.2)
                       for m in e["messages"] if m["role"] == "user"}
    assert val_questions and not train_questions & val_questions
    assert 0.1 < len(data.val) / (len(data.val) + len(data.train)) < 0.3


def test_jsonl_reads_both_formats_and_names_a_bad_line(tmp_path):
    good = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]},
            {"prompt": "2 + 2", "response": "4", "task": "add"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(g) for g in good) + "\n\n")
    examples = sft.read_jsonl(str(path))
    assert [e["messages"] for e in examples] == [good[0]["messages"], [
        {"role": "user", "content": "2 + 2"}, {"role": "assistant", "content": "4"}]]
    assert examples[1]["task"] == "add"
    bad_lines = ['{"prompt": "no response"}', "not json",
                 '{"messages": [{"role": "user", "content": "no reply"}]}',
                 '{"messages": [{"role": "robot", "content": "x"}]}']
    for bad in bad_lines:
        path.write_text(json.dumps(good[0]) + "\n\n" + bad + "\n")
        with pytest.raises(UserError, match=rf"{path}, line 3"):
            sft.read_jsonl(str(path))


# --- Freezing ------------------------------------------------------------------------------


def test_frozen_params_stay_bit_identical(tiny):
    """Whole leaves (wte, ln_f) and single layers of stacked ones (block 0, block 1's MLP)."""
    spec = "wte,h.0,h.1.mlp,ln_f"
    graphdef, params = tiny
    cfg = TrainConfig(learning_rate=1e-2, warmup_iters=0, max_iters=10, weight_decay=0.1,
                      freeze=spec)
    tx = make_optimizer(cfg, params)
    step = make_train_step(graphdef, tx)
    p, state = copy(params), tx.init(params)
    for i in range(3):
        p, state, _ = step(p, state, random_batch(i, (1, 4, T))[:2], jax.random.key(i))
    frozen = spec.split(",")
    changed = 0
    for path, before in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        after = p
        for k in path:
            after = after[k.key]
        for layer in range(TINY.n_layer) if name.startswith("h.") else [None]:
            full = name if layer is None else f"h.{layer}.{name[2:]}"
            a, b = (np.asarray(x if layer is None else x[layer]) for x in (before, after))
            if any(full == f or full.startswith(f + ".") for f in frozen):
                assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), full
            else:
                changed += not np.array_equal(a, b)
    assert changed > 3


def test_freeze_pattern_that_matches_nothing_is_named(tiny):
    with pytest.raises(UserError, match="'h.9'"):
        make_optimizer(TrainConfig(freeze="wte,h.9"), tiny[1])


# --- The exercise, in small ----------------------------------------------------------------


def save_run(run_dir, config, tokenizer, params) -> None:
    """A run directory as train.py leaves one (for init_from), without training."""
    ckpts = checkpoint.Checkpoints(run_dir, async_save=False)
    ckpts.save(1, params, {"count": jnp.zeros(())}, {"config": config.to_dict(),
                                                     "tokenizer": tokenizer.to_json()})
    ckpts.close()


def test_fine_tune_a_pretrained_run_with_frozen_embeddings(run_config, tmp_path):
    config = run_config(tmp_path / "pre", model={"block_size": 32})
    tokenizer = CharTokenizer(make_corpus())
    model_cfg = dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size)
    _, before = gpt.init_params(model_cfg, jax.random.key(0))
    save_run(tmp_path / "pre", dataclasses.replace(config, model=model_cfg), tokenizer, before)

    lines = [{"prompt": f"reverse: {w}", "response": w[::-1]} for w in WORDS if w.isalpha()]
    path = tmp_path / "rev.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines * 3))
    base = run_config(tmp_path / "sft", max_iters=30, eval_interval=15, learning_rate=3e-2,
                      init_from=str(tmp_path / "pre"), freeze="wte,h.0")
    config = dataclasses.replace(base, data=dataclasses.replace(
        base.data, source="jsonl", path=str(path), val_fraction=0.3))
    after = train(config)["params"]
    V = tokenizer.vocab_size
    # V + 4 <= 64: the chat tokens take rows of the padding, as GPT-2's do (50261 <= 50304).
    assert after["wte"]["embedding"].shape == before["wte"]["embedding"].shape == (64, 32)
    assert np.array_equal(after["wte"]["embedding"][:V], before["wte"]["embedding"][:V])
    assert not np.array_equal(after["wte"]["embedding"][V:V + 4],
                              before["wte"]["embedding"][V:V + 4])  # the chat tokens' rows
    kernel_before, kernel_after = (p["h"]["attn"]["c_attn"]["kernel"] for p in (before, after))
    assert np.array_equal(kernel_after[0], kernel_before[0])
    assert not np.array_equal(kernel_after[1], kernel_before[1])
    records = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text()
               .splitlines()]
    evals = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.05

    graphdef, params, _, tok = load_model(str(tmp_path / "sft"))
    assert tok.to_json() == sft.chat_tokenizer(tokenizer).to_json()
    data = sft.prepare(config.data, tok.base)
    acc, rows = sft.accuracy(graphdef, params, tok, data.val_examples[:8], batch_size=8)
    assert len(rows) == 8 and acc == np.mean([r["ok"] for r in rows])
    assert all(r["want"] == r["prompt"][len("reverse: "):][::-1] for r in rows)


def test_chat_tokens_take_gpt2_padding_rows(run_config, tmp_path):
    cfg = gpt.ModelConfig(vocab_size=GPT2_VOCAB_SIZE, n_layer=1, n_head=2, n_embd=8,
                          block_size=16)
    _, source = gpt.init_params(cfg, jax.random.key(0))
    hf.save_hf(tmp_path / "gpt2-like", cfg, source)
    config = run_config(tmp_path / "out", init_from=str(tmp_path / "gpt2-like"))
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, source="sft", tokenizer="gpt2"))
    tok = sft.chat_tokenizer(gpt2_tokenizer())
    config, params = apply_init_from(config, tok)
    assert config.model.vocab_size == 50261 and config.model.padded_vocab_size == 50304
    table = np.asarray(params["wte"]["embedding"])
    assert table.shape == (50304, 8)
    assert np.array_equal(table[:50257], source["wte"]["embedding"][:50257])
    assert np.all(np.abs(table[50257:50261]).sum(axis=1) > 0) and not table[50261:].any()
    with pytest.raises(UserError, match="GPT-2's vocabulary"):  # char ids into GPT-2's rows
        apply_init_from(dataclasses.replace(config, data=dataclasses.replace(
            config.data, tokenizer="char")), sft.chat_tokenizer(CharTokenizer("abc")))
