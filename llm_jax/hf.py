"""Hugging Face GPT-2 weights: import and export of the `config.json` + `model.safetensors` layout.

`load_hf(directory)` reads a directory as transformers writes one for GPT2LMHeadModel (gpt2,
gpt2-medium, gpt2-large, gpt2-xl or any other GPT-2 shape) into a ModelConfig and params;
`save_hf(directory, cfg, params)` writes params in that layout, loadable by
`GPT2LMHeadModel.from_pretrained`. llm_jax never downloads weights: fetch them while online, e.g.
`hf download gpt2 config.json model.safetensors --local-dir gpt2`. From the command line:

    python -m llm_jax.hf export --out_dir out --to out/hf      # a training run -> HF layout

Design choices:
- The mapping is one table because model.py uses GPT-2's names: HF's
  `transformer.h.{i}.attn.c_attn.weight` is row i of our stacked `h.attn.c_attn.kernel`. HF GPT-2
  stores its Conv1D weights as (in, out), as our kernels are: no transposes (tests/test_hf.py
  checks logits against transformers' own on the same file).
- Safetensors are read with their numpy API, never torch; F32, F16 and BF16 become float32.
- Memory: each stacked param is filled in place, layer by layer, in one preallocated numpy
  array from the memory-mapped file, copied to JAX and released, so loading holds the model once
  plus at most two copies of one param (gpt2-xl: 6.2 GB + 2 x 2 GB for the MLP kernels).
- The vocabulary padding (50257 -> 50304 zero rows) is added on import and cut on export; the
  logits never see it. HF GPT-2 always has biases: a bias=False model exports zeros.
- What this model cannot compute exactly (another activation or LayerNorm epsilon, an untied
  head, scaled-attention variants) is refused, naming the config.json key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (gives numpy the "bfloat16" that safetensors reads BF16 as)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llm_jax import model as gpt
from llm_jax.cli import run_main
from llm_jax.errors import UserError
from llm_jax.inference import load_model
from llm_jax.tokenizers import GPT2_EOT_ID

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
PREFIX = "transformer."  # GPT2LMHeadModel's; files of the bare GPT2Model have no prefix
READABLE_DTYPES = ("F32", "F16", "BF16")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # two names of the same tanh approximation
# Our params path -> HF tensor name without the prefix; "{}" is the layer index.
NAMES = {
    ("wte", "embedding"): "wte.weight",
    ("wpe", "embedding"): "wpe.weight",
    ("h", "ln_1", "scale"): "h.{}.ln_1.weight",
    ("h", "ln_1", "bias"): "h.{}.ln_1.bias",
    ("h", "attn", "c_attn", "kernel"): "h.{}.attn.c_attn.weight",
    ("h", "attn", "c_attn", "bias"): "h.{}.attn.c_attn.bias",
    ("h", "attn", "c_proj", "kernel"): "h.{}.attn.c_proj.weight",
    ("h", "attn", "c_proj", "bias"): "h.{}.attn.c_proj.bias",
    ("h", "ln_2", "scale"): "h.{}.ln_2.weight",
    ("h", "ln_2", "bias"): "h.{}.ln_2.bias",
    ("h", "mlp", "c_fc", "kernel"): "h.{}.mlp.c_fc.weight",
    ("h", "mlp", "c_fc", "bias"): "h.{}.mlp.c_fc.bias",
    ("h", "mlp", "c_proj", "kernel"): "h.{}.mlp.c_proj.weight",
    ("h", "mlp", "c_proj", "bias"): "h.{}.mlp.c_proj.bias",
    ("ln_f", "scale"): "ln_f.weight",
    ("ln_f", "bias"): "ln_f.bias",
}
# Not weights: the tied head (a copy of wte) and the causal-mask buffers of older files.
IGNORED = re.compile(r"lm_head\.weight|(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# --- Import ------------------------------------------------------------------------------------


def read_config(directory, vocab_multiple: int = 64) -> gpt.ModelConfig:
    """The ModelConfig of an HF GPT-2 directory's config.json (absent keys: GPT2Config's
    defaults). Refuses what this model cannot compute exactly, naming the key."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"Hugging Face model directory {str(directory)!r} does not exist")
    path = directory / CONFIG
    if not path.is_file():
        raise UserError(f"{path} is missing: a Hugging Face GPT-2 directory holds {CONFIG} and "
                        f"{WEIGHTS}")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path} is not a JSON object")

    def value(key, default, ok, why):
        v = hf.get(key, default)
        if not ok(v):
            raise UserError(f"{path}: {key}={v!r} is not supported: {why}")
        return v

    def size(key, default):
        return value(key, default, lambda v: type(v) is int and v > 0, "expected an integer >= 1")

    value("model_type", None, lambda v: v == "gpt2", "llm_jax imports GPT-2 models only")
    n_embd, n_head = size("n_embd", 768), size("n_head", 12)
    cfg = gpt.ModelConfig(vocab_size=size("vocab_size", 50257), vocab_multiple=vocab_multiple,
                          block_size=size("n_positions", 1024), n_layer=size("n_layer", 12),
                          n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True)
    if n_embd % n_head:
        raise UserError(f"{path}: n_embd={n_embd} is not divisible by n_head={n_head}")
    value("n_inner", None, lambda v: v in (None, 4 * n_embd), "the MLP is 4 * n_embd wide")
    value("activation_function", "gelu_new", lambda v: v in TANH_GELU,
          "the MLP uses GPT-2's tanh GELU (gelu_new)")
    value("layer_norm_epsilon", 1e-5, lambda v: v == 1e-5, "the LayerNorms use epsilon 1e-5")
    value("tie_word_embeddings", True, lambda v: v is True, "the output head is tied to wte")
    value("scale_attn_weights", True, lambda v: v is True, "attention scales by 1/sqrt(K)")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        value(key, False, lambda v: v is False, "GPT-2's attention has neither")
    return cfg


def _open_weights(directory: Path, stack: ExitStack) -> tuple[dict, Path]:
    """(tensor name -> (open file, its path), the path to name in messages): model.safetensors,
    or the shards a model.safetensors.index.json lists."""
    single, index = directory / WEIGHTS, directory / INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"]
                            .values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is not a safetensors index (weight_map): {e}") from None
    else:
        hint = (": it has pytorch_model.bin, which llm_jax does not read (it needs no torch); "
                "download model.safetensors") if (directory / "pytorch_model.bin").exists() else ""
        raise UserError(f"{single} is missing{hint}")
    where = {}
    for path in files:
        if not path.is_file():
            raise UserError(f"{path} is missing (listed in {index})")
        try:
            f = stack.enter_context(safe_open(str(path), framework="numpy"))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable safetensors file: {e}") from None
        where.update((name, (f, path)) for name in f.keys())
    return where, files[0] if single.is_file() else index


def load_hf(directory, vocab_multiple: int = 64) -> tuple[gpt.ModelConfig, dict]:
    """(ModelConfig, float32 params) from an HF GPT-2 directory: config.json + model.safetensors
    (or shards with an index). Names the file and tensor of anything missing or misshapen."""
    directory = Path(directory)
    cfg = read_config(directory, vocab_multiple)
    _, abstract = gpt.abstract_params(cfg)
    params: dict = {}
    with ExitStack() as stack:
        where, weights = _open_weights(directory, stack)
        prefix = "" if "wte.weight" in where else PREFIX
        wanted = {prefix + name.format(i) for path, name in NAMES.items()
                  for i in (range(cfg.n_layer) if path[0] == "h" else [None])}
        for name in sorted(set(where) - wanted):
            if not IGNORED.fullmatch(name):
                raise UserError(f"{where[name][1]}: unexpected tensor {name!r} for a GPT-2 of "
                                f"n_layer={cfg.n_layer} (as {directory / CONFIG} says)")

        def read(name: str, shape: tuple) -> np.ndarray:
            if name not in where:
                raise UserError(f"{weights}: tensor {name!r} is missing")
            f, path = where[name]
            info = f.get_slice(name)
            if info.get_dtype() not in READABLE_DTYPES:
                raise UserError(f"{path}: tensor {name!r} has dtype {info.get_dtype()}; llm_jax "
                                f"reads {', '.join(READABLE_DTYPES)}")
            if tuple(info.get_shape()) != shape:
                raise UserError(f"{path}: tensor {name!r} has shape {tuple(info.get_shape())}, "
                                f"{directory / CONFIG} implies {shape}")
            return f.get_tensor(name)

        for path, name in NAMES.items():
            shape = _get(abstract, path).shape
            buffer = np.zeros(shape, np.float32)  # zeros: the padded vocabulary rows
            if path[0] == "h":
                for i in range(cfg.n_layer):
                    buffer[i] = read(prefix + name.format(i), shape[1:])  # casts to float32
            elif path == ("wte", "embedding"):
                buffer[: cfg.vocab_size] = read(prefix + name, (cfg.vocab_size, cfg.n_embd))
            else:
                buffer[...] = read(prefix + name, shape)
            _set(params, path, jnp.array(buffer))  # a copy: the buffer is freed right away
            del buffer
    return cfg, params


def load_pretrained(path, vocab_multiple: int = 64):
    """Weights to start from (train.init_from, sample.py --init_from): an llm_jax run directory
    (has ckpt/: its latest checkpoint) or an HF GPT-2 directory (config.json + model.safetensors).
    Returns (graphdef, params, ModelConfig, tokenizer); the tokenizer is None for an HF
    directory, whose tokenizer llm_jax cannot know (GPT-2's BPE for GPT-2's weights)."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"init_from {str(path)!r} is not a directory; llm_jax never downloads "
                        "weights: get them while online, e.g. `hf download gpt2 config.json "
                        "model.safetensors --local-dir gpt2`")
    if (directory / "ckpt").is_dir():
        graphdef, params, config, tokenizer = load_model(str(directory))
        return graphdef, params, config.model, tokenizer
    cfg, params = load_hf(directory, vocab_multiple)
    return gpt.abstract_params(cfg)[0], params, cfg, None


# --- Export ------------------------------------------------------------------------------------


def hf_config(cfg: gpt.ModelConfig) -> dict:
    """config.json for GPT2LMHeadModel. End of text is GPT-2's id when the vocabulary has it."""
    eot = GPT2_EOT_ID if cfg.vocab_size > GPT2_EOT_ID else None
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
            "use_cache": True, "bos_token_id": eot, "eos_token_id": eot}


def hf_tensors(cfg: gpt.ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """HF tensor name -> float32 numpy array, views of params where they can be."""
    _, abstract = gpt.abstract_params(cfg)
    tensors = {}
    for path, name in NAMES.items():
        node = _get(params, path[:-1])
        if path[-1] in node:
            array = np.asarray(node[path[-1]], dtype=np.float32)
            want = _get(abstract, path).shape
            if array.shape != want:
                raise UserError(f"param {'.'.join(path)} has shape {array.shape}, the model "
                                f"config implies {want}")
        else:  # bias=False: HF GPT-2 always has biases, and zeros compute the same
            weight = np.asarray(node["kernel"] if "kernel" in node else node["scale"])
            shape = weight.shape[:-2] + weight.shape[-1:] if "kernel" in node else weight.shape
            array = np.zeros(shape, np.float32)
        if path == ("wte", "embedding"):
            array = array[: cfg.vocab_size]  # drop the padding rows
        for i in range(cfg.n_layer) if path[0] == "h" else [None]:
            part = array if i is None else array[i]
            tensors[PREFIX + name.format(i)] = np.ascontiguousarray(part)
    return tensors


def save_hf(directory, cfg: gpt.ModelConfig, params: dict, overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors (float32) for GPT2LMHeadModel into `directory`.

    A new (or empty) directory is written in a temporary folder beside it, then renamed into
    place. A non-empty directory is refused unless overwrite=True, which replaces the two files
    (each atomically) and leaves any others (a tokenizer, a README) alone."""
    directory = Path(directory)
    if cfg.position != "learned" or cfg.norm != "layernorm":
        raise UserError(f"GPT-2's layout has learned positions and LayerNorm; this model has "
                        f"model.position={cfg.position!r}, model.norm={cfg.norm!r}")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory")
    replace = directory.is_dir() and any(directory.iterdir())
    if replace and not overwrite:
        raise UserError(f"{directory} is not empty: choose another directory, or allow "
                        "overwriting (--overwrite)")
    tensors = hf_tensors(cfg, params)
    directory.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.absolute().parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})  # transformers wants it
        (tmp / CONFIG).write_text(json.dumps(hf_config(cfg), indent=2) + "\n", encoding="utf-8")
        if replace:
            for name in (WEIGHTS, CONFIG):
                os.replace(tmp / name, directory / name)
            tmp.rmdir()
        else:
            os.replace(tmp, directory)  # an empty directory is replaced whole
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


# --- Command line ------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m llm_jax.hf",
                                description="Hugging Face GPT-2 layout (config.json + "
                                            "model.safetensors) for llm_jax models.")
    commands = p.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a training run's checkpoint in HF layout")
    export.add_argument("--out_dir", default="out", help="the run directory train.py wrote")
    export.add_argument("--ckpt", default="latest", choices=("latest", "best"))
    export.add_argument("--to", required=True, help="the directory to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = p.parse_args(argv)
    _, params, config, tokenizer = load_model(args.out_dir, args.ckpt)
    save_hf(args.to, config.model, params, overwrite=args.overwrite)
    print(f"wrote {args.to}/{CONFIG} and {WEIGHTS} "
          f"({gpt.count_params(config.model, params, non_embedding=False):,} params): "
          f"GPT2LMHeadModel.from_pretrained({args.to!r}) loads it")
    if tokenizer.kind != "gpt2":
        print(f"note: the run used the {tokenizer.kind} tokenizer, not GPT-2's BPE: HF "
              "tokenizers do not know its ids", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
