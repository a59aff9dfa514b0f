"""Checkpoints: save then restore is identical, old ones are pruned, partial ones are never read."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint
from llm_jax import model as gpt
from llm_jax.checkpoint import Checkpoints
from llm_jax.config import TrainConfig
from llm_jax.errors import UserError
from llm_jax.optim import make_optimizer
from tests.conftest import TINY

TX = make_optimizer(TrainConfig())


def states_at(steps):
    """{step: (params, opt_state)} that differ from step to step in every leaf, count included."""
    _, params0 = gpt.init_params(TINY, jax.random.key(0))
    update = jax.jit(TX.update)
    out = {}
    for step in steps:
        params = jax.tree.map(lambda x: x + step, params0)
        opt_state = TX.init(params)
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01 * step), params)
        for _ in range(step):
            _, opt_state = update(grads, opt_state, params)
        out[step] = params, opt_state
    return out


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def states():
    return states_at((1, 2, 3, 4))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, states):
    """ckpt/ saved at steps 1..4 (keep_last=2), best/ at step 2."""
    run_dir = tmp_path_factory.mktemp("ckpts")
    ckpts = Checkpoints(run_dir, keep_last=2)
    for step, (params, opt_state) in states.items():
        ckpts.save(step, params, opt_state, {"val_loss": 1.0 / step, "note": f"step {step}"})
        if step == 2:
            ckpts.save(step, params, opt_state, {"val_loss": 0.5}, best=True)
    ckpts.wait()
    ckpts.close()
    return run_dir


def test_save_then_restore_is_identical(run_dir, states):
    params, opt_state = states[4]
    got_params, got_opt, meta = checkpoint.restore(run_dir, abstract(params), abstract(opt_state))
    assert_trees_equal(got_params, params)
    assert_trees_equal(got_opt, opt_state)
    assert meta["step"] == 4 and meta["val_loss"] == 0.25 and meta["note"] == "step 4"
    assert meta["format"] == checkpoint.FORMAT
    assert checkpoint.read_meta(run_dir) == meta


def test_restore_params_only(run_dir, states):
    params, _ = states[4]
    got_params, got_opt, meta = checkpoint.restore(run_dir, abstract(params))
    assert got_opt is None
    assert_trees_equal(got_params, params)
    assert meta["step"] == 4


def test_only_the_last_checkpoints_and_the_best_are_kept(run_dir, states):
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["3", "4"]
    assert sorted(p.name for p in (run_dir / "best").iterdir()) == ["2"]
    params, opt_state = states[2]
    got_params, got_opt, meta = checkpoint.restore(run_dir, abstract(params), abstract(opt_state),
                                                   which="best")
    assert_trees_equal(got_params, params)
    assert_trees_equal(got_opt, opt_state)
    assert meta["step"] == 2 and meta["val_loss"] == 0.5


def test_restore_into_another_model_shape_is_a_user_error(run_dir):
    _, other = gpt.abstract_params(dataclasses.replace(TINY, n_embd=48))
    with pytest.raises(UserError):
        checkpoint.restore(run_dir, other)


def test_missing_or_empty_directory_is_a_user_error(tmp_path, states):
    params, _ = states[1]
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.restore(tmp_path / "nowhere", abstract(params))
    with pytest.raises(UserError, match="no latest checkpoint"):
        checkpoint.restore(tmp_path, abstract(params))
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UserError, match="no latest checkpoint"):
        checkpoint.read_meta(tmp_path)
    with pytest.raises(UserError, match="no best checkpoint"):
        checkpoint.find(tmp_path, "best")


def test_partially_written_checkpoints_are_never_read(run_dir, states, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = run / "ckpt"
    # What a crash can leave behind: orbax's temporary folder of a save in progress, and a step
    # folder that never got its metadata. Both hold complete-looking arrays of another step.
    shutil.copytree(ckpt / "3", ckpt / "30.orbax-checkpoint-tmp-123")
    shutil.copytree(ckpt / "3", ckpt / "40")
    shutil.rmtree(ckpt / "40" / "meta")

    assert checkpoint.find(run) == (ckpt, 4)
    assert checkpoint.read_meta(run)["step"] == 4
    params, opt_state = states[4]
    got_params, got_opt, meta = checkpoint.restore(run, abstract(params), abstract(opt_state))
    assert meta["step"] == 4
    assert_trees_equal(got_params, params)
    assert_trees_equal(got_opt, opt_state)


def test_unreadable_or_foreign_metadata_is_a_user_error(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    meta_file = run / "ckpt" / "4" / "meta" / "metadata"
    meta_file.write_text(json.dumps({"format": 999, "step": 4}))
    with pytest.raises(UserError, match="format"):
        checkpoint.read_meta(run)
    meta_file.write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        checkpoint.read_meta(run)
