"""Pictures of a training run, drawn without a display, and its metrics for TensorBoard.

    python -m llm_jax.plots loss --out_dir out          # train/val loss curves -> out/loss.png
    python -m llm_jax.plots grads --out_dir out         # per-layer gradient norms over time
    python -m llm_jax.plots saliency --out_dir out --prompt "The return value of a"
    python -m llm_jax.plots attention --out_dir out --prompt "The return value of a"
    python -m llm_jax.plots tensorboard --out_dir out --logdir out/tb

`loss` and `grads` read `out_dir/metrics.jsonl` (`grads` needs a run trained with
`--inspect_interval=N`, see llm_jax/inspection.py); `saliency` and `attention` load the run's
latest (or `--ckpt best`) checkpoint and look at one prompt. `--png FILE` chooses the picture's
path (default `out_dir/<command>.png`).

Design choices: figures are matplotlib `Figure` objects saved through the Agg canvas, never
pyplot, so nothing needs a display and no global state is touched; matplotlib is imported only
when a picture is drawn (`pip install 'llm_jax[plots]'`). TensorBoard files are written with
tensorboardX's (or torch's) SummaryWriter when one is installed, under the same names as in
metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.cli import run_main
from llm_jax.errors import UserError

DEFAULT_PROMPT = "The return value of a function is"
COMMANDS = ("loss", "grads", "saliency", "attention", "tensorboard")


# --- Reading a run ------------------------------------------------------------------------------


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The records of out_dir/metrics.jsonl, in order. UserError if there are none."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"run directory {str(out_dir)!r} does not exist")
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics in {str(out_dir)!r}: {path.name} is missing (train.py "
                        "writes it)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise UserError(f"{str(path)!r} line {n} is not JSON") from None
    return records


def by_step(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records holding `key`; a step logged twice (a resumed run) keeps
    its last value."""
    values = {r["step"]: r[key] for r in records
              if r.get(key) is not None and r.get("step") is not None}
    steps = np.array(sorted(values), dtype=np.int64)
    return steps, np.array([values[s] for s in steps], dtype=np.float64)


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("pictures need matplotlib: pip install 'llm_jax[plots]'") from None
    return Figure(**kwargs)


def _save(fig, png: str | Path) -> Path:
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=fig.dpi)
    return png


def token_label(tokenizer, token_id: int) -> str:
    """A token as printable text: spaces as middle dots, newlines as \\n."""
    text = tokenizer.decode([int(token_id)])
    return text.replace(" ", "\u00b7").replace("\n", "\\n").replace("\t", "\\t")


# --- Training curves ----------------------------------------------------------------------------


def plot_loss(records: list[dict], png: str | Path) -> Path:
    """Training loss at every logged step, and train/val loss at every evaluation."""
    steps, loss = by_step(records, "loss")
    eval_steps, val = by_step(records, "val_loss")
    eval_steps_t, train_eval = by_step(records, "train_loss")
    if not len(steps) and not len(eval_steps):
        raise UserError("metrics.jsonl holds no loss records yet")
    fig = _figure(figsize=(7, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    if len(steps):
        ax.plot(steps, loss, color="tab:blue", alpha=0.45, lw=1, label="train (step batch)")
    if len(eval_steps_t):
        ax.plot(eval_steps_t, train_eval, "o-", color="tab:blue", ms=4, label="train (eval)")
    if len(eval_steps):
        ax.plot(eval_steps, val, "o-", color="tab:orange", ms=4, label="val (eval)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, png)


def plot_grads(records: list[dict], png: str | Path) -> Path:
    """Per-group gradient norms, update/param ratios and residual-stream std over training."""
    names = sorted({k.partition("/")[2] for r in records for k in r
                    if k.startswith("grad_norm/")}, key=_group_order)
    if not names:
        raise UserError("metrics.jsonl holds no gradient statistics: train with "
                        "--inspect_interval=N (e.g. 25) to record them")
    streams = sorted({k.partition("/")[2] for r in records for k in r
                      if k.startswith("act_std/")}, key=_group_order)
    fig = _figure(figsize=(13, 3.8), dpi=90, layout="constrained")
    ax_g, ax_u, ax_a = fig.subplots(1, 3)
    n_blocks = sum(_group_order(n)[0] for n in names)

    def style(name):  # blocks from dark (first) to light (last); other groups dashed
        if _group_order(name)[0]:
            shade = 0.1 + 0.8 * int(name[2:]) / max(n_blocks - 1, 1)
            return {"color": _cmap()(shade), "lw": 1.6}
        return {"ls": "--", "lw": 1.2}

    for ax, prefix, keys, title in (
            (ax_g, "grad_norm", names, "gradient norm per layer"),
            (ax_u, "update_ratio", names, "||update|| / ||param||"),
            (ax_a, "act_std", streams, "residual stream std after each block")):
        for name in keys:
            steps, values = by_step(records, f"{prefix}/{name}")
            ax.plot(steps, values, label=name, **style(name))
        ax.set(xlabel="step", title=title)
        if prefix != "act_std":
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    ax_g.legend(fontsize=7, ncols=2)
    ax_a.legend(fontsize=7)
    return _save(fig, png)


def _group_order(name: str):
    block = name.startswith("h.") and name[2:].isdigit()
    return (1, int(name[2:]), "") if block else (0, 0, name)


def _cmap():
    from matplotlib import colormaps
    return colormaps["viridis"]


# --- One prompt through a trained model ---------------------------------------------------------


def encode_prompt(tokenizer, model_cfg, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty after tokenization")
    if max(ids) >= model_cfg.vocab_size:
        raise UserError(f"the prompt has token id {max(ids)}, outside the model's vocabulary")
    return ids[-model_cfg.block_size:]  # the context the model can see


def plot_saliency(labels: list[str], saliency, target: str, prob: float,
                  png: str | Path) -> Path:
    """A bar per input token: the norm of d log p(next token) / d token embedding."""
    fig = _figure(figsize=(max(6, 0.28 * len(labels) + 1.5), 3.6), dpi=90, layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(labels)), np.asarray(saliency), color="tab:purple")
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=90 if len(labels) > 60 else 0)
    ax.set(ylabel="||d log p / d embedding||",
           title=f"Saliency of each input token for the next token {target!r} (p = {prob:.2f})")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, png)


def plot_attention(labels: list[str], maps_LHTT, png: str | Path) -> Path:
    """A heatmap per layer (rows) and head (columns): query position down, key position across."""
    maps = np.asarray(maps_LHTT)
    L, H, T, _ = maps.shape
    from matplotlib.colors import PowerNorm

    fig = _figure(figsize=(2.4 * H + 0.8, 2.4 * L + 0.4), dpi=75, layout="constrained")
    axes = np.asarray(fig.subplots(L, H, squeeze=False))
    show_labels = T <= 48
    scale = PowerNorm(gamma=0.5, vmin=0, vmax=1)  # square root: small weights stay visible
    for layer in range(L):
        for head in range(H):
            ax = axes[layer, head]
            image = ax.imshow(maps[layer, head], cmap="viridis", norm=scale,
                              interpolation="nearest")
            ax.set_xticks(range(T) if show_labels and layer == L - 1 else [],
                          labels if show_labels and layer == L - 1 else [], fontsize=6)
            ax.set_yticks(range(T) if show_labels and head == 0 else [],
                          labels if show_labels and head == 0 else [], fontsize=6)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=9)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.5, label="attention weight (square-root scale)")
    fig.suptitle("Attention weights: query (down) attends to key (across)")
    return _save(fig, png)


# --- TensorBoard --------------------------------------------------------------------------------


def _summary_writer():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("writing TensorBoard files needs tensorboardX: pip install "
                            "tensorboardX (or 'llm_jax[tensorboard]')") from None
    return SummaryWriter


def write_tensorboard(records: list[dict], logdir: str | Path) -> int:
    """Every numeric metric of every record with a step as a TensorBoard scalar, under its
    metrics.jsonl name (names with a slash group into one section). Returns the count."""
    writer = _summary_writer()(str(logdir))
    n = 0
    try:
        for r in records:
            step = r.get("step")
            if step is None:
                continue
            for name, value in r.items():
                if (name != "step" and isinstance(value, (int, float))
                        and not isinstance(value, bool) and math.isfinite(value)):
                    writer.add_scalar(name, value, step)
                    n += 1
    finally:
        writer.close()
    return n


# --- Command line -------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m llm_jax.plots",
                                description="Pictures of a training run (PNG, no display "
                                            "needed) and TensorBoard files of its metrics.")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--out_dir", default="out", help="the run directory train.py wrote")
    p.add_argument("--png", help="the picture to write (default: OUT_DIR/<command>.png)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="saliency, attention: the text")
    p.add_argument("--ckpt", default="latest", choices=("latest", "best"),
                   help="saliency, attention: which checkpoint")
    p.add_argument("--logdir", help="tensorboard: where to write (default: OUT_DIR/tb)")
    args = p.parse_args(argv)
    png = Path(args.png or Path(args.out_dir) / f"{args.command}.png")

    if args.command in ("loss", "grads", "tensorboard"):
        records = read_metrics(args.out_dir)
        if args.command == "tensorboard":
            logdir = args.logdir or str(Path(args.out_dir) / "tb")
            n = write_tensorboard(records, logdir)
            print(f"wrote {n} scalars to {logdir}: view them with tensorboard --logdir {logdir}")
            return
        print(f"wrote {(plot_loss if args.command == 'loss' else plot_grads)(records, png)}")
        return

    from llm_jax import inspection
    from llm_jax.inference import load_model

    if not Path(args.out_dir).is_dir():
        raise UserError(f"run directory {args.out_dir!r} does not exist")
    graphdef, params, config, tokenizer = load_model(args.out_dir, args.ckpt)
    ids = encode_prompt(tokenizer, config.model, args.prompt)
    labels = [token_label(tokenizer, i) for i in ids]
    idx_T = jnp.asarray(ids, jnp.int32)
    if args.command == "saliency":
        saliency_fn = jax.jit(inspection.token_saliency, static_argnums=0)
        saliency, target, logp = saliency_fn(graphdef, params, idx_T)
        target_text = tokenizer.decode([int(target)])
        out = plot_saliency(labels, saliency, target_text, math.exp(float(logp)), png)
        top = np.argsort(-np.asarray(saliency))[:5]
        print(f"next token {target_text!r} (p = {math.exp(float(logp)):.3f}); most salient "
              "inputs: " + ", ".join(f"{labels[i]!r}@{i} {float(saliency[i]):.3f}" for i in top))
    else:
        maps = jax.jit(inspection.attention_maps, static_argnums=0)(graphdef, params, idx_T)
        out = plot_attention(labels, maps, png)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
