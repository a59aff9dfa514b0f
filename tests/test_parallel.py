"""Parallel training on 8 simulated CPU devices, and two real processes over loopback."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from llm_jax.config import load_config
from llm_jax.training import train

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"


def run_worker(script: str, env_extra: dict, *args: str, timeout: int = 240):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, str(WORKERS / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def eight_devices():
    proc = run_worker("parallel_8dev.py",
                      {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["8x1", "1x8", "2x4", "8x1_per_device"])
def test_sharded_training_equals_one_device(eight_devices, mesh):
    r = eight_devices[mesh]
    assert r["loss_diff"] < 1e-6 and r["grad_norm_diff"] < 1e-6
    assert r["grad_diff"] < 1e-6  # every gradient entry, not only the norm
    # After 6 Adam steps at lr 1e-2: Adam divides by sqrt(v), so summation-order noise in tiny
    # gradients moves a few params by up to ~1e-3 of a step.
    assert r["param_diff"] < 1e-4
    assert r["shardings_kept"]  # the step's outputs keep the params' shardings (donation works)
    if mesh not in ("8x1", "8x1_per_device"):
        assert r["sharded_leaves"] > 0  # fully sharded: the params really are split


@pytest.mark.parametrize("devices", ["1", "4"])
def test_checkpoint_from_8_devices_restores_elsewhere_and_training_continues(eight_devices,
                                                                           devices):
    r = eight_devices[f"restore_on_{devices}"]
    assert r["on_mesh"] and r["step"] == 3
    assert r["loss_diff"] < 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=8",
        "--max_iters=6", "--lr_decay_iters=6", "--warmup_iters=2", "--learning_rate=1e-2",
        "--eval_interval=3", "--eval_iters=2", "--log_interval=1", "--progress=false",
        "--distributed_timeout=60"]


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def train_py(out_dir, corpus, devices: int, *extra: str):
    """Start train.py; its output goes to files (a full pipe would stall it, and with it every
    process of the job at the next collective)."""
    log = out_dir.parent / f"{out_dir.name}-{len(list(out_dir.parent.glob('*.log')))}.log"
    f = log.open("w+")
    p = subprocess.Popen(
        [sys.executable, "train.py", *TINY, *corpus, f"--out_dir={out_dir}", *extra],
        env=dict(os.environ, PYTHONPATH=str(ROOT),
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"),
        cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
    return p, f


def finish(started, timeout=240) -> list[str]:
    outs = []
    try:
        for p, f in started:
            p.wait(timeout=timeout)
            f.seek(0)
            out = f.read()
            assert p.returncode == 0, out[-3000:]
            outs.append(out)
    finally:
        for p, f in started:
            p.kill()
            f.close()
    return outs


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, corpus_path, data_dir):
    """The reference: train.py's run of 6 steps on the one device of this process."""
    corpus = ["--data.source=text", f"--data.path={corpus_path}", f"--data.data_dir={data_dir}"]
    out = tmp_path_factory.mktemp("one")
    summary = train(load_config([*TINY, *corpus, f"--out_dir={out}"]))
    return corpus, losses(out), summary


def test_train_py_on_two_processes_equals_one_device(tmp_path, one_device):
    """jax.distributed over loopback (gloo): 2 processes x 2 devices, data parallel; each
    process reads its own rows; both end with the same loss, one device's."""
    corpus, want, _ = one_device
    port = free_port()
    outs = finish([train_py(tmp_path, corpus, 2, f"--coordinator=127.0.0.1:{port}",
                            "--num_processes=2", f"--process_id={i}") for i in range(2)])
    assert "4 devices (4 data x 1 fsdp) on 2 processes" in outs[0]
    done = [[line for line in out.splitlines() if line.startswith("done: ")] for out in outs]
    assert len(done[0]) == 1 and done[0] == done[1]  # both processes end with the same loss
    got = losses(tmp_path)  # written by process 0 only: one record a step
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) < 1e-5
    assert (tmp_path / "ckpt" / "6").is_dir() and (tmp_path / "best" / "6").is_dir()


def test_train_py_fsdp_on_8_devices_then_resume_on_one(tmp_path, one_device):
    """3 steps fully sharded (2 data x 4 fsdp) on 8 devices, then the run resumed on 1 device:
    the losses of the straight one-device run, and its final params."""
    from llm_jax import checkpoint

    corpus, want, summary = one_device
    (out,) = finish([train_py(tmp_path, corpus, 8, "--fsdp=4", "--max_iters=3")])
    assert "8 devices (2 data x 4 fsdp)" in out
    resumed = train(load_config([*TINY, *corpus, f"--out_dir={tmp_path}", "--resume=true"]))
    got = losses(tmp_path)
    for step in want:
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    meta = checkpoint.read_meta(tmp_path)
    assert meta["step"] == 6
    for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(summary["params"])):
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) < 1e-4


@pytest.mark.parametrize("flags, message", [
    (["--fsdp=2"], "train.fsdp=2 must divide the 1 devices"),
    (["--data_parallel=2"], r"train.data_parallel=2 x train.fsdp=1 must equal the number of "
                            r"devices \(1\)"),
    (["--data_parallel=0"], "train.data_parallel must be -1"),
    (["--coordinator=localhost"], "train.coordinator='localhost' must be host:port"),
    (["--coordinator=127.0.0.1:1234"], r"train.num_processes \(got 0\) and train.process_id"),
])
def test_mesh_and_process_mistakes_are_named(tmp_path, corpus_path, data_dir, flags, message):
    from llm_jax.errors import UserError

    corpus = ["--data.source=text", f"--data.path={corpus_path}", f"--data.data_dir={data_dir}"]
    with pytest.raises(UserError, match=message):
        train(load_config([*TINY, *corpus, f"--out_dir={tmp_path / 'run'}", *flags]))
    assert not (tmp_path / "run" / "ckpt").exists()  # refused before anything was written


def test_train_py_splits_the_cpu_into_per_core_devices(tmp_path, one_device):
    """--cpu_devices=2 with no XLA_FLAGS of the user's: train.py makes two CPU devices before
    JAX starts and trains data-parallel over them (per device, with the transposed linear
    backward), with one device's losses; the run then
    loads for sampling on this process's one device."""
    from llm_jax import sampling
    from llm_jax.inference import load_model

    corpus, want, _ = one_device
    log = tmp_path.parent / f"{tmp_path.name}-cpu.log"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with log.open("w+") as f:
        p = subprocess.run([sys.executable, "train.py", *TINY, *corpus, f"--out_dir={tmp_path}",
                            "--cpu_devices=2"], env=dict(env, PYTHONPATH=str(ROOT)), cwd=ROOT,
                           stdout=f, stderr=subprocess.STDOUT, text=True, timeout=240)
        f.seek(0)
        out = f.read()
    assert p.returncode == 0, out[-3000:]
    assert "2 devices (2 data x 1 fsdp) on 1 process" in out
    # per-core devices: the step written out per device, linear_vjp=auto -> transposed
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["linear_vjp"] == "transposed"
    got = losses(tmp_path)
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    graphdef, params, _, tok = load_model(str(tmp_path))
    assert {d for x in jax.tree.leaves(params) for d in x.devices()} == {jax.devices()[0]}
    text = sampling.generate_text(tok, graphdef, params, ["the "], max_new_tokens=5,
                                  key=jax.random.key(0), temperature=0.0)
    assert len(text) == 1 and isinstance(text[0], str)
