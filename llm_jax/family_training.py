"""Training beyond decoder-only: the masked LM, the classifier and the encoder-decoder.

`train_family(config)` is what `python train.py` calls when `model.family` is mlm, classifier
or seq2seq (a GPT goes to `llm_jax.training.train`). It keeps that loop's contract: AdamW from
`llm_jax.optim`, the same out_dir (config.json, metrics.jsonl, ckpt/<step>, best/<step>
through `llm_jax.checkpoint.Checkpoints`), the same console lines, and an exact `--resume`:
the batch of step s is a pure function of (seed, stream, s) and its dropout key is
`fold_in(key, s)`, so a checkpoint needs only its step.

Design choices:
- One loop for three families. What differs is a `Job` (`make_job`): the resolved config, the
  vocabulary with its special tokens, how to build params, a batch as a pure function of
  (split, stream, step, size), the summed loss with its counts, and a final held-out report
  on the test split (the classifier's accuracy, the encoder-decoder's greedy exact match).
- The train step is llm_jax/step.py's, over dict batches: gradients of the summed loss are
  added over `grad_accum` micro-batches and divided once by the total count (masked tokens,
  examples or target tokens), jitted once with params and optimizer state donated.
- Fine-tuning a classifier (`train.init_from=<an MLM run>`): the model's shape keys come from
  that run, its "encoder" params are copied in, the pooler and head start fresh, and the
  vocabularies must be identical.
- The vocabulary (tokenizer + [PAD] [CLS] [SEP] [MASK]) is saved in every checkpoint's meta as
  "tokenizer", so the fill/classify/decode commands need only the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from llm_jax import checkpoint, data, encoder, seq2seq, tasks
from llm_jax.config import Config, from_dict
from llm_jax.errors import UserError
from llm_jax.optim import learning_rate, make_optimizer
from llm_jax.tokenizers import EOT
from llm_jax.training import SHAPE_KEYS, check_same_shape, peak_flops

FAMILY_KEYS = ("family", "n_dec_layer", "task", "n_class")  # must also match on resume


def abstract_params(cfg):
    return (seq2seq if cfg.family == "seq2seq" else encoder).abstract_params(cfg)


def load_run(run_dir: str, which: str = "latest", families: tuple[str, ...] = ()):
    """(graphdef, params, config, vocab) of a trained mlm, classifier or seq2seq run."""
    meta = checkpoint.read_meta(run_dir, which)
    config = from_dict(meta["config"], origin=f"the checkpoint in {run_dir}")
    family = config.model.family
    if families and family not in families:
        raise UserError(f"{run_dir!r} holds a {family} run; this command needs a "
                        f"{' or '.join(families)} run")
    vocab = tasks.vocab_from_json(meta["tokenizer"])
    graphdef, abstract = abstract_params(config.model)
    params, _, _ = checkpoint.restore(run_dir, abstract, which=which)
    return graphdef, params, config, vocab


@dataclass
class Job:
    config: Config  # resolved: vocab_size, task and n_class filled in
    vocab: tasks.SpecialVocab
    batch: Callable[[str, int, int, int], dict]  # (split, stream, step, size) -> numpy arrays
    loss: Callable  # (graphdef, params, batch, key) -> (loss sum, count, right)
    report: Callable[[object, dict], dict[str, float]]  # held-out figures of trained params
    tokens_per_example: int
    describe: str
    pretrained: dict | None = None  # classifier: the encoder params to start from

    def init(self, key):
        cfg = self.config.model
        return (seq2seq if cfg.family == "seq2seq" else encoder).init_params(cfg, key)


def _rng(seed: int, stream: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step])


def _pick(examples: list, rng: np.random.Generator, size: int) -> list:
    return [examples[i] for i in rng.integers(0, len(examples), size)]


def _with_model(config: Config, **changes) -> Config:
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes))


def _vocab_size(config: Config, vocab: tasks.SpecialVocab) -> Config:
    m = config.model
    if m.vocab_size and m.vocab_size < vocab.vocab_size:
        raise UserError(f"model.vocab_size={m.vocab_size} is smaller than the vocabulary "
                        f"({vocab.vocab_size} with the special tokens)")
    return _with_model(config, vocab_size=m.vocab_size or vocab.vocab_size)


def _init_from(config: Config, vocab: tasks.SpecialVocab) -> tuple[Config, dict | None]:
    """A classifier fine-tuned from an MLM (or classifier) run: its shape and encoder params."""
    t = config.train
    if t.resume:  # the shape was taken from the source when the run started
        saved = checkpoint.read_meta(t.out_dir)["config"]["model"]
        return _with_model(config, **{k: saved[k] for k in SHAPE_KEYS if k in saved}), None
    graphdef, params, source, source_vocab = load_run(t.init_from,
                                                      families=("mlm", "classifier"))
    if source_vocab.to_json() != vocab.to_json():
        raise UserError(f"init_from {t.init_from!r} was trained with another vocabulary "
                        f"({source_vocab.base.kind}, {source_vocab.vocab_size} tokens) than "
                        f"this data gives ({vocab.base.kind}, {vocab.vocab_size})")
    shape = {k: getattr(source.model, k) for k in SHAPE_KEYS}
    return _with_model(config, **shape), params["encoder"]


def make_job(config: Config) -> Job:
    """The data, loss and report of config.model.family; the config comes back resolved."""
    m, t = config.model, config.train
    task = tasks.default_task(m.family, m.task)
    config = _with_model(config, task=task)
    if m.family == "seq2seq":
        if t.init_from:
            raise UserError("train.init_from is for classifiers (from an MLM run) and GPTs")
        vocab = tasks.seq2seq_vocab(task)
        config = _vocab_size(config, vocab)
        splits = tasks.seq2seq_splits(task)
        S = max(len(s) for p in splits.values() for s, _ in p) + 1  # + [SEP]
        T = max(len(g) for p in splits.values() for _, g in p) + 1  # + [CLS] / [SEP]
        if max(S, T) > m.block_size:
            raise UserError(f"task {task!r} needs model.block_size >= {max(S, T)}")

        def batch(split, stream, step, size):
            pairs = _pick(splits[split], _rng(t.seed, stream, step), size)
            return seq2seq.make_batch(pairs, vocab, S, T)

        def report(graphdef, params):
            return {"test_exact_match": seq2seq.exact_match(graphdef, params, vocab,
                                                            splits["test"], max_len=T)}

        describe = (f"task {task}: {tasks.SEQ2SEQ_TASKS[task].description}; "
                    + ", ".join(f"{len(p):,} {s}" for s, p in splits.items()))
        return Job(config, vocab, batch, seq2seq.loss, report, S + T, describe)

    prepared = data.prepare(config.data)
    vocab = tasks.SpecialVocab(prepared.tokenizer)
    config = _vocab_size(config, vocab)
    if m.family == "mlm":
        if t.init_from:
            raise UserError("train.init_from is for classifiers (from an MLM run) and GPTs")

        def batch(split, stream, step, size):
            tokens = prepared.train if split == "train" else prepared.val
            return encoder.mlm_batch(tokens, vocab, _rng(t.seed, stream, step), size,
                                     m.block_size, m.mask_prob)

        describe = (f"{prepared.meta['train_tokens']:,} train tokens, masking "
                    f"{100 * m.mask_prob:g}%")
        return Job(config, vocab, batch, encoder.mlm_loss, lambda g, p: {}, m.block_size,
                   describe)

    # classifier
    pretrained = None
    if t.init_from:
        config, pretrained = _init_from(config, vocab)
    names = tasks.CLASS_NAMES[task]
    if m.n_class and m.n_class != len(names):
        raise UserError(f"task {task!r} has {len(names)} classes, model.n_class={m.n_class}")
    config = _with_model(config, n_class=len(names))
    block_size = config.model.block_size

    def text(tokens):  # documents apart: the end-of-text token is no word of a line
        return prepared.tokenizer.decode(tokens).replace(EOT, "\n")

    splits = tasks.shuffled_task(text(prepared.train), text(prepared.val), vocab.encode,
                                 max_tokens=block_size - 2)

    def batch(split, stream, step, size):
        return encoder.classifier_batch(_pick(splits[split], _rng(t.seed, stream, step), size),
                                        vocab, block_size)

    def report(graphdef, params):
        right, examples = 0.0, splits["test"]
        for i in range(0, len(examples), 256):
            b = encoder.classifier_batch(examples[i:i + 256], vocab, block_size)
            right += float(_eval_step(graphdef, encoder.classifier_loss, params, b)[2])
        return {"test_accuracy": right / len(examples)}

    describe = (f"task {task} ({' / '.join(names)}): "
                + ", ".join(f"{len(p):,} {s}" for s, p in splits.items()))
    return Job(config, vocab, batch, encoder.classifier_loss, report, block_size, describe,
               pretrained)


# --- The steps -----------------------------------------------------------------------------


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn):
    """train_step(params, opt_state, batch, key): batch arrays are (A, B, ...), A micro-batches."""

    def summed_loss(params, batch, key):
        loss_sum, count, right = loss_fn(graphdef, params, batch, key)
        return loss_sum, (count, right)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def train_step(params, opt_state, batch, key):
        A = jax.tree.leaves(batch)[0].shape[0]
        keys_A = jax.random.split(key, A)

        def micro_step(carry, xs):
            grads_acc, loss_acc, count_acc, right_acc = carry
            (loss_sum, (count, right)), grads = grad_fn(params, *xs)
            return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss_sum,
                    count_acc + count, right_acc + right), None

        if A == 1:  # no scan around a single micro-batch: it compiles faster
            (loss_sum, (count, right)), grads = grad_fn(
                params, jax.tree.map(lambda x: x[0], batch), keys_A[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
            (grads, loss_sum, count, right), _ = jax.lax.scan(micro_step, init,
                                                              (batch, keys_A))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss_sum / count, "accuracy": right / count,
                   "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    return jax.jit(train_step, donate_argnums=(0, 1))


def _eval_step(graphdef, loss_fn, params, batch):
    return _compiled_eval(graphdef, loss_fn)(params, batch)


_EVAL_CACHE: dict = {}


def _compiled_eval(graphdef, loss_fn):
    key = (graphdef, loss_fn)
    if key not in _EVAL_CACHE:
        _EVAL_CACHE[key] = jax.jit(lambda params, batch: loss_fn(graphdef, params, batch))
    return _EVAL_CACHE[key]


def evaluate(job: Job, graphdef, params) -> dict[str, float]:
    """Loss and accuracy over the same `eval_iters` batches of each split at every evaluation."""
    t = job.config.train
    out = {}
    for stream, split in ((1, "train"), (2, "val")):
        sums = np.zeros(3)
        for i in range(t.eval_iters):
            sums += np.asarray(jax.device_get(_eval_step(
                graphdef, job.loss, params, job.batch(split, stream, i, t.batch_size))))
        out[f"{split}_loss"] = sums[0] / max(sums[1], 1.0)
        out[f"{split}_accuracy"] = sums[2] / max(sums[1], 1.0)
    return out


def micro_batches(job: Job, step: int) -> dict:
    t = job.config.train
    b = job.batch("train", 0, step, t.grad_accum * t.batch_size)
    return {k: v.reshape(t.grad_accum, t.batch_size, *v.shape[1:]) for k, v in b.items()}


# --- The run -------------------------------------------------------------------------------


def _log_to(out_dir: Path, bar):
    def log(line: str, **record) -> None:
        (bar.write if bar is not None else print)(line)
        if record:
            with (out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    return log


def train_family(config: Config) -> dict:
    """Train an mlm, classifier or seq2seq model as configured; returns a summary."""
    job = make_job(config)
    config, t = job.config, job.config.train
    mcfg = config.model
    out_dir = Path(t.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to out_dir {str(out_dir)!r}: {e.strerror}") from None
    tx = make_optimizer(t)
    k_init, k_train = jax.random.split(jax.random.key(t.seed))
    start, best_val = 0, math.inf
    if t.resume:
        meta = checkpoint.read_meta(out_dir)
        saved = meta["config"]["model"]
        check_same_shape(saved, mcfg, str(out_dir))
        for key in FAMILY_KEYS:
            if saved.get(key) != getattr(mcfg, key):
                raise UserError(f"checkpoint in {str(out_dir)!r} has model.{key}="
                                f"{saved.get(key)!r}, the config asks for {getattr(mcfg, key)!r}")
        if meta["tokenizer"] != job.vocab.to_json():
            raise UserError(f"checkpoint in {str(out_dir)!r} was trained with another vocabulary")
        graphdef, abstract = abstract_params(mcfg)
        params, opt_state, meta = checkpoint.restore(out_dir, abstract,
                                                     jax.eval_shape(tx.init, abstract))
        start = meta["step"]
        best_val = math.inf if meta.get("best_val_loss") is None else meta["best_val_loss"]
    else:
        if (out_dir / "ckpt").is_dir() and any((out_dir / "ckpt").iterdir()):
            raise UserError(f"out_dir {str(out_dir)!r} already holds checkpoints: pass "
                            "--resume=true to continue that run, or choose another --out_dir")
        graphdef, params = job.init(k_init)
        if job.pretrained is not None:
            params = dict(params, encoder=job.pretrained)
        opt_state = tx.init(params)
    # One placement for every leaf: restored arrays are committed to a device, fresh ones are
    # not, and a mix of both makes the second step compile again (measured: +13 s on CPU).
    params, opt_state = jax.device_put((params, opt_state), jax.devices()[0])
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    n_params = sum(x.size for x in jax.tree.leaves(params))
    tokens_step = t.grad_accum * t.batch_size * job.tokens_per_example
    peak = peak_flops(t.peak_tflops)
    flops_token = 6 * n_params  # the weights' share; enough for a rough MFU
    train_step = make_train_step(graphdef, tx, job.loss)
    lr_at = learning_rate(t)
    ckpts = checkpoint.Checkpoints(out_dir, keep_last=t.keep_last)

    def meta_now(step, val=None):
        return {"config": config.to_dict(), "data_step": step, "val_loss": val,
                "best_val_loss": best_val if math.isfinite(best_val) else None,
                "tokenizer": job.vocab.to_json(), "seed": t.seed}

    bar = tqdm(total=t.max_iters, initial=start, dynamic_ncols=True,
               unit="step") if t.progress else None
    log = _log_to(out_dir, bar)
    log(f"{mcfg.family} model: {n_params / 1e6:.2f}M params, vocabulary {mcfg.vocab_size} "
        f"(with [PAD] [CLS] [SEP] [MASK]); {tokens_step} tokens/step; data: {job.describe}; "
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}"
        + (f"; resuming at step {start}" if start else "")
        + (f"; encoder from {t.init_from}" if job.pretrained is not None else ""))

    summary = {"start_step": start, "steps": t.max_iters}
    t_run = t_last = time.perf_counter()
    step_last, compile_s, pause, metrics = start, None, 0.0, None
    for step in range(start, t.max_iters):
        done = step + 1
        params, opt_state, metrics = train_step(params, opt_state, micro_batches(job, step),
                                                jax.random.fold_in(k_train, step))
        if compile_s is None:  # the first step compiles: keep it out of the throughput
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - t_last
            t_last, step_last = time.perf_counter(), done
        if done % t.log_interval == 0 or done == t.max_iters:
            m = jax.device_get(metrics)
            now = time.perf_counter()
            tok_s = (done - step_last) * tokens_step / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            lr = float(lr_at(step))
            mfu = f", mfu {100 * tok_s * flops_token / peak:.1f}%" if peak else ""
            log(f"step {done}: loss {m['loss']:.4f}, accuracy {m['accuracy']:.3f}, lr {lr:.2e}, "
                f"grad norm {m['grad_norm']:.3f}, {tok_s:,.0f} tokens/s{mfu}",
                step=done, loss=float(m["loss"]), accuracy=float(m["accuracy"]), lr=lr,
                grad_norm=float(m["grad_norm"]), tokens_per_s=tok_s)
        if done % t.eval_interval == 0 or done == t.max_iters:
            t0 = time.perf_counter()
            ev = evaluate(job, graphdef, params)
            improved = ev["val_loss"] < best_val
            best_val = min(best_val, ev["val_loss"])
            log(f"step {done}: train loss {ev['train_loss']:.4f} (accuracy "
                f"{ev['train_accuracy']:.3f}), val loss {ev['val_loss']:.4f} (accuracy "
                f"{ev['val_accuracy']:.3f})" + (" (best)" if improved else ""), step=done, **ev)
            summary.update(ev)
            if improved:
                ckpts.save(done, params, opt_state, meta_now(done, ev["val_loss"]), best=True)
            pause += time.perf_counter() - t0
            t_last += time.perf_counter() - t0
        if done % t.ckpt_interval == 0 or done == t.max_iters:
            t0 = time.perf_counter()
            ckpts.save(done, params, opt_state, meta_now(done, summary.get("val_loss")))
            t_last += time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_run
    ckpts.wait()
    ckpts.close()
    if metrics is not None:
        t0 = time.perf_counter()
        report = job.report(graphdef, params)
        if report:
            log(", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in report.items())
                + f" ({time.perf_counter() - t0:.1f}s)", step=t.max_iters, **report)
        summary.update(report)
    log(f"{train_s:.1f}s: compile {compile_s or 0:.1f}s, evaluation {pause:.1f}s",
        wall_s=train_s, compile_s=compile_s, eval_s=pause)
    summary.update(wall_s=train_s, best_val_loss=best_val, out_dir=str(out_dir), params=params,
                   graphdef=graphdef, final_loss=None if metrics is None
                   else float(jax.device_get(metrics["loss"])))
    return summary
