"""Optimizer, train step and training run: accumulation, schedule, decay, exact resume."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import model as gpt
from llm_jax.config import TrainConfig
from llm_jax.errors import UserError
from llm_jax.optim import clip_by_global_norm, decay_mask, learning_rate, make_optimizer
from llm_jax.step import make_train_step
from llm_jax.training import train, train_loss_from_steps
from tests.conftest import TINY

T = TINY.block_size


def copy(tree):
    return jax.tree.map(jnp.array, tree)


def leaves_with_names(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="."): x
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b):
    """Same structure, dtypes and values to the bit."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


# --- The train step ----------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_big_batch():
    graphdef, params = gpt.init_params(TINY, jax.random.key(0))
    tx = optax.sgd(1.0)  # the update is minus the gradient: any error in it shows in the params
    train_step = make_train_step(graphdef, tx)
    x = jax.random.randint(jax.random.key(1), (8, T), 0, TINY.vocab_size)
    y = jax.random.randint(jax.random.key(2), (8, T), 0, TINY.vocab_size)
    key = jax.random.key(3)

    p1, _, m1 = train_step(copy(params), tx.init(params), (x[None], y[None]), key)
    p2, _, m2 = train_step(copy(params), tx.init(params), (x.reshape(2, 4, T), y.reshape(2, 4, T)),
                           key)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    assert float(m1["grad_norm"]) > 0.1
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# --- The optimizer -----------------------------------------------------------------------------


def nanogpt_get_lr(it, *, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """nanoGPT's train.py get_lr, verbatim in substance."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("lr_decay_iters, max_iters", [(100, 150), (0, 100)])
def test_learning_rate_schedule_is_nanogpts(lr_decay_iters, max_iters):
    cfg = TrainConfig(learning_rate=6e-4, min_lr=6e-5, warmup_iters=10,
                      lr_decay_iters=lr_decay_iters, max_iters=max_iters)
    schedule = learning_rate(cfg)
    for it in (0, 1, 5, 9, 10, 11, 37, 50, 99, 100, 101, 149):
        want = nanogpt_get_lr(it, learning_rate=6e-4, min_lr=6e-5, warmup_iters=10,
                              lr_decay_iters=lr_decay_iters or max_iters)
        assert float(schedule(it)) == pytest.approx(want, rel=1e-6), it


def test_optimizer_steps_with_the_schedule_from_step_0():
    cfg = TrainConfig(learning_rate=1e-2, min_lr=1e-3, warmup_iters=3, lr_decay_iters=8,
                      max_iters=12, weight_decay=0.0)
    tx = make_optimizer(cfg)
    params = {"w": {"kernel": jnp.zeros((3, 3))}}
    grads = {"w": {"kernel": jnp.ones((3, 3))}}  # constant: Adam's step is then exactly lr
    update = jax.jit(tx.update)
    state = tx.init(params)
    for it in range(cfg.max_iters):
        updates, state = update(grads, state, params)
        want = nanogpt_get_lr(it, learning_rate=1e-2, min_lr=1e-3, warmup_iters=3,
                              lr_decay_iters=8)
        np.testing.assert_allclose(updates["w"]["kernel"], -want, rtol=1e-5)


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    _, params = gpt.init_params(TINY, jax.random.key(0))
    mask = leaves_with_names(decay_mask(params))
    assert {name for name, decayed in mask.items() if decayed} == {
        "wte.embedding", "wpe.embedding", "h.attn.c_attn.kernel", "h.attn.c_proj.kernel",
        "h.mlp.c_fc.kernel", "h.mlp.c_proj.kernel"}
    assert all(type(v) is bool for v in mask.values())

    # With zero gradients AdamW's whole update is the decay: p <- p - lr * wd * p.
    cfg = TrainConfig(learning_rate=1e-2, warmup_iters=0, max_iters=10, weight_decay=0.5)
    tx = make_optimizer(cfg)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for name, u in leaves_with_names(updates).items():
        p = leaves_with_names(params)[name]
        want = -1e-2 * 0.5 * p if mask[name] else jnp.zeros_like(p)
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-12, err_msg=name)


def test_clipping_equals_optax_and_reuses_the_given_norm():
    grads = {"a": {"kernel": jnp.arange(12.0).reshape(3, 4) - 5}, "b": {"scale": jnp.ones(4)}}
    norm = optax.tree.norm(grads)  # about 11.7
    for max_norm in (0.5, 5.0, 100.0):  # clipped, clipped, not
        want, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        clip = clip_by_global_norm(max_norm)
        for given in (None, norm):
            got, _ = clip.update(grads, clip.init(grads), grad_norm=given)
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
                np.testing.assert_allclose(b, a, rtol=1e-6)
    # the given norm is what scales (here a false one, to see it used) ...
    got, _ = clip_by_global_norm(1.0).update(grads, optax.EmptyState(), grad_norm=4.0)
    np.testing.assert_allclose(got["a"]["kernel"], grads["a"]["kernel"] / 4.0, rtol=1e-6)
    # ... unless the clip takes its own (frozen params: the norm of the trained ones alone)
    got, _ = clip_by_global_norm(1.0, given_norm=False).update(grads, optax.EmptyState(),
                                                                grad_norm=4.0)
    np.testing.assert_allclose(got["a"]["kernel"], grads["a"]["kernel"] / float(norm), rtol=1e-6)


def test_frozen_params_are_left_out_of_the_clipping_norm():
    """With train.freeze the step's norm (of every gradient) is not the one that clips."""
    params = {"wte": {"embedding": jnp.ones((4, 2))}, "ln_f": {"scale": jnp.ones(2)}}
    grads = {"wte": {"embedding": jnp.full((4, 2), 100.0)}, "ln_f": {"scale": jnp.full(2, 3.0)}}
    cfg = TrainConfig(learning_rate=1e-2, warmup_iters=0, max_iters=10, weight_decay=0.0,
                      grad_clip=1.0, freeze="wte")
    tx = make_optimizer(cfg, params)
    got, state = tx.update(grads, tx.init(params), params, grad_norm=optax.tree.norm(grads))
    # Adam's first moment holds (1 - beta1) x the clipped gradient: 3 / |(3, 3)| each
    clipped = 3.0 / np.sqrt(18.0)
    moments = [np.asarray(a) for a in jax.tree.leaves(state) if np.shape(a) == (2,)]
    assert any(np.allclose(m, (1 - cfg.beta1) * clipped, rtol=1e-6) for m in moments), moments
    assert not np.any(got["wte"]["embedding"])


# --- The training run --------------------------------------------------------------------------

N_STEPS = 60
RUN = dict(max_iters=N_STEPS, lr_decay_iters=N_STEPS, eval_interval=30, ckpt_interval=20,
           keep_last=3, batch_size=16, learning_rate=1e-2, min_lr=1e-3)
# checkpoints at steps 20 (before the first evaluation), 40 and 60; evaluations at 30 and 60
DROPOUT = {"dropout": 0.1}  # so that the dropout keys are part of what must resume exactly


@pytest.fixture(scope="module")
def run(run_config, tmp_path_factory):
    """One short training run, shared: (config, summary)."""
    config = run_config(tmp_path_factory.mktemp("run") / "out", model=DROPOUT, **RUN)
    return config, train(config)


def records(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_run_writes_metrics_config_and_checkpoints(run):
    config, summary = run
    out_dir = Path(config.train.out_dir)
    recs = records(out_dir)
    losses = [r for r in recs if "loss" in r]
    assert [r["step"] for r in losses] == list(range(5, N_STEPS + 1, 5))  # every log_interval
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in losses)
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [30, 60]

    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["train"] == dataclasses.asdict(config.train)
    assert saved["data"] == dataclasses.asdict(config.data)
    vocab = saved["model"]["vocab_size"]  # resolved from the char tokenizer
    assert 20 < vocab < 80
    # linear_vjp=auto is saved as what the run used (one device here: XLA's backward)
    assert saved["model"] == dataclasses.asdict(dataclasses.replace(config.model, vocab_size=vocab,
                                                                    linear_vjp="xla"))

    assert sorted(int(p.name) for p in (out_dir / "ckpt").iterdir()) == [20, 40, 60]
    assert summary["final_loss"] == pytest.approx(losses[-1]["loss"])
    assert summary["val_loss"] == pytest.approx(evals[-1]["val_loss"])


def test_validation_loss_decreases(run):
    config, _ = run
    out_dir = Path(config.train.out_dir)
    evals = [r for r in records(out_dir) if "val_loss" in r]
    vocab = json.loads((out_dir / "config.json").read_text())["model"]["vocab_size"]
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    assert first < math.log(vocab) - 0.3  # better than chance after 30 steps
    assert last < first - 0.1


def test_resume_continues_the_run_exactly(run, run_config, tmp_path):
    config, full = run
    k = 25
    first = train(run_config(tmp_path / "b", model=DROPOUT, **dict(RUN, max_iters=k)))
    assert first["start_step"] == 0
    rest = train(run_config(tmp_path / "b", model=DROPOUT, **RUN, resume=True))
    assert rest["start_step"] == k
    assert_trees_equal(rest["params"], full["params"])
    assert_trees_equal(rest["opt_state"], full["opt_state"])
    assert rest["final_loss"] == full["final_loss"]
    assert rest["val_loss"] == full["val_loss"]


def test_resume_from_a_checkpoint_older_than_the_first_evaluation(run, run_config, tmp_path):
    """A crash between steps 20 and 40: only ckpt/20 survives, written before any evaluation."""
    config, full = run
    crashed = tmp_path / "crashed"
    shutil.copytree(config.train.out_dir, crashed)
    for step in ("40", "60"):
        shutil.rmtree(crashed / "ckpt" / step)
    shutil.rmtree(crashed / "best")
    resumed = train(run_config(crashed, model=DROPOUT, **RUN, resume=True))
    assert resumed["start_step"] == 20
    assert_trees_equal(resumed["params"], full["params"])
    assert resumed["final_loss"] == full["final_loss"]


def test_fresh_run_refuses_an_out_dir_with_checkpoints(run, run_config):
    config, _ = run
    ckpt_dir = Path(config.train.out_dir) / "ckpt"
    before = sorted(p.name for p in ckpt_dir.iterdir())
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(run_config(config.train.out_dir, model=DROPOUT, **RUN))
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before


def test_resume_with_another_model_shape_names_the_key(run, run_config):
    config, _ = run
    other = run_config(config.train.out_dir, model=dict(DROPOUT, n_layer=3), **RUN, resume=True)
    with pytest.raises(UserError, match="n_layer"):
        train(other)


def test_train_loss_at_evaluations_from_the_last_steps_or_held_out_batches(run_config, tmp_path):
    """eval_train: "steps" reports the mean logged loss of the last eval_iters steps and changes
    nothing else (params and val losses are those of the "held_out" run, to the bit)."""
    fields = dict(max_iters=20, eval_interval=10, eval_iters=4, log_interval=1)
    runs = {how: train(run_config(tmp_path / how, eval_train=how, **fields))
            for how in ("steps", "held_out")}
    recs = {how: records(tmp_path / how) for how in runs}
    step_loss = {r["step"]: r["loss"] for r in recs["steps"] if "loss" in r}
    evals = {how: [r for r in recs[how] if "val_loss" in r] for how in runs}
    assert [r["step"] for r in evals["steps"]] == [10, 20]
    for r in evals["steps"]:
        want = np.mean([step_loss[s] for s in range(r["step"] - 3, r["step"] + 1)])
        assert r["train_loss"] == pytest.approx(want, rel=1e-6)
    assert [r["val_loss"] for r in evals["steps"]] == [r["val_loss"] for r in evals["held_out"]]
    assert_trees_equal(runs["steps"]["params"], runs["held_out"]["params"])
    held = [r["train_loss"] for r in evals["held_out"]]
    assert held != [r["train_loss"] for r in evals["steps"]]  # other batches, other params
    assert all(abs(a["train_loss"] - b["train_loss"]) < 0.3
               for a, b in zip(evals["steps"], evals["held_out"]))


@pytest.mark.parametrize("model, train_fields, from_steps", [
    ({}, {}, True),  # dropout 0: a step's loss is its batch's eval-mode loss
    ({"dropout": 0.1}, {}, False),
    ({}, {"label_smoothing": 0.1}, False),
    ({"dropout": 0.1}, {"eval_train": "steps"}, True),
    ({}, {"eval_train": "held_out"}, False),
])
def test_eval_train_auto_uses_steps_only_where_they_are_eval_mode_losses(
        run_config, tmp_path, model, train_fields, from_steps):
    assert train_loss_from_steps(run_config(tmp_path, model=model, **train_fields)) is from_steps


def test_fine_tuning_resumes_exactly(run_config, tmp_path):
    """Packed conversations, loss mask and frozen layers: k steps + resume = N steps, to the bit;
    the tokenizer (char vocabulary plus chat tokens) comes back from the checkpoint."""
    lines = [{"prompt": f"reverse: {w}", "response": w[::-1]} for w in
             "the quick brown fox jumps over a lazy dog".split()]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines * 2))
    fields = dict(max_iters=8, eval_interval=4, eval_iters=2, ckpt_interval=4, freeze="h.0.mlp")

    def config(out_dir, **changes):
        c = run_config(tmp_path / out_dir, model={"block_size": 32}, **dict(fields, **changes))
        return dataclasses.replace(c, data=dataclasses.replace(
            c.data, source="jsonl", path=str(path), val_fraction=0.3))

    full = train(config("full"))
    train(config("resumed", max_iters=4))
    rest = train(config("resumed", resume=True))
    assert rest["start_step"] == 4
    assert_trees_equal(rest["params"], full["params"])
    assert rest["val_loss"] == full["val_loss"]


CHECK_WRITABLE = """
import sys, time
from pathlib import Path
from llm_jax.errors import UserError
from llm_jax.training import _check_writable
end = time.monotonic() + 2  # both processes at it at once, whichever imported first
while time.monotonic() < end:
    try:
        _check_writable(Path(sys.argv[1]))
    except UserError as e:
        print(e)
        sys.exit(1)
"""


def test_processes_sharing_out_dir_check_it_without_tripping_each_other(tmp_path):
    """The processes of a multi-process run check the same out_dir at the same moment: each
    writes and removes a probe of its own (one shared name failed one run in seven of
    tests/test_parallel.py: one process removed the other's probe)."""
    procs = [subprocess.Popen([sys.executable, "-c", CHECK_WRITABLE, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert list(tmp_path.iterdir()) == []  # no probe left behind
