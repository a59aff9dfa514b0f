"""Load a trained model for inference: config, tokenizer and params from a run directory."""

from __future__ import annotations

from llm_jax import checkpoint
from llm_jax import model as gpt
from llm_jax.config import Config, from_dict
from llm_jax.errors import UserError
from llm_jax.tokenizers import Tokenizer, tokenizer_from_json


def load_model(run_dir: str, which: str = "latest") -> tuple[object, dict, Config, Tokenizer]:
    """(graphdef, params, config, tokenizer) from run_dir's latest or best checkpoint."""
    meta = checkpoint.read_meta(run_dir, which)
    config = from_dict(meta["config"], origin=f"the checkpoint in {run_dir}")
    family = config.model.family
    if family != "gpt":
        command = {"seq2seq": "python -m llm_jax.seq2seq decode",
                   "classifier": "python -m llm_jax.encoder classify"}.get(
            family, "python -m llm_jax.encoder fill")
        raise UserError(f"{run_dir!r} holds a {family} model, which does not generate text "
                        f"left to right; use {command} --out_dir {run_dir}")
    tokenizer = tokenizer_from_json(meta["tokenizer"])
    graphdef, abstract = gpt.abstract_params(config.model)
    params, _, _ = checkpoint.restore(run_dir, abstract, which=which)
    return graphdef, params, config, tokenizer
