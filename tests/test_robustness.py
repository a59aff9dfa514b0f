"""Never lose a run: kill -9 at random moments and resume to the same bits, stop signals, the
non-finite guard, disk room."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint, guards, training
from llm_jax import model as gpt
from llm_jax.config import TrainConfig
from llm_jax.errors import UserError
from llm_jax.optim import make_optimizer
from llm_jax.step import make_train_step, unless_nonfinite

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4",
       "--max_iters=120", "--ckpt_interval=4", "--keep_last=1", "--eval_interval=1000",
       "--eval_iters=1", "--log_interval=4", "--warmup_iters=2", "--progress=false"]


def saved_model(out_dir) -> gpt.ModelConfig:
    return gpt.ModelConfig(**json.loads((Path(out_dir) / "config.json").read_text())["model"])


def final_params(out_dir) -> tuple[int, list[np.ndarray]]:
    """(step, params) of the run's latest checkpoint."""
    _, step = checkpoint.find(out_dir)
    params, _, _ = checkpoint.restore(out_dir, gpt.abstract_params(saved_model(out_dir))[1])
    return step, [np.asarray(x) for x in jax.tree.leaves(params)]


def start(out_dir, corpus, *extra):
    log = open(Path(str(out_dir) + f".{time.monotonic_ns()}.log"), "w")
    return subprocess.Popen([sys.executable, "train.py", *RUN, *corpus, f"--out_dir={out_dir}",
                             "--resume=true", *extra],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def corpus(corpus_path, data_dir):
    return ["--data.source=text", f"--data.path={corpus_path}", f"--data.data_dir={data_dir}"]


def test_kill_9_at_random_moments_then_resume_gives_the_same_bits(tmp_path, corpus):
    """SIGKILL a train.py run at random moments (some while a checkpoint is being written),
    resume each time with --resume=true; the final params equal an uninterrupted run's bit for
    bit, and no incomplete checkpoint is ever picked up. LLM_JAX_CRASH_KILLS sets the number
    of kills (CI: 2)."""
    straight = tmp_path / "straight"
    assert start(straight, corpus).wait(timeout=300) == 0
    want_step, want = final_params(straight)
    assert want_step == 120

    rng = random.Random(int(os.environ.get("LLM_JAX_CRASH_SEED", "0")))
    run, kills, mid_save = tmp_path / "killed", 0, 0
    while kills < int(os.environ.get("LLM_JAX_CRASH_KILLS", "2")):
        proc = start(run, corpus)
        # Wait until it trains (past start-up and compilation), then a random while longer.
        t0 = time.monotonic()
        while proc.poll() is None and not (run / "metrics.jsonl").exists():
            time.sleep(0.05)
            assert time.monotonic() - t0 < 300
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:  # it finished first: the run is done
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_save += any(".orbax-checkpoint-tmp" in p.name for p in (run / "ckpt").glob("*"))
        if checkpoint.exists(run):  # whatever is found is complete and readable
            step, _ = final_params(run)
            assert step % 4 == 0
    assert start(run, corpus).wait(timeout=300) == 0
    got_step, got = final_params(run)
    assert got_step == 120 and kills >= 1
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    print(f"{kills} kills, {mid_save} leaving an unfinished checkpoint folder behind")


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_exit_0(tmp_path, corpus):
    out = tmp_path / "run"
    proc = start(out, corpus, "--max_iters=100000", "--ckpt_interval=100000",
                 "--log_interval=1")
    t0 = time.monotonic()
    while proc.poll() is None and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
        assert time.monotonic() - t0 < 300
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log = next(tmp_path.glob("run.*.log")).read_text()
    assert "SIGTERM: stopping after this step" in log
    stopped = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if "stopped_by" in line]
    assert len(stopped) == 1 and stopped[0]["stopped_by"] == "SIGTERM"
    step = stopped[0]["step"]
    assert checkpoint.find(out)[1] == step and f"stopped at step {step} of 100000" in log


def test_a_second_signal_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    messages = []
    with pytest.raises(KeyboardInterrupt):
        with guards.StopSignals(messages.append) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert stop.requested == "SIGINT" and "stopping after this step" in messages[0]
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_non_finite_step_changes_nothing():
    cfg = gpt.ModelConfig(vocab_size=16, vocab_multiple=8, n_layer=1, n_head=2, n_embd=16,
                          block_size=8)
    tx = make_optimizer(TrainConfig(learning_rate=1e-2, warmup_iters=0, max_iters=10))
    graphdef, params = gpt.init_params(cfg, jax.random.key(0))
    step = make_train_step(graphdef, tx)
    x = jnp.zeros((1, 2, 8), jnp.int32)
    good = (x, x, jnp.ones((1, 2, 8)))
    params, opt_state, m = step(params, tx.init(params), good, jax.random.key(0))
    assert bool(m["finite"])
    before = jax.device_get((params, opt_state))
    bad = (x, x, jnp.ones((1, 2, 8)).at[0, 0, 3].set(jnp.nan))  # a NaN in the loss
    params, opt_state, m = step(params, opt_state, bad, jax.random.key(1))
    assert not bool(m["finite"]) and np.isnan(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get((params, opt_state)))):
        assert np.array_equal(a, b)  # params and Adam state bit for bit
    params, _, m = step(params, opt_state, good, jax.random.key(2))
    assert bool(m["finite"]) and all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def poisoned_at(step_to_poison: int):
    """make_train_step whose batch gets a NaN loss mask at one step (counted from 1)."""
    real = training.make_train_step

    def make(graphdef, tx, **kw):
        step, calls = real(graphdef, tx, **kw), [0]

        def call(params, opt_state, batch, key):
            calls[0] += 1
            x = batch[0]
            mask = jnp.ones(x.shape, jnp.float32)
            if calls[0] == step_to_poison:
                mask = mask.at[0, 0, 0].set(jnp.nan)
            return step(params, opt_state, (batch[0], batch[1], mask), key)

        return call

    return make


def test_training_skips_a_non_finite_step_and_reports_it(tmp_path, run_config, monkeypatch):
    monkeypatch.setattr(training, "make_train_step", poisoned_at(3))
    summary = training.train(run_config(tmp_path, max_iters=8, log_interval=4))
    assert summary["skipped_steps"] == [3]
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(summary["params"]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if "skipped_steps" in r] == [[3]]


def test_nonfinite_stop_keeps_the_last_good_checkpoint(tmp_path, run_config, monkeypatch):
    monkeypatch.setattr(training, "make_train_step", poisoned_at(5))
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step 5; training "
                                        r"stopped .*the last good checkpoint is .*ckpt.4"):
        training.train(run_config(tmp_path, max_iters=8, log_interval=1, ckpt_interval=2,
                                  nonfinite="stop"))
    folder, step = checkpoint.find(tmp_path)
    assert step == 4  # nothing saved after the bad step
    _, params = final_params(tmp_path)
    assert all(np.isfinite(p).all() for p in params)


def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, run_config, capsys):
    summary = training.train(run_config(tmp_path, max_iters=2, resume=True))
    assert summary["start_step"] == 0 and checkpoint.find(tmp_path)[1] == 2
    assert "no checkpoint to resume from: starting at step 0" in capsys.readouterr().out


def test_resume_after_a_kill_during_the_first_save_starts_from_step_0(tmp_path, run_config,
                                                                      capsys):
    """Killed while writing its first checkpoint: ckpt/ holds only orbax's unfinished folder.
    --resume=true starts again from step 0 instead of refusing the out_dir."""
    (tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
    summary = training.train(run_config(tmp_path, max_iters=2, resume=True))
    assert summary["start_step"] == 0 and checkpoint.find(tmp_path)[1] == 2
    assert "no checkpoint to resume from: starting at step 0" in capsys.readouterr().out


def test_a_full_disk_is_refused_before_training(tmp_path, run_config, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(UserError, match=r"has 0.0 MB free; 4 checkpoints of this model need"):
        training.train(run_config(tmp_path / "run"))
    assert not (tmp_path / "run" / "ckpt").exists()


@pytest.mark.parametrize("branch", [True, False], ids=["cond", "select"])
def test_the_non_finite_guard_either_way(branch):
    """The guard as a lax.cond (CPU) and as a select (elsewhere): the update where finite,
    else the inputs bit for bit and NaN extra metrics; under jit with the inputs donated."""
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    state = {"m": jnp.full((2, 3), 0.5), "count": jnp.int32(4)}

    def update(params, state):
        new = jax.tree.map(lambda p: p * 2.0 + 1.0, params)
        extra = {"ratio": params["b"][0] * 3}
        return new, {"m": state["m"] - 1.0, "count": state["count"] + 1}, extra

    guarded = jax.jit(lambda finite, p, s: unless_nonfinite(finite, update, p, s, branch=branch),
                      donate_argnums=(1, 2))
    want = jax.device_get(update(params, state))
    got = guarded(jnp.bool_(True), jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(got))):
        assert np.array_equal(a, b)
    p, s, extra = guarded(jnp.bool_(False), jax.tree.map(jnp.copy, params),
                          jax.tree.map(jnp.copy, state))
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves(jax.device_get((p, s)))):
        assert np.array_equal(a, b)
    assert np.isnan(float(extra["ratio"]))


def test_the_host_queues_at_most_a_few_steps_and_eval_batches(tmp_path, run_config, monkeypatch):
    """Training and evaluation wait for the result of the step (eval batch) AHEAD calls back
    before queueing more: unbounded queues deadlocked XLA:CPU's collectives between per-core
    devices (train.py --eval_iters=300 on the Shakespeare model aborted after 40 s)."""
    waited, calls = set(), {"train": [], "eval": []}

    def waits(real):
        def wait(x):
            waited.update(id(leaf) for leaf in jax.tree.leaves(x))
            return real(x)
        return wait

    def spying(kind, make):
        def wrapped(*args, **kw):
            fn = make(*args, **kw)

            def call(*a):
                seen = calls[kind]
                # every result more than AHEAD calls old has been waited for
                assert all(id(r) in waited for r in seen[:max(len(seen) - training.AHEAD, 0)])
                out = fn(*a)
                seen.append(out[2]["loss"] if kind == "train" else out)
                return out
            return call
        return wrapped

    monkeypatch.setattr(jax, "block_until_ready", waits(jax.block_until_ready))
    monkeypatch.setattr(jax, "device_get", waits(jax.device_get))
    monkeypatch.setattr(training, "make_train_step", spying("train", training.make_train_step))
    monkeypatch.setattr(training, "make_eval_step", spying("eval", training.make_eval_step))
    training.train(run_config(tmp_path, max_iters=12, log_interval=12, eval_interval=12,
                              eval_iters=9, eval_train="held_out"))  # 9 batches of each split
    assert len(calls["train"]) == 12 and len(calls["eval"]) == 18
