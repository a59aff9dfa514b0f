"""What keeps a run from being lost: stop signals, the non-finite guard's bookkeeping, disk room.

- `StopSignals`: the first SIGINT (Ctrl-C) or SIGTERM (preemption, `kill`) asks the training
  loop to stop at the next step boundary; it then writes a checkpoint and returns normally, so
  the process exits 0 and `--resume=true` continues the run exactly. A second signal stops at
  once (KeyboardInterrupt: exit code 130), leaving the last complete checkpoint.
- `NonFinite`: the train step itself skips an update whose loss or gradient is NaN or Inf
  (llm_jax/step.py); this collects those steps without waiting on the device at every step,
  and with train.nonfinite=stop ends the run with the step number.
- `check_room`: an output directory without room for a few checkpoints fails before training.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
from pathlib import Path

import jax

from llm_jax.errors import UserError


class StopSignals:
    """A context manager: `requested` names the signal that asked to stop, or is None."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say=print):
        self.requested: str | None = None
        self.say = say
        self.previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt  # the second one: stop now
        self.requested = signal.Signals(signum).name
        self.say(f"{self.requested}: stopping after this step, with a checkpoint "
                 "(send it again to stop at once)")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals need the main one
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class NonFinite:
    """The steps whose update was skipped for a NaN/Inf loss or gradient."""

    def __init__(self, mode: str, log):
        self.mode, self.log = mode, log
        self.pending: list = []  # (step, device bool): read in bulk, not at every step
        self.skipped: list[int] = []

    def add(self, step: int, finite) -> None:
        self.pending.append((step, finite))

    def check(self, last_good: str) -> None:
        """Read the pending flags; log the skipped steps; UserError with nonfinite=stop."""
        if not self.pending:
            return
        flags = jax.device_get([f for _, f in self.pending])
        bad = [step for (step, _), ok in zip(self.pending, flags) if not ok]
        self.pending = []
        if not bad:
            return
        self.skipped += bad
        if self.mode == "stop":
            raise UserError(f"non-finite loss or gradient at step {bad[0]}; training stopped "
                            f"(train.nonfinite=stop), the last good checkpoint is {last_good}")
        self.log(f"step {bad[-1]}: non-finite loss or gradient at step(s) "
                 f"{', '.join(map(str, bad))}: update skipped ({len(self.skipped)} so far)",
                 step=bad[-1], skipped_steps=bad)


def check_room(out_dir: Path, params, keep: int) -> None:
    """Fail early when out_dir cannot hold `keep` checkpoints (params + Adam's two moments)."""
    need = 3 * keep * sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"out_dir {str(out_dir)!r} has {free / 1e6:,.1f} MB free; {keep} "
                        f"checkpoints of this model need about {need / 1e6:,.1f} MB")
