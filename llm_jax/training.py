"""The training run: data, model, optimizer, the loop, evaluation, logging and checkpoints.

`train(config)` is what `python train.py` calls. Every random choice derives from
`train.seed`: the params from one key, the dropout of step s from `fold_in(key, s)`, the batch of
step s from (seed, s) (see `llm_jax.data.get_batch`). A checkpoint therefore needs only the step
to continue exactly, and `--resume` gives the run that would have happened without the stop.

Fine-tuning (data.source=sft or jsonl, llm_jax/sft.py) is the same loop over batches of
conversations with a loss mask (and segment ids when packed). Its tokenizer is the pretrained
model's (train.init_from) with the chat tokens appended; the model's embedding table grows by
their rows and the optimizer, with its own schedule, starts at step 0. `train.freeze` keeps
chosen params fixed (llm_jax/optim.py).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from llm_jax import checkpoint, data, guards, hf, inspection, parallel, sft
from llm_jax import model as gpt
from llm_jax.config import Config, DataConfig
from llm_jax.errors import UserError
from llm_jax.matmul import resolve_auto_dtypes, resolve_linear_vjp
from llm_jax.optim import frozen_mask, learning_rate, make_optimizer
from llm_jax.step import make_eval_step, make_train_step
from llm_jax.tokenizers import GPT2_VOCAB_SIZE, base_tokenizer, tokenizer_from_json

# Dense bf16 peak FLOP/s of known accelerators, by a substring of jax's device_kind.
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L4": 121, "TPU v4": 275,
               "TPU v5 lite": 197, "TPU v5p": 459, "TPU v6 lite": 918}
SHAPE_KEYS = ("vocab_size", "vocab_multiple", "block_size", "n_layer", "n_head", "n_embd", "bias",
              "position", "norm")


# Calls the host queues before waiting for the oldest. Unbounded, XLA:CPU's in-process
# collectives between per-core devices deadlocked with 64 train steps (or 300 eval batches)
# queued; 16 ran.
AHEAD = 2


def peak_flops(cfg_tflops: float) -> float | None:
    if cfg_tflops > 0:
        return cfg_tflops * 1e12 * jax.device_count()
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12 * jax.device_count()
    return None


def resolve_model_config(config: Config, tokenizer) -> Config:
    """Fill model.vocab_size from the tokenizer (0 means 'from the data'), or check it fits."""
    m = config.model
    if m.vocab_size == 0:
        m = dataclasses.replace(m, vocab_size=tokenizer.vocab_size)
    elif m.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                        f"vocabulary ({tokenizer.vocab_size})")
    return dataclasses.replace(config, model=m)


def load_init_source(config: Config):
    """(params, ModelConfig, tokenizer or None) of train.init_from, or None when resuming."""
    t = config.train
    if not t.init_from or t.resume:
        return None
    _, params, source, tokenizer = hf.load_pretrained(t.init_from, config.model.vocab_multiple)
    return params, source, tokenizer


def apply_init_from(config: Config, tokenizer, source=None) -> tuple[Config, dict | None]:
    """train.init_from: the model's shape keys come from the source, its params too unless
    resuming (the run then continues from its own checkpoint). Dropout, dtype and everything
    else come from the run's config; the optimizer starts fresh at step 0. Tokens added to the
    source's tokenizer (the chat tokens of fine-tuning) get new embedding rows."""
    t = config.train
    if t.resume:  # the shape was taken from the source when the run started: see the checkpoint
        saved = checkpoint.read_meta(t.out_dir)["config"]["model"]
        shape, params = {k: saved[k] for k in SHAPE_KEYS if k in saved}, None
    else:
        params, source, source_tokenizer = source or load_init_source(config)
        base = base_tokenizer(tokenizer)
        if source.vocab_size < base.vocab_size:
            raise UserError(f"init_from {t.init_from!r} has a vocabulary of {source.vocab_size} "
                            f"tokens, fewer than data.tokenizer={config.data.tokenizer} "
                            f"({base.vocab_size})")
        if (source_tokenizer is None and source.vocab_size == GPT2_VOCAB_SIZE
                and tokenizer.kind != "gpt2"):  # GPT-2's weights expect GPT-2's token ids
            raise UserError(f"init_from {t.init_from!r} has GPT-2's vocabulary: set "
                            f"data.tokenizer=gpt2 (it is {config.data.tokenizer})")
        if source_tokenizer is not None and source_tokenizer.to_json() not in (
                tokenizer.to_json(), base.to_json()):
            raise UserError(f"init_from {t.init_from!r} was trained with another tokenizer "
                            f"({source_tokenizer.kind}, {source_tokenizer.vocab_size} tokens) "
                            f"than data.tokenizer={config.data.tokenizer} gives for this data")
        if source.vocab_size < tokenizer.vocab_size:  # added tokens: new rows after the old
            source, params = sft.grow_vocab(source, params, tokenizer.vocab_size,
                                            jax.random.fold_in(jax.random.key(t.seed), 1))
        shape = {k: getattr(source, k) for k in SHAPE_KEYS}
        wanted = config.model.block_size
        if wanted > source.block_size:
            raise UserError(f"model.block_size={wanted} is longer than the context of init_from "
                            f"{t.init_from!r} ({source.block_size} positions): use at most "
                            f"{source.block_size}")
        if wanted < source.block_size:  # a shorter context: the first rows of the table
            shape["block_size"] = wanted
            if "wpe" in params:
                params = dict(params, wpe={"embedding": params["wpe"]["embedding"][:wanted]})
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **shape)), params


def prepare_data(config: Config, source=None):
    """data.Prepared for text, sft.SFTData for fine-tuning. Fine-tuning data takes the
    tokenizer of its checkpoint (resuming) or of init_from, plus the chat tokens."""
    if config.data.source not in sft.SOURCES:
        return data.prepare(config.data)
    if config.train.resume:
        tokenizer = tokenizer_from_json(checkpoint.read_meta(config.train.out_dir)["tokenizer"])
        return sft.prepare(config.data, base_tokenizer(tokenizer))
    return sft.prepare(config.data, source[2] if source is not None else None)


def check_same_shape(saved: dict, wanted: gpt.ModelConfig, where: str) -> None:
    for key in SHAPE_KEYS:
        if key in saved and saved[key] != getattr(wanted, key):
            raise UserError(f"checkpoint in {where!r} has model.{key}={saved[key]!r}, "
                            f"the config asks for {getattr(wanted, key)!r}")


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # One probe per process: a multi-process run's processes share out_dir.
        probe = out_dir / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to out_dir {str(out_dir)!r}: {e.strerror}") from None


def get_batch(prepared, split: str, cfg: Config, *, step: int, batch_size: int, stream: int,
              rows=None):
    """(x, y) windows of text, or (x, y, mask, segment ids) of fine-tuning examples; only the
    given rows of the batch when `rows` (an index) is set."""
    kw = dict(seed=cfg.train.seed, step=step, stream=stream, batch_size=batch_size,
              block_size=cfg.model.block_size)
    if isinstance(prepared, sft.SFTData):  # rows depend on each other: build all, keep some
        batch = prepared.get_batch(split, **kw)
        return batch if rows is None else tuple(None if a is None else a[rows] for a in batch)
    return data.get_batch(getattr(prepared, split), rows=rows, **kw)


def micro_batches(prepared, cfg: Config, step: int, stream: int = 0, rows: slice | None = None):
    """The batch of one optimizer step: (x, y[, mask, segment ids]), each (grad_accum,
    batch_size, block_size); with `rows`, only those rows of every micro-batch."""
    t = cfg.train
    index, b = None, t.batch_size
    if rows is not None:  # rows lo..hi of each of the grad_accum micro-batches
        within = np.arange(t.batch_size)[rows]
        index, b = (np.arange(t.grad_accum)[:, None] * t.batch_size + within).ravel(), len(within)
    batch = get_batch(prepared, "train", cfg, step=step, stream=stream,
                      batch_size=t.grad_accum * t.batch_size, rows=index)
    shape = (t.grad_accum, b, cfg.model.block_size)
    return tuple(None if a is None else a.reshape(shape) for a in batch)


def evaluate(eval_step, params, prepared, cfg: Config, place=lambda batch: batch,
             splits=("train", "val")) -> dict:
    """Mean loss over the same `eval_iters` batches of each split at every evaluation."""
    out = {}
    for stream, split in ((1, "train"), (2, "val")):
        if split not in splits:
            continue
        losses = []
        for i in range(cfg.train.eval_iters):
            losses.append(eval_step(params, *place(get_batch(
                prepared, split, cfg, step=i, stream=stream, batch_size=cfg.train.batch_size))))
            if i >= AHEAD:
                jax.block_until_ready(losses[i - AHEAD])
        out[split] = float(np.mean(jax.device_get(losses)))
    return out


def train_loss_from_steps(cfg: Config) -> bool:
    """Whether evaluations report the mean loss of the last `eval_iters` train steps as the train
    loss (`train.eval_train`), instead of running held-out forward passes over train batches.
    With dropout and label smoothing 0 a step's loss is the eval-mode loss of its batch (under
    the params the step began with), and this halves the cost of an evaluation."""
    if cfg.train.eval_train == "auto":
        return cfg.model.dropout == 0.0 and cfg.train.label_smoothing == 0.0
    return cfg.train.eval_train == "steps"


class _Log:
    """Log lines to the console (through tqdm when a bar is shown) and metrics.jsonl; in a
    multi-process job only process 0 writes."""

    def __init__(self, out_dir: Path, bar):
        self.path, self.bar = out_dir / "metrics.jsonl", bar
        self.quiet = jax.process_index() != 0

    def __call__(self, line: str, **record) -> None:
        if self.quiet:
            return
        (self.bar.write if self.bar is not None else print)(line)
        if record:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def train(config: Config) -> dict:
    """Run training as configured; returns a summary (steps, final losses, timings)."""
    t = config.train
    parallel.initialize(t.coordinator, t.num_processes, t.process_id, t.distributed_timeout)
    fresh = t.resume and not checkpoint.exists(t.out_dir)
    if fresh:  # killed before its first checkpoint: --resume=true starts it from the beginning
        config = dataclasses.replace(config, train=dataclasses.replace(t, resume=False))
        t = config.train
    source = load_init_source(config)
    prepared = prepare_data(config, source)
    pretrained = None
    if t.init_from:
        config, pretrained = apply_init_from(config, prepared.tokenizer, source)
    del source
    config = resolve_model_config(config, prepared.tokenizer)
    mcfg = config.model
    dropped = 0
    if isinstance(prepared, sft.SFTData):
        prepared, dropped = prepared.fit(mcfg.block_size)
    for split in ("train", "val"):  # fail now, not at the first evaluation
        get_batch(prepared, split, config, step=0, batch_size=1, stream=0)
    out_dir = Path(t.out_dir)
    _check_writable(out_dir)
    place = parallel.Placement(t)
    mcfg = dataclasses.replace(mcfg, linear_vjp=resolve_linear_vjp(
        mcfg.linear_vjp, per_device=place.per_device_mesh is not None))
    config = dataclasses.replace(config, model=mcfg)  # saved: the dtypes as configured ("auto")
    mcfg = resolve_auto_dtypes(mcfg, jax.devices()[0].platform)  # the train and eval steps'

    shapes = gpt.abstract_params(mcfg)[1]
    tx = make_optimizer(t, shapes)
    k_init, k_train = jax.random.split(jax.random.key(t.seed))
    start, best_val = 0, math.inf
    if t.resume:
        meta = checkpoint.read_meta(out_dir)
        check_same_shape(meta["config"]["model"], mcfg, str(out_dir))
        for key in ("source", "path", "tokenizer", "bpe_path", "bpe_vocab_size", "sft_examples",
                    "sft_tasks", "sft_seed", "pack"):
            saved = meta["config"]["data"].get(key, getattr(DataConfig(), key))
            if saved != getattr(config.data, key):
                raise UserError(f"checkpoint in {str(out_dir)!r} was trained with data.{key}="
                                f"{saved!r}, the config says {getattr(config.data, key)!r}")
        graphdef, abstract_params = gpt.abstract_params(mcfg)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        params, opt_state, meta = checkpoint.restore(out_dir, place.abstract(abstract_params),
                                                     place.abstract(abstract_opt))
        start = meta["step"]
        best_val = math.inf if meta.get("best_val_loss") is None else meta["best_val_loss"]
    else:  # (after a kill during the first save, ckpt/ holds only an unfinished folder)
        if not fresh and (out_dir / "ckpt").is_dir() and any((out_dir / "ckpt").iterdir()):
            raise UserError(f"out_dir {str(out_dir)!r} already holds checkpoints: pass "
                            "--resume=true to continue that run, or choose another --out_dir")
        graphdef = gpt.abstract_params(mcfg)[0]
        if pretrained is not None:
            params = place.put(pretrained)
        else:
            params = place.init(lambda key: gpt.init_params(mcfg, key)[1], shapes, k_init)
        opt_state = place.init(tx.init, jax.eval_shape(tx.init, shapes), params)
    guards.check_room(out_dir, shapes, t.keep_last + 2)  # the kept, the best, one being written
    if jax.process_index() == 0:
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    n_params = gpt.count_params(mcfg, params)
    flops_token = gpt.flops_per_token(mcfg, n_params)
    peak = peak_flops(t.peak_tflops)
    tokens_step = t.grad_accum * t.batch_size * mcfg.block_size
    train_step = make_train_step(graphdef, tx, label_smoothing=t.label_smoothing,
                                 mesh=place.per_device_mesh)
    eval_step = make_eval_step(graphdef)
    inspect_step = make_train_step(graphdef, tx, inspect=True, label_smoothing=t.label_smoothing,
                                   mesh=place.per_device_mesh) if t.inspect_interval else None
    lr_at = learning_rate(t)
    ckpts = checkpoint.Checkpoints(out_dir, keep_last=t.keep_last)

    def meta_now(step, val=None):
        return {"config": config.to_dict(), "data_step": step, "val_loss": val,
                "best_val_loss": best_val if math.isfinite(best_val) else None,
                "tokenizer": prepared.tokenizer.to_json(), "seed": t.seed}

    bar = tqdm(total=t.max_iters, initial=start, dynamic_ncols=True,
               unit="step") if t.progress and jax.process_index() == 0 else None
    log = _Log(out_dir, bar)
    log(f"model: {n_params / 1e6:.2f}M params, {flops_token / 1e6:.2f} MFLOPs/token; "
        f"{tokens_step} tokens/step; data: {prepared.meta['train_tokens']:,} train tokens; "
        f"devices: {place.describe()}"
        + (f"; matmul operands {mcfg.matmul_dtype} (auto)"
           if config.model.matmul_dtype == "auto" else "")
        + (f"; attention operands {mcfg.attention_dtype or mcfg.dtype} (auto)"
           if config.model.attention_dtype == "auto" else "")
        + (f"; resuming at step {start}" if start else "")
        + ("; no checkpoint to resume from: starting at step 0" if fresh else "")
        + (f"; weights from {t.init_from}" if pretrained is not None else ""))
    if isinstance(prepared, sft.SFTData):
        m = prepared.meta
        log(f"fine-tuning on {m['source_description']}: {len(prepared.train):,} train and "
            f"{len(prepared.val):,} held-out examples ({dropped} longer than the context "
            f"dropped), {'packed' if prepared.pack else 'one per row'}; loss on answers only")
    if t.freeze:
        mask = frozen_mask(shapes, t.freeze)
        n_frozen = sum(np.prod(x.shape) * (np.mean(m) if not isinstance(m, bool) else m)
                       for x, m in zip(jax.tree.leaves(shapes), jax.tree.leaves(mask)))
        log(f"freezing {t.freeze!r}: {int(n_frozen):,} of "
            f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)):,} params")

    summary = {"start_step": start, "steps": t.max_iters, "matmul_dtype": mcfg.matmul_dtype,
               "attention_dtype": mcfg.attention_dtype}
    t_last, step_last, compile_s = time.perf_counter(), start, None
    t_run, pause = time.perf_counter(), {"eval": 0.0, "ckpt": 0.0}  # time not spent training
    from_steps = train_loss_from_steps(config)
    recent = collections.deque(maxlen=t.eval_iters)  # with from_steps: the last steps' losses
    metrics, compiled = None, set()  # the step variants called so far: False plain, True inspect
    in_flight = []  # the losses of the last AHEAD steps
    stop, nonfinite = guards.StopSignals(log), guards.NonFinite(t.nonfinite, log)

    def last_good() -> str:
        s = ckpts.latest_step()
        return "none yet" if s is None else str(out_dir / "ckpt" / str(s))

    with stop:
        try:
            for step in range(start, t.max_iters):
                done = step + 1
                inspecting = inspect_step is not None and done % t.inspect_interval == 0
                first_call = inspecting not in compiled
                if first_call and compile_s is not None:
                    jax.block_until_ready(params)  # time the other variant's compile on its own
                    t_compile = time.perf_counter()
                batch = place.batch(micro_batches(prepared, config, step, rows=place.rows))
                params, opt_state, metrics = (inspect_step if inspecting else train_step)(
                    params, opt_state, batch, jax.random.fold_in(k_train, step))
                nonfinite.add(done, metrics["finite"])
                in_flight.append(metrics["loss"])
                if from_steps:
                    recent.append(metrics["loss"])
                if len(in_flight) > AHEAD:
                    jax.block_until_ready(in_flight.pop(0))
                if compile_s is None:  # the first step compiles: time it apart from the throughput
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - t_last
                    t_last, step_last = time.perf_counter(), done
                    summary["first_step_s"] = compile_s
                elif first_call:  # keep the second variant's compile out of tokens/s too
                    jax.block_until_ready(metrics)
                    t_last += time.perf_counter() - t_compile
                compiled.add(inspecting)
                if inspecting:
                    inspection.log_step(log, done, jax.device_get(metrics))
                if done % t.log_interval == 0 or done == t.max_iters:
                    nonfinite.check(last_good())
                    m = jax.device_get(metrics)
                    now = time.perf_counter()
                    tok_s = (done - step_last) * tokens_step / max(now - t_last, 1e-9)
                    t_last, step_last = now, done
                    lr = float(lr_at(step))
                    mfu = f", mfu {100 * tok_s * flops_token / peak:.1f}%" if peak else ""
                    log(f"step {done}: loss {m['loss']:.4f}, lr {lr:.2e}, "
                        f"grad norm {m['grad_norm']:.3f}, {tok_s:,.0f} tokens/s, "
                        f"{tok_s * flops_token / 1e9:.1f} GFLOP/s{mfu}",
                        step=done, loss=float(m["loss"]), lr=lr, grad_norm=float(m["grad_norm"]),
                        tokens_per_s=tok_s, mfu=tok_s * flops_token / peak if peak else None)
                if done % t.eval_interval == 0 or done == t.max_iters:
                    t_eval = time.perf_counter()
                    losses = evaluate(eval_step, params, prepared, config, place.eval_batch,
                                      splits=("val",) if from_steps else ("train", "val"))
                    if from_steps:  # the skipped steps' NaN/Inf left out
                        finite = [x for x in jax.device_get(list(recent)) if np.isfinite(x)]
                        losses["train"] = float(np.mean(finite)) if finite else math.nan
                    pause["eval"] += time.perf_counter() - t_eval
                    improved = losses["val"] < best_val
                    best_val = min(best_val, losses["val"])
                    log(f"step {done}: train loss {losses['train']:.4f}"
                        + (f" (last {len(recent)} steps)" if from_steps else "") + ", "
                        f"val loss {losses['val']:.4f}"
                        + (" (best)" if improved else ""), step=done, train_loss=losses["train"],
                        val_loss=losses["val"])
                    summary.update(train_loss=losses["train"], val_loss=losses["val"])
                    if improved:
                        nonfinite.check(last_good())
                        t0 = time.perf_counter()
                        ckpts.save(done, params, opt_state, meta_now(done, losses["val"]),
                                   best=True)
                        pause["ckpt"] += time.perf_counter() - t0
                    t_last += time.perf_counter() - t_eval  # evaluation is not in tokens/s
                saving = done % t.ckpt_interval == 0 or done == t.max_iters
                if saving or stop.requested:
                    nonfinite.check(last_good())
                    t0 = time.perf_counter()
                    ckpts.save(done, params, opt_state, meta_now(done, summary.get("val_loss")))
                    pause["ckpt"] += time.perf_counter() - t0
                    t_last += time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                if stop.requested:
                    summary.update(stopped_by=stop.requested, stopped_at=done)
                    log(f"stopped by {stop.requested} at step {done}: checkpoint saved in "
                        f"{out_dir / 'ckpt' / str(done)}; continue with --resume=true",
                        step=done, stopped_by=stop.requested)
                    break
        except UserError:  # the non-finite guard in stop mode: keep what was saved
            ckpts.wait()
            ckpts.close()
            raise
    if bar is not None:
        bar.close()
    t0 = time.perf_counter()
    ckpts.wait()
    ckpts.close()
    pause["ckpt_final_wait"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_run
    log(f"{wall:.1f}s: compile {compile_s or 0:.1f}s, evaluation {pause['eval']:.1f}s, "
        f"checkpoint saves blocked training {pause['ckpt']:.2f}s "
        f"(+{pause['ckpt_final_wait']:.2f}s waiting for the last write)",
        wall_s=wall, compile_s=compile_s, eval_s=pause["eval"], ckpt_blocking_s=pause["ckpt"],
        ckpt_final_wait_s=pause["ckpt_final_wait"])
    summary.update(wall_s=wall, eval_s=pause["eval"], ckpt_blocking_s=pause["ckpt"],
                   skipped_steps=nonfinite.skipped,
                   best_val_loss=best_val, out_dir=str(out_dir), params=params,
                   opt_state=opt_state, final_loss=None if metrics is None
                   else float(jax.device_get(metrics["loss"])))
    return summary
