"""Training on a CPU: one JAX device per core, data-parallel over the cores.

XLA:CPU runs a program on one device with every core working inside each operation (matrix
products split into tiles, element-wise loops into ranges). A GPT small enough to train on a
laptop has small operations (a (2048, 128) x (128, 384) product takes about a millisecond), so
the cores spend much of each step handing work out and waiting for each other; measured on a
2-core machine (docs/benchmarks.md), a third or more of the step. Splitting the CPU into one
device per core and the batch over them (the same `jax.jit` + NamedSharding data parallelism
as on a GPU node: llm_jax/parallel.py) gives every core whole operations of its own, with one
all-reduce of the gradients per step.

The device count is an XLA flag and must be set before JAX starts its backend, so the scripts
call `configure` first thing (`train.cpu_devices`). Flags already in $XLA_FLAGS win. Only CPU
flags are set: on a GPU or TPU machine the accelerators stay JAX's devices and nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform

from llm_jax.errors import UserError

# Per-core devices: each runs its operations single-threaded, and only the dots go to
# YNNPACK (no fusions of element-wise work into them, which were slower at these sizes):
# float32 steps ran as fast as with XLA's own dot kernels (1.04 over 60 pairs, the Shakespeare
# recipe), bf16 ones 1.26x faster, since XLA's own kernels upcast bf16 (docs/benchmarks.md).
_PER_CORE_FLAGS = ("--xla_cpu_multi_thread_eigen=false",
                   "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def accelerator_installed() -> bool:
    """Whether a GPU or TPU plugin for JAX is installed (then JAX's devices are not the CPU)."""
    from importlib import metadata, util

    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] not in ("", "cpu"):
        return True
    return bool(metadata.entry_points(group="jax_plugins")) or util.find_spec("libtpu") is not None


# Auto splits models up to this width: measured faster for the 128-wide presets (the default
# run, nanoGPT's Shakespeare recipe) and slower for the 384-wide "small" shape, whose products
# are big enough to keep both cores busy inside one device.
AUTO_MAX_WIDTH = 256


def devices_for(requested: int, batch_size: int, n_embd: int = 0) -> int:
    """How many CPU devices to make: `requested`, or with 0 (auto) one per core when no
    accelerator is installed, the model is at most AUTO_MAX_WIDTH wide and the batch splits
    evenly over the cores; else 1."""
    if requested < 0:
        raise UserError(f"train.cpu_devices must be 0 (one per core) or at least 1, got "
                        f"{requested}")
    if requested:
        return requested
    n = cores()
    if n < 2 or batch_size % n or n_embd > AUTO_MAX_WIDTH or accelerator_installed():
        return 1
    return n


def configure(n_devices: int) -> bool:
    """Make the host platform `n_devices` devices (1: leave XLA's defaults). Returns whether
    the flags were set: not when $XLA_FLAGS already chooses a device count, nor once JAX has
    started (then the flags could no longer take effect)."""
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if n_devices <= 1 or "xla_force_host_platform_device_count" in flags:
        return False
    if xla_bridge.backends_are_initialized():
        return False
    extra = [f"--xla_force_host_platform_device_count={n_devices}"]
    extra += [f for f in _PER_CORE_FLAGS if f.split("=")[0] not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return True


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_",
               "MALLOC_MMAP_MAX_")


def retain_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a train step frees, for the next step to reuse.

    XLA:CPU allocates a step's buffers with malloc on its worker threads. By default glibc gives
    a thread's freed heap back to the kernel once it is empty, so when a step's buffers outgrow
    one 64 MB arena heap, every step maps a fresh heap and faults in its pages again: measured
    (docs/benchmarks.md), some processes took 3.5 M page faults and 11 s of system time in 600
    Shakespeare steps, others 0.3 M. A 64 MB top pad keeps the heaps and a 1 GB trim threshold
    keeps their pages. Blocks of 32 MB or more (glibc's largest mmap threshold) are mapped on
    their own and unmapped when freed, whatever the threshold: XLA's one block of a step's
    temporaries is that big for the "tiny" preset on two devices (56 MB each), and train.py,
    which queues steps ahead, mapped and faulted it in again at every step (4.3 M page faults
    in 150 steps, 12 s of system time, 12,000 instead of 17,000 tokens/s). So malloc maps no
    blocks at all (M_MMAP_MAX 0); a block too big for an arena heap (64 MB) is still mapped.
    The process then holds its peak memory. Returns whether the settings were made: not off
    glibc, nor when $MALLOC_*_ or $GLIBC_TUNABLES already choose malloc's settings."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in _MALLOC_ENV) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(k, v) == 1 for k, v in ((_M_TOP_PAD, 64 << 20),
                                               (_M_TRIM_THRESHOLD, 1 << 30),
                                               (_M_MMAP_THRESHOLD, 32 << 20),
                                               (_M_MMAP_MAX, 0)))
