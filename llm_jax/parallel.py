"""Parallelism: a device mesh, named shardings, and plain `jax.jit`.

There is no parallel code path: the train step is the same jitted function on one CPU, on a
multi-GPU node and on a TPU pod slice. What changes is where the arrays live:
- the mesh has two axes, ("data", "fsdp"), of sizes train.data_parallel x train.fsdp;
- every global batch (A, B, T) is split along B over all devices of both axes;
- params and optimizer state are replicated over "data" and sharded over "fsdp": each array is
  cut along its largest dimension that the fsdp size divides (fully sharded data parallelism,
  ZeRO-3 style), or replicated when none does (scalars, small vectors);
- `jax.jit` compiles the step for those input shardings (GSPMD inserts the all-gathers of the
  weights and the reduce-scatters of the gradients) and the outputs keep them, so donation
  reuses the buffers step after step.
`jax.pmap` is not used: since JAX 0.8 it is a maintenance-mode wrapper over jit + shard_map.
`data_parallel_step` shows the same data-parallel step written out with `shard_map` and an
explicit all-reduce, for reading.

Multi-host: `initialize` calls `jax.distributed.initialize` (JAX's own multi-controller runtime:
every process runs this same program and sees all devices of the job). Each process builds only
its own rows of every global batch (`put_batch`); orbax saves and restores checkpoints
collectively; logging happens on process 0.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.errors import UserError

AXES = ("data", "fsdp")


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_s: int = 300) -> None:
    """Join a multi-process job, once, before anything touches a device.

    coordinator "host:port" (process 0's address) needs num_processes and process_id; "auto"
    leaves them to JAX's own detection (Cloud TPU VMs, SLURM, Open MPI); "" does nothing.
    A process that loses a peer gives up after timeout_s instead of hanging.
    """
    if not coordinator or jax.distributed.is_initialized():
        return
    if coordinator == "auto":
        jax.distributed.initialize(initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=timeout_s)
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"train.coordinator={coordinator!r} must be host:port (process 0's "
                        "address and a free port) or auto")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(f"with train.coordinator set, train.num_processes (got "
                        f"{num_processes}) and train.process_id (got {process_id}) must "
                        "say how many processes there are and which one this is")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=timeout_s)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all of them). data=-1: all that fsdp leaves."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise UserError(f"train.fsdp={fsdp} must divide the {n} devices")
    data = n // fsdp if data == -1 else data
    if data < 1 or data * fsdp != n:
        raise UserError(f"train.data_parallel={data} x train.fsdp={fsdp} must equal the number "
                        f"of devices ({n}), or set train.data_parallel=-1")
    return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def spec_for(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dimension that fsdp divides; replicate when none does (or fsdp == 1)."""
    if fsdp > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
                return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return P()


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): params, optimizer state.

    The rule depends on the shape only, so Adam's moments get the shardings of their params.
    """
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(np.shape(x), fsdp)), tree)


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Batches (..., B, T): the rows B split over every device of the mesh."""
    return NamedSharding(mesh, P(*[None] * (ndim - 2), AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise UserError(f"train.batch_size={batch_size} must be a multiple of the {mesh.size} "
                        "devices of the mesh (each gets an equal share of every micro-batch)")


def local_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of a (B, T) batch that this process's devices hold: one contiguous range, as
    `make_mesh` orders the devices by process."""
    index = batch_sharding(mesh, 2).addressable_devices_indices_map((batch_size, 1))
    spans = sorted({(s[0].start or 0, s[0].stop or batch_size) for s in index.values()})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"this process's rows are not contiguous: {spans}")
    return slice(spans[0][0], spans[-1][1])


def put_batch(batch: tuple, mesh: Mesh, local: bool = False) -> tuple:
    """Numpy arrays (..., B, T) -> global jax.Arrays with the rows split over the mesh.

    The arrays hold either the whole global batch (every process may compute it: it is a pure
    function of seed and step; each hands JAX only its own rows), or with local=True only this
    process's rows, `local_rows` of them.
    """
    out = []
    for a in batch:
        if a is None:
            out.append(None)
            continue
        sharding = batch_sharding(mesh, a.ndim)
        if jax.process_count() == 1:
            out.append(jax.device_put(a, sharding))
            continue
        if local:
            mine = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
            shape = (*a.shape[:-2], a.shape[-2] * mesh.size // mine, a.shape[-1])
        else:
            shape = a.shape
            a = a[..., local_rows(a.shape[-2], mesh), :]
        out.append(jax.make_array_from_process_local_data(sharding, a, shape))
    return tuple(out)


def shard(tree, mesh: Mesh):
    """Place params / optimizer state on the mesh with `state_shardings`."""
    return jax.device_put(tree, state_shardings(tree, mesh))


def abstract_on(tree, mesh: Mesh):
    """ShapeDtypeStructs carrying the mesh's shardings: what a checkpoint restores onto."""
    shardings = state_shardings(tree, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)


def data_parallel_step(loss_fn, mesh: Mesh, learning_rate: float):
    """A data-parallel SGD step written out with shard_map, for reading.

    Each device computes the loss of its own rows; the gradient of the *mean over devices* of
    that loss is taken, with the params replicated (P()). Under shard_map the transpose of a
    replicated input already sums the per-device cotangents, so differentiating the averaged
    loss gives the global mean gradient; applying `pmean` to per-device gradients of replicated
    params would count them again. The jitted GSPMD step does the same without any of this.
    """
    from jax import shard_map

    def step(params, x_BT, y_BT):
        def local(params, x_bT, y_bT):
            def mean_loss(p):
                return jax.lax.pmean(loss_fn(p, x_bT, y_bT), AXES)

            loss, grads = jax.value_and_grad(mean_loss)(params)
            return loss, grads

        loss, grads = shard_map(local, mesh=mesh, in_specs=(P(), P(AXES), P(AXES)),
                                out_specs=(P(), P()))(params, x_BT, y_BT)
        params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
        return params, loss

    return jax.jit(step)


def describe(mesh: Mesh) -> str:
    n = jax.process_count()
    return (f"{mesh.size} devices ({mesh.shape['data']} data x {mesh.shape['fsdp']} fsdp) on "
            f"{n} process{'es' if n > 1 else ''}")


class Placement:
    """Where a run's arrays live: the default device, or a (data, fsdp) mesh over every device
    of the job. The train step is the same jitted function either way."""

    def __init__(self, t):
        self.mesh = self.rows = None
        if jax.device_count() > 1 or t.fsdp != 1 or t.data_parallel not in (-1, 1):
            self.mesh = make_mesh(t.data_parallel, t.fsdp)
            check_batch(t.batch_size, self.mesh)
            if jax.process_count() > 1:  # each process reads only its own rows of every batch
                self.rows = local_rows(t.batch_size, self.mesh)

    @property
    def per_device_mesh(self) -> Mesh | None:
        """The mesh when the train step runs each device's rows under shard_map
        (llm_jax/step.py `per_device`): data parallelism alone over CPU devices, where it
        measured 3-5 % faster than the GSPMD step; else None."""
        m = self.mesh
        if m is None or m.shape["fsdp"] != 1 or m.devices.flat[0].platform != "cpu":
            return None
        return m

    def describe(self) -> str:
        if self.mesh is None:
            return f"1 x {jax.devices()[0].device_kind}"
        return f"{describe(self.mesh)}, {jax.devices()[0].device_kind}"

    def batch(self, batch: tuple) -> tuple:
        if self.mesh is None:
            return batch
        return put_batch(batch, self.mesh, local=self.rows is not None)

    def eval_batch(self, batch: tuple) -> tuple:  # (B, T): every process builds all rows
        return batch if self.mesh is None else put_batch(batch, self.mesh)

    def init(self, make, abstract, *args):
        """make(*args) computed straight into the mesh's shardings (no whole copy on one
        device); `abstract` is the shape of its result."""
        if self.mesh is None:
            return make(*args)
        return jax.jit(make, out_shardings=state_shardings(abstract, self.mesh))(*args)

    def put(self, tree):
        return tree if self.mesh is None else shard(jax.device_get(tree), self.mesh)

    def abstract(self, tree):
        """Shapes with this run's shardings: a checkpoint restores onto them, whatever mesh
        wrote it."""
        mesh = self.mesh or make_mesh(devices=jax.devices()[:1])
        return abstract_on(tree, mesh)
