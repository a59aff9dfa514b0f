"""JAX's persistent compilation cache, so that a second run skips XLA's compile.

The scripts (`train.py`, `sample.py`, bench/) call `enable()` once at start. The cache lives in
`$LLM_JAX_CACHE_DIR` when it is set, else in `$XDG_CACHE_HOME/llm_jax/jax` (by default
`~/.cache/llm_jax/jax`); `LLM_JAX_CACHE_DIR=off` turns it off. JAX's default threshold (cache
only programs that took at least 1 s to compile) would skip most CPU programs here, so programs
compiled in 0.1 s or more are kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "LLM_JAX_CACHE_DIR"
OFF = ("off", "0", "false", "none", "")


def cache_dir() -> Path | None:
    """Where the cache goes, or None when it is turned off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm_jax" / "jax"


def enable(path: str | Path | None = None, min_compile_s: float = 0.1) -> Path | None:
    """Turn the persistent cache on at `path` (default: `cache_dir()`); returns the folder used,
    or None when turned off or when the folder cannot be created (then compiling just takes
    its usual time)."""
    folder = Path(path).expanduser() if path is not None else cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
