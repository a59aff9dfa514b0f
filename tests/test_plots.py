"""Inspection during training and the pictures of a run: a tiny run with inspect_interval set,
every plot command on it, TensorBoard files, and the one-line errors."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from llm_jax import plots
from llm_jax.errors import UserError
from llm_jax.training import train
from tests.conftest import TINY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(run_config, tmp_path_factory):
    """A tiny run of 10 steps with gradient statistics every 5 steps."""
    out_dir = tmp_path_factory.mktemp("plots") / "run"
    train(run_config(out_dir, max_iters=10, inspect_interval=5, eval_interval=5, log_interval=5,
                     eval_iters=2))
    return out_dir


def test_training_writes_inspection_records(run_dir):
    records = plots.read_metrics(run_dir)
    inspected = [r for r in records if "grad_norm/h.0" in r]
    assert [r["step"] for r in inspected] == [5, 10]
    groups = [f"h.{i}" for i in range(TINY.n_layer)] + ["wte", "wpe", "ln_f"]
    streams = ["embed"] + [f"h.{i}" for i in range(TINY.n_layer)]
    want = ({f"grad_norm/{g}" for g in groups} | {f"update_ratio/{g}" for g in groups}
            | {f"act_{s}/{w}" for s in ("mean", "std", "absmax") for w in streams} | {"step"})
    for r in inspected:
        assert set(r) == want
        assert all(v > 0 for k, v in r.items() if not k.startswith("act_mean/"))
    assert [r["step"] for r in records if "loss" in r] == [5, 10]  # the log lines are unchanged


@pytest.mark.parametrize("command", ["loss", "grads", "saliency", "attention"])
def test_each_plot_command_writes_a_png(run_dir, tmp_path, command, capsys):
    png = tmp_path / "pics" / f"{command}.png"
    plots.main([command, "--out_dir", str(run_dir), "--png", str(png), "--prompt", "The fox"])
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert 5_000 < png.stat().st_size < 400_000
    assert f"wrote {png}" in capsys.readouterr().out


def read_events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of TensorBoard event files (TFRecord framing around Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_holds_the_metrics(run_dir, tmp_path):
    pytest.importorskip("tensorboardX")
    logdir = tmp_path / "tb"
    plots.main(["tensorboard", "--out_dir", str(run_dir), "--logdir", str(logdir)])
    scalars = read_events(logdir)
    records = plots.read_metrics(run_dir)
    for name in ("loss", "val_loss", "grad_norm/h.1", "update_ratio/wte", "act_std/embed"):
        want = [(r["step"], r[name]) for r in records if name in r]
        assert [s for s, _ in scalars[name]] == [s for s, _ in want]
        assert [v for _, v in scalars[name]] == pytest.approx([v for _, v in want], rel=1e-6)


def test_tensorboard_without_a_writer_says_what_to_install(run_dir, tmp_path, monkeypatch):
    for name in ("tensorboardX", "torch", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    with pytest.raises(UserError, match="pip install tensorboardX"):
        plots.main(["tensorboard", "--out_dir", str(run_dir), "--logdir", str(tmp_path / "tb")])


def test_errors_are_one_line(run_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        plots.main(["loss", "--out_dir", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="metrics.jsonl is missing"):
        plots.main(["loss", "--out_dir", str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 3.0}) + "\n")
    with pytest.raises(UserError, match="--inspect_interval"):
        plots.main(["grads", "--out_dir", str(tmp_path)])
    with pytest.raises(UserError, match="no latest checkpoint"):
        plots.main(["attention", "--out_dir", str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "loss"\n')
    with pytest.raises(UserError, match="line 1 is not JSON"):
        plots.main(["loss", "--out_dir", str(tmp_path)])


def test_command_line_exit_code_and_message(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "llm_jax.plots", "loss", "--out_dir",
                             str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: run directory {str(tmp_path / 'nowhere')!r} does not exist"]
