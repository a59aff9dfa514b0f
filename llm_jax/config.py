"""Run configuration: typed, frozen dataclasses, presets from TOML, command-line overrides.

A run is described by one `Config` with three parts: `model` (the network's shape, see
`llm_jax.model.ModelConfig`), `data` (where the text comes from and how it is tokenized) and
`train` (optimizer, schedule, logging, checkpoints). Presets are TOML files in `configs/`; they
are data, never code. Overrides come from the command line as `--section.key=value`, or
`--key=value` when the key name is unique across sections. Unknown keys and badly typed values
raise `UserError` naming the key (and a close match when there is one).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_jax.errors import UserError
from llm_jax.attention import IMPLEMENTATIONS
from llm_jax.model import LINEAR_VJPS, MATMUL_DTYPES, NORMS, POSITIONS, ModelConfig
from llm_jax.tasks import FAMILIES, TASKS

ATTENTION_DTYPES = ("", "float32", "bfloat16", "float16", "auto")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    source: str = "builtin"  # builtin (Python's docs, no download) | text (path) | shakespeare
    # | sft (built-in instructions, llm_jax/sft.py) | jsonl (path: conversations, fine-tuning)
    path: str = ""  # text: a file or a folder of .txt/.md files; shakespeare: optional local copy
    tokenizer: str = "char"  # char (vocabulary built from the corpus) | gpt2 (tiktoken BPE) | bpe
    bpe_path: str = ""  # bpe: a tokenizer file from `python -m llm_jax.bpe train` ...
    bpe_vocab_size: int = 0  # ... or train one of this many tokens on the train split (>= 257)
    val_fraction: float = 0.1  # the last fraction of the text is held out for validation
    data_dir: str = "data"  # prepared token files live in a subfolder of this
    sft_examples: int = 20000  # sft: built-in instructions made (val_fraction of them held out)
    sft_tasks: str = "add,sub,reverse,upper,first"  # sft: which kinds of instruction
    sft_seed: int = 0  # sft: the examples are a function of this seed
    pack: bool = True  # sft/jsonl: pack examples into rows (no attention across them), or pad


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "out"  # checkpoints, metrics.jsonl and the run's config
    seed: int = 1337  # params init, dropout and batch order all derive from it
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 1000  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate, after warmup
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup from 0 over this many steps
    lr_decay_iters: int = 0  # cosine decay ends here (0: at max_iters)
    weight_decay: float = 0.1  # AdamW decay, on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # clip by global norm (0: off)
    eval_interval: int = 250  # evaluate (and maybe save the best) every this many steps
    eval_iters: int = 20  # batches per evaluation
    # the train loss at evaluations: "held_out" from eval_iters forward passes over fixed train
    # batches, as for val; "steps" the mean loss of the last eval_iters train steps (no extra
    # passes); "auto" steps where those are eval-mode losses (dropout and label smoothing 0)
    eval_train: str = "auto"
    log_interval: int = 10  # steps between log lines
    ckpt_interval: int = 500  # steps between checkpoints (a last one is always written)
    keep_last: int = 2  # checkpoints kept, besides the best by val loss
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    init_from: str = ""  # "": from scratch; an HF GPT-2 dir or an llm_jax run dir: its weights
    progress: bool = True  # show a progress bar
    peak_tflops: float = 0.0  # device peak for MFU (0: known GPUs/TPUs looked up, else FLOP/s only)
    data_parallel: int = -1  # devices on the mesh's "data" axis (-1: all that fsdp leaves)
    fsdp: int = 1  # devices that params and optimizer state are sharded over (1: replicated)
    cpu_devices: int = 0  # CPU: devices to split it into, data-parallel (0: auto, llm_jax/cpu.py)
    coordinator: str = ""  # multi-process: process 0's "host:port", or "auto" (TPU VMs, SLURM)
    num_processes: int = 0  # with a host:port coordinator: processes in the job
    process_id: int = -1  # with a host:port coordinator: this process's index, 0 .. n-1
    distributed_timeout: int = 300  # seconds to wait for the other processes (start, heartbeat)
    inspect_interval: int = 0  # steps between gradient/activation statistics (0: off)
    label_smoothing: float = 0.0  # train towards (1 - eps) * one-hot + eps / V (eval: plain loss)
    nonfinite: str = "skip"  # a NaN/Inf loss or gradient: skip that update | stop the run
    freeze: str = ""  # params left unchanged, e.g. "wte,h.0,h.1": regexes over param paths


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _keys(section: str) -> dict[str, type]:
    cls = _SECTION_TYPES[section]
    return {f.name: type(f.default) for f in dataclasses.fields(cls)}


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value: Any, typ: type, from_text: bool) -> Any:
    """Convert a value to the field's type, or raise UserError. Only command-line values (text)
    are parsed; a TOML value must already have the field's type (an int may stand for a float)."""
    if from_text and isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return typ(text)
        except ValueError:
            raise UserError(f"invalid value {value!r} for {key}: expected {typ.__name__}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not typ:
        raise UserError(
            f"invalid value {value!r} for {key}: expected {typ.__name__}, got {type(value).__name__}"
        )
    return value


def apply(config: Config, updates: dict[str, dict[str, Any]], origin: str = "",
          from_text: bool = False) -> Config:
    """Return `config` with `updates` ({section: {key: value}}) applied and type-checked.
    from_text: the values are command-line strings, to be parsed into each field's type."""
    where = f" in {origin}" if origin else ""
    parts = {}
    for section, values in updates.items():
        if section not in _SECTION_TYPES:
            raise UserError(f"unknown config section {section!r}{where}{_suggest(section, _SECTION_TYPES)}")
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r}{where} must be a table of keys")
        keys = _keys(section)
        changes = {}
        for key, value in values.items():
            if key not in keys:
                raise UserError(f"unknown config key {section}.{key}{where}{_suggest(key, keys)}")
            changes[key] = _coerce(f"{section}.{key}", value, keys[key], from_text)
        parts[section] = dataclasses.replace(getattr(config, section), **changes)
    config = dataclasses.replace(config, **parts)
    validate(config)
    return config


def validate(config: Config) -> None:
    m, t, d = config.model, config.train, config.data
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_multiple"):
        if getattr(m, name) < 1:
            raise UserError(f"model.{name} must be at least 1, got {getattr(m, name)}")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"model.dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
    if m.attention_dtype not in ATTENTION_DTYPES:
        raise UserError("model.attention_dtype must be one of "
                        f"{', '.join(map(repr, ATTENTION_DTYPES))}, got {m.attention_dtype!r}")
    for name, choices in (("position", POSITIONS), ("norm", NORMS),
                          ("matmul_dtype", MATMUL_DTYPES), ("linear_vjp", LINEAR_VJPS)):
        if getattr(m, name) not in choices:
            raise UserError(f"model.{name} must be one of {', '.join(choices)}, got "
                            f"{getattr(m, name)!r}" + _suggest(getattr(m, name), choices))
    if m.attention not in IMPLEMENTATIONS:
        raise UserError(f"model.attention must be one of {', '.join(IMPLEMENTATIONS)}, got "
                        f"{m.attention!r}" + _suggest(m.attention, tuple(IMPLEMENTATIONS)))
    if m.attention != "reference" and m.dropout > 0:
        raise UserError(f"model.attention={m.attention} has no attention dropout: use "
                        "model.attention=reference or model.dropout=0")
    if m.attention_block < 1:
        raise UserError(f"model.attention_block must be at least 1, got {m.attention_block}")
    if m.position == "rope" and m.head_dim % 2:
        raise UserError(f"model.position=rope needs an even head dimension, got "
                        f"n_embd / n_head = {m.head_dim}")
    if m.family not in FAMILIES:
        raise UserError(f"model.family must be one of {', '.join(FAMILIES)}, got {m.family!r}"
                        + _suggest(m.family, FAMILIES))
    if m.task and m.task not in TASKS.get(m.family, ()):
        raise UserError(f"model.task={m.task!r} is not a task of model.family={m.family} "
                        f"(its tasks: {', '.join(TASKS.get(m.family, ())) or 'none'})")
    if m.n_dec_layer < 0 or m.n_class < 0 or not 0.0 < m.mask_prob < 1.0:
        raise UserError("model.n_dec_layer and model.n_class must be >= 0 and model.mask_prob "
                        f"in (0, 1), got {m.n_dec_layer}, {m.n_class}, {m.mask_prob}")
    for name in ("batch_size", "grad_accum", "eval_iters", "log_interval", "eval_interval",
                 "ckpt_interval", "fsdp", "distributed_timeout"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name} must be at least 1, got {getattr(t, name)}")
    for name in ("max_iters", "seed", "warmup_iters", "lr_decay_iters", "keep_last",
                 "inspect_interval"):
        if getattr(t, name) < 0:
            raise UserError(f"train.{name} must be at least 0, got {getattr(t, name)}")
    for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_tflops"):
        if not getattr(t, name) >= 0:  # also rejects nan
            raise UserError(f"train.{name} must be a number >= 0, got {getattr(t, name)}")
    if t.eval_train not in ("auto", "held_out", "steps"):
        raise UserError(f"train.eval_train must be auto, held_out or steps, got {t.eval_train!r}")
    if t.nonfinite not in ("skip", "stop"):
        raise UserError(f"train.nonfinite must be skip or stop, got {t.nonfinite!r}")
    if t.cpu_devices < 0:
        raise UserError(f"train.cpu_devices must be 0 (one per core) or at least 1, got "
                        f"{t.cpu_devices}")
    if t.data_parallel == 0 or t.data_parallel < -1:
        raise UserError(f"train.data_parallel must be -1 (all devices that fsdp leaves) or at "
                        f"least 1, got {t.data_parallel}")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise UserError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    sources = ("builtin", "text", "shakespeare", "sft", "jsonl")
    if d.source not in sources:
        raise UserError(f"unknown data.source {d.source!r}: use {', '.join(sources)}"
                        + _suggest(d.source, sources))
    if d.source == "sft" and d.sft_examples < 2:
        raise UserError(f"data.sft_examples must be at least 2, got {d.sft_examples}")
    if d.tokenizer not in ("char", "gpt2", "bpe"):
        raise UserError(f"unknown data.tokenizer {d.tokenizer!r}: use char, gpt2 or bpe")
    if d.tokenizer != "bpe" and (d.bpe_path or d.bpe_vocab_size):
        raise UserError("data.bpe_path and data.bpe_vocab_size need data.tokenizer=bpe")
    if d.tokenizer == "bpe" and bool(d.bpe_path) == bool(d.bpe_vocab_size):
        raise UserError("data.tokenizer=bpe needs one of data.bpe_path (a tokenizer file) or "
                        "data.bpe_vocab_size (to train one on the corpus)")
    if d.bpe_vocab_size and d.bpe_vocab_size < 257:
        raise UserError(f"data.bpe_vocab_size must be at least 257 (256 bytes and "
                        f"<|endoftext|>), got {d.bpe_vocab_size}")
    if not 0.0 < d.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be between 0 and 1, got {d.val_fraction}")


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_preset(name_or_path: str) -> Config:
    """A preset by name (configs/NAME.toml) or a path to a TOML file, over the defaults."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = CONFIG_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise UserError(f"unknown preset {name_or_path!r}{_suggest(name_or_path, presets())}; "
                            f"presets: {', '.join(presets())}")
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        updates = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    return apply(Config(), updates, origin=str(path))


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """['--train.max_iters=10', '--n_layer', '2'] -> {'train': {'max_iters': '10'}, 'model': ...}."""
    updates: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise UserError(f"missing value for {arg}")
            i += 1
            value = args[i]
        if "." in name:
            section, _, key = name.partition(".")
        else:
            owners = [s for s in _SECTION_TYPES if name in _keys(s)]
            if not owners:
                every = [k for s in _SECTION_TYPES for k in _keys(s)]
                raise UserError(f"unknown config key {name!r}{_suggest(name, every)}")
            if len(owners) > 1:
                raise UserError(f"config key {name!r} is ambiguous: write one of "
                                + ", ".join(f"--{s}.{name}" for s in owners))
            section, key = owners[0], name
        updates.setdefault(section, {})[key] = value
        i += 1
    return updates


def load_config(argv: list[str], default_preset: str = "default") -> Config:
    """Command line -> Config: an optional preset name or .toml path first, then overrides."""
    preset = default_preset
    if argv and not argv[0].startswith("--"):
        preset, argv = argv[0], argv[1:]
    return apply(load_preset(preset), parse_overrides(argv), origin="the command line",
                 from_text=True)


def from_dict(d: dict[str, dict[str, Any]], origin: str = "") -> Config:
    """Rebuild a Config saved with `Config.to_dict` (checkpoints store it as JSON)."""
    return apply(Config(), d, origin=origin)
