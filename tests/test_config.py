"""Configuration: every preset builds its model, overrides are typed, mistakes name the culprit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config as config_module
from llm_jax import family_training
from llm_jax import model as gpt
from llm_jax.config import (Config, apply, from_dict, load_config, load_preset, parse_overrides,
                            presets)
from llm_jax.errors import UserError

# --- Presets -----------------------------------------------------------------------------------


def test_presets_are_the_toml_files():
    names = presets()
    assert {"default", "tiny", "small", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
            "shakespeare_char"} <= set(names)
    assert names == sorted(p.stem for p in config_module.CONFIG_DIR.glob("*.toml"))


@pytest.mark.parametrize("name", presets())
def test_every_preset_builds_its_model(name):
    cfg = load_preset(name)
    mcfg = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=65)
    L, D = mcfg.n_layer, mcfg.n_embd
    if mcfg.family != "gpt":  # encoder (mlm, classify) and encoder-decoder presets
        if mcfg.family == "classifier":  # the task sets n_class when the job is made
            mcfg = dataclasses.replace(mcfg, n_class=2)
        _, abstract = family_training.abstract_params(mcfg)
        shapes = [leaf.shape for leaf in jax.tree.leaves(abstract)]
        assert (mcfg.padded_vocab_size, D) in shapes  # the token embedding
        assert any(s[:1] == (L,) for s in shapes)  # blocks stacked over layers
        return
    _, abstract = gpt.abstract_params(mcfg)  # shapes only: GPT-2 XL allocates nothing
    assert abstract["h"]["attn"]["c_attn"]["kernel"].shape == (L, D, 3 * D)
    assert abstract["h"]["mlp"]["c_fc"]["kernel"].shape == (L, D, 4 * D)
    assert abstract["wte"]["embedding"].shape == (mcfg.padded_vocab_size, D)
    if mcfg.position == "learned":
        assert abstract["wpe"]["embedding"].shape == (mcfg.block_size, D)
    else:  # sinusoidal and rotary positions have no table to learn
        assert "wpe" not in abstract
    assert mcfg.padded_vocab_size % mcfg.vocab_multiple == 0
    assert mcfg.padded_vocab_size >= mcfg.vocab_size


@pytest.mark.parametrize("name, n_layer, n_embd, n_head", [
    ("gpt2", 12, 768, 12), ("gpt2-medium", 24, 1024, 16), ("gpt2-large", 36, 1280, 20),
    ("gpt2-xl", 48, 1600, 25),
])
def test_gpt2_presets_have_openais_shapes(name, n_layer, n_embd, n_head):
    m = load_preset(name).model
    assert (m.n_layer, m.n_embd, m.n_head, m.block_size) == (n_layer, n_embd, n_head, 1024)
    assert (m.vocab_size, m.padded_vocab_size, m.bias) == (50257, 50304, True)
    assert load_preset(name).data.tokenizer == "gpt2"


@pytest.mark.parametrize("name", ["default", "tiny"])
def test_small_presets_run_a_forward_pass(name):
    mcfg = dataclasses.replace(load_preset(name).model, vocab_size=65)
    graphdef, params = gpt.init_params(mcfg, jax.random.key(0))
    idx = jnp.arange(2 * 8).reshape(2, 8) % 65
    logits = jax.jit(gpt.forward, static_argnums=0)(graphdef, params, idx)
    assert logits.shape == (2, 8, 65) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


# --- Overrides ---------------------------------------------------------------------------------


def test_overrides_set_typed_values():
    cfg = load_config(["tiny", "--train.max_iters=5", "--n_layer", "3", "--bias=true",
                       "--progress=off", "--dropout=0.25", "--out_dir=runs/x", "--lr_decay_iters",
                       "7"])
    assert cfg.train.max_iters == 5 and type(cfg.train.max_iters) is int
    assert cfg.model.n_layer == 3 and type(cfg.model.n_layer) is int
    assert cfg.model.bias is True and cfg.train.progress is False
    assert cfg.model.dropout == 0.25
    assert cfg.train.out_dir == "runs/x" and cfg.train.lr_decay_iters == 7
    tiny = load_preset("tiny")
    assert cfg.model.n_embd == tiny.model.n_embd  # the rest comes from the preset
    assert load_config([]) == load_preset("default")


@pytest.mark.parametrize("text, value", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False),
])
def test_bool_parsing(text, value):
    assert load_config([f"--train.resume={text}"]).train.resume is value


def test_parse_overrides_finds_the_section():
    assert parse_overrides(["--train.max_iters=5", "--n_layer", "3", "--source=text"]) == {
        "train": {"max_iters": "5"}, "model": {"n_layer": "3"}, "data": {"source": "text"}}


def test_unknown_key_suggests_a_close_one():
    with pytest.raises(UserError, match="n_layr.*did you mean 'n_layer'"):
        load_config(["--n_layr=3"])
    with pytest.raises(UserError, match="model.n_layr.*did you mean 'n_layer'"):
        load_config(["--model.n_layr=3"])


def test_unknown_section_is_named():
    with pytest.raises(UserError, match="section 'modle'.*did you mean 'model'"):
        load_config(["--modle.n_layer=3"])


def test_ambiguous_key_asks_for_the_section(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Extra:
        n_layer: int = 1

    monkeypatch.setitem(config_module._SECTION_TYPES, "extra", Extra)
    with pytest.raises(UserError, match="ambiguous.*--model.n_layer.*--extra.n_layer"):
        parse_overrides(["--n_layer=3"])
    assert parse_overrides(["--model.n_layer=3"]) == {"model": {"n_layer": "3"}}


@pytest.mark.parametrize("arg, key", [
    ("--n_layer=three", "model.n_layer"), ("--n_layer=2.5", "model.n_layer"),
    ("--bias=maybe", "model.bias"), ("--learning_rate=fast", "train.learning_rate"),
])
def test_badly_typed_value_names_the_key(arg, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config([arg])


def test_malformed_command_lines():
    with pytest.raises(UserError, match="missing value for --n_layer"):
        load_config(["--n_layer"])
    with pytest.raises(UserError, match="unexpected argument 'extra'"):
        load_config(["tiny", "extra"])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError, match="unknown preset 'gtp2'") as info:
        load_config(["gtp2"])
    assert "did you mean 'gpt2'" in str(info.value)
    for name in presets():
        assert name in str(info.value)


def test_toml_file_with_an_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[model]\nn_layer = 2\nn_layers = 3\n")
    with pytest.raises(UserError) as info:
        load_config([str(path)])
    assert str(path) in str(info.value) and "model.n_layers" in str(info.value)
    assert "did you mean 'n_layer'" in str(info.value)


def test_toml_file_values_are_type_checked(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[model]\nn_layer = 2.5\n")
    with pytest.raises(UserError, match="model.n_layer"):
        load_config([str(path)])
    path.write_text("[train]\nresume = 1\n")
    with pytest.raises(UserError, match="train.resume"):
        load_config([str(path)])
    path.write_text("[train]\nlearning_rate = 1\nmax_iters = 7\n")  # an int is a fine float
    cfg = load_config([str(path)])
    assert cfg.train.learning_rate == 1.0 and type(cfg.train.learning_rate) is float
    assert cfg.train.max_iters == 7


def test_toml_file_problems(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config([str(tmp_path / "absent.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = 2\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config([str(bad)])
    flat = tmp_path / "flat.toml"
    flat.write_text("n_layer = 2\n")
    with pytest.raises(UserError, match="n_layer"):
        load_config([str(flat)])


@pytest.mark.parametrize("args, culprit", [
    (["--n_embd=30", "--n_head=4"], "n_embd"),
    (["--n_layer=0"], "n_layer"),
    (["--dropout=1.0"], "dropout"),
    (["--dtype=float64"], "dtype"),
    (["--batch_size=0"], "batch_size"),
    (["--source=web"], "source"),
    (["--tokenizer=bytes"], "tokenizer"),
    (["--val_fraction=0"], "val_fraction"),
    (["--eval_interval=0"], "eval_interval"),
    (["--ckpt_interval=0"], "ckpt_interval"),
    (["--eval_train=recent"], "eval_train"),
    (["--seed=-1"], "seed"),
    (["--learning_rate=nan"], "learning_rate"),
])
def test_invalid_values_are_rejected(args, culprit):
    with pytest.raises(UserError, match=culprit):
        load_config(args)


def test_toml_values_must_have_the_field_type(tmp_path):
    path = tmp_path / "typed.toml"
    path.write_text('[model]\nn_layer = "3"\n')
    with pytest.raises(UserError, match="model.n_layer"):
        load_config([str(path)])


def test_config_round_trips_through_a_dict():
    cfg = load_config(["small", "--n_layer=3", "--resume=true"])
    assert from_dict(cfg.to_dict()) == cfg
    assert apply(Config(), {}) == Config()
