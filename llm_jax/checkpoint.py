"""Checkpoints: orbax's CheckpointManager behind a small interface.

A run directory holds `ckpt/<step>/` (the last `keep_last` checkpoints) and `best/<step>/` (the
one with the lowest validation loss). Each checkpoint has three items, so that a reader can
restore only what it needs (sampling reads `params` and `meta`, never the optimizer state):
- `params`: the model's params pytree;
- `opt_state`: the optimizer state;
- `meta`: JSON with the run's config, the step, the data position, the RNG key, the tokenizer
  and the last validation loss.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a save
interrupted by a crash is never picked up. Saving is asynchronous: the arrays are copied first
(the train step donates and overwrites the live buffers; to the host when one process holds
them all), then written in a background thread while training continues. Everything is stored
as arrays and JSON: no pickle, no code.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from llm_jax.errors import UserError

FORMAT = 1


def _manager(directory: Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    # The processes of a multi-process job meet at barriers named by step; the folder's name
    # keeps ckpt/ and best/ saves of the same step apart.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=directory.name))
    return ocp.CheckpointManager(directory.absolute(), options=options)


@jax.jit
def fingerprint(tree):
    """A uint32 per array that any change of an element changes: the sum over elements of
    (bits xor a hash of the index) x an odd number (a bijection modulo 2**32). Computed where
    the arrays live; stored in meta and checked on restore, because orbax reads raw array
    chunks without a checksum (a damaged uncompressed chunk would load as wrong weights)."""
    def one(x):
        bits = (x.astype(jnp.uint8) if x.dtype == bool else jax.lax.bitcast_convert_type(
            x, {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]))
        bits = bits.astype(jnp.uint32).ravel()
        i = jnp.arange(bits.size, dtype=jnp.uint32)
        return jnp.sum((bits ^ (i * jnp.uint32(2654435761))) * (2 * i + 1), dtype=jnp.uint32)

    return jax.tree.map(one, tree)


class Checkpoints:
    """The checkpoints of one run directory: `save`, `save_best`, `restore`, `close`."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2, async_save: bool = True):
        self.run_dir = Path(run_dir)
        self.latest = _manager(self.run_dir / "ckpt", max(keep_last, 1), async_save)
        self.best = _manager(self.run_dir / "best", 1, async_save)

    def save(self, step: int, params, opt_state, meta: dict, *, best: bool = False) -> None:
        """Save step `step` (to best/ instead of ckpt/ when best=True); returns before writing."""
        tree = {"params": params, "opt_state": opt_state}
        if jax.process_count() == 1:
            # One device-to-host copy of everything, which the next train step (it donates the
            # live buffers) cannot overwrite; orbax then writes host arrays in the background.
            # Handing it device arrays instead blocked training much longer on a mesh (11
            # saves of the default model on the CPU split into 2 devices: 3.34 s against 0.91 s).
            tree, prints = jax.device_get((tree, fingerprint(tree)))
        else:  # no process holds every shard: copies on the devices
            tree = jax.tree.map(jnp.copy, tree)
            prints = jax.device_get(fingerprint(tree))
        params, opt_state = tree["params"], tree["opt_state"]
        prints = {k: [int(x) for x in jax.tree.leaves(v)] for k, v in prints.items()}
        manager = self.best if best else self.latest
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(dict(meta, step=step, format=FORMAT, fingerprint=prints))),
            force=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def find(run_dir: str | Path, which: str = "latest") -> tuple[Path, int]:
    """The checkpoint folder to read in run_dir: (manager folder, step). UserError if none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"checkpoint directory {str(run_dir)!r} does not exist")
    if which not in ("latest", "best"):
        raise UserError(f"unknown checkpoint {which!r}: use latest or best")
    folder = run_dir / ("ckpt" if which == "latest" else "best")
    steps = [int(p.name) for p in folder.glob("*") if p.is_dir() and p.name.isdigit()
             and (p / "meta").exists()] if folder.is_dir() else []
    if not steps:
        raise UserError(f"no {which} checkpoint in {str(run_dir)!r} (looked in {str(folder)!r})")
    return folder, max(steps)


def exists(run_dir: str | Path, which: str = "latest") -> bool:
    try:
        find(run_dir, which)
    except UserError:
        return False
    return True


def read_meta(run_dir: str | Path, which: str = "latest") -> dict:
    folder, step = find(run_dir, which)
    path = folder / str(step) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint metadata {str(path)!r} is unreadable: {e}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {str(path)!r} has format {meta.get('format')!r}, "
                        f"this version reads format {FORMAT}")
    return meta


def _check_shapes(abstract, restored, what: str) -> None:
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                 jax.tree.leaves(restored)):
        if want.shape != got.shape or want.dtype != got.dtype:
            name = jax.tree_util.keystr(path)
            raise UserError(f"checkpoint {what} {name} has shape {got.shape} {got.dtype}, "
                            f"the config expects {want.shape} {want.dtype}")


def _why(error: BaseException) -> str:
    """What went wrong reading a checkpoint, from the innermost cause of the error."""
    messages = []
    while error is not None:
        messages.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
        error = error.__cause__ or error.__context__
    text = " ".join(messages)
    if "corrupt" in text.lower() or "Error reading" in text:
        inner = next((m for m in messages if "corrupt" in m.lower() or "Error reading" in m))
        return f"is corrupted: {inner[:300]}"
    return f"does not match the model config or is incomplete: {messages[-1][:300]}"


def _on_default_device(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def place(x):
        if getattr(x, "sharding", None) is not None:
            return x
        return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=device)

    return jax.tree.map(place, tree)


def restore(run_dir: str | Path, abstract_params, abstract_opt_state=None,
            which: str = "latest") -> tuple:
    """(params, opt_state or None, meta) from run_dir's latest (or best) checkpoint.

    `abstract_*` are pytrees of jax.ShapeDtypeStruct (from jax.eval_shape), optionally with
    shardings: orbax reads each array straight into that layout. Leaves without one go to the
    default device, whatever devices wrote the checkpoint (a run trained on a mesh, e.g. the CPU
    split into per-core devices, then sampled on one device).
    """
    folder, step = find(run_dir, which)
    abstract_params, abstract_opt_state = _on_default_device((abstract_params,
                                                              abstract_opt_state))
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    where = str(folder / str(step))
    with ocp.CheckpointManager(folder.absolute()) as manager:
        try:
            out = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax, tensorstore: wrong shapes, damaged or missing files
            raise UserError(f"checkpoint {where!r} {_why(e)}") from None
    _check_shapes(abstract_params, out["params"], "param")
    opt_state = out["opt_state"] if abstract_opt_state is not None else None
    saved = out["meta"].get("fingerprint", {})
    for name, tree in (("params", out["params"]), ("opt_state", opt_state)):
        if tree is not None and name in saved:
            now = [int(x) for x in jax.tree.leaves(jax.device_get(fingerprint(tree)))]
            if now != saved[name]:
                paths = [jax.tree_util.keystr(p) for p, _ in
                         jax.tree_util.tree_leaves_with_path(tree)]
                bad = [p for p, a, b in zip(paths, now, saved[name]) if a != b]
                raise UserError(f"checkpoint {where!r} is corrupted: {name}{bad[0]} does not "
                                f"read back as it was written ({len(bad)} array(s) differ)")
    return out["params"], opt_state, out["meta"]
