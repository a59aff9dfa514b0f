"""Hugging Face GPT-2 import and export against transformers' own outputs, and init_from.

The references in tests/fixtures/gpt2_{a,b}/ were computed by transformers' GPT2LMHeadModel
(tests/fixtures/make_hf_fixture.py regenerates them), so this file needs no torch; the one test
that loads our export into transformers is skipped where transformers is not installed.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llm_jax import hf
from llm_jax import model as gpt
from llm_jax.errors import UserError
from llm_jax.sampling import generate
from llm_jax.tokenizers import gpt2_tokenizer
from llm_jax.training import train

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NAMES = ["gpt2_a", "gpt2_b"]
TOLERANCE = 1e-4  # max |logit difference| in float32


def reference(name):
    return load_file(FIXTURES / name / "reference.safetensors")


def leaves(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_params(a, b):
    a, b = leaves(a), leaves(b)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def copy_model(name, tmp_path) -> Path:
    """A writable copy of a fixture model directory (config.json + model.safetensors)."""
    directory = tmp_path / name
    directory.mkdir()
    for file in (hf.CONFIG, hf.WEIGHTS):
        shutil.copy(FIXTURES / name / file, directory / file)
    return directory


def edit_config(directory, **changes):
    path = directory / hf.CONFIG
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


# --- Parity with transformers ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    ref = reference(name)
    cfg, params = hf.load_hf(FIXTURES / name)
    B, T = ref["input_ids"].shape
    assert (cfg.block_size, cfg.vocab_size) == (T, ref["logits"].shape[-1])
    assert params["wte"]["embedding"].shape == (cfg.padded_vocab_size, cfg.n_embd)
    assert cfg.padded_vocab_size > cfg.vocab_size  # the padding rows are in play
    logits = gpt.forward(gpt.abstract_params(cfg)[0], params, ref["input_ids"])
    diff = float(np.abs(np.asarray(logits) - ref["logits"]).max())
    print(f"{name}: max |logit diff| vs transformers {diff:.2e}")
    assert diff <= TOLERANCE
    assert float(np.abs(ref["logits"]).max()) > 1.0  # the logits are not all near zero


@pytest.mark.parametrize("name", NAMES)
def test_greedy_continuation_matches_transformers(name):
    ref = reference(name)
    cfg, params = hf.load_hf(FIXTURES / name)
    tokens = list(generate(gpt.abstract_params(cfg)[0], params, ref["prompt"].tolist(),
                           max_new_tokens=len(ref["greedy"]), key=jax.random.key(0),
                           temperature=0.0))
    assert tokens == ref["greedy"].tolist()
    assert len(set(tokens)) > 5  # not a degenerate repetition of one token


# --- Round trip and file layouts ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_import_export_import_is_identical(name, tmp_path):
    cfg, params = hf.load_hf(FIXTURES / name)
    hf.save_hf(tmp_path / "export", cfg, params)
    cfg2, params2 = hf.load_hf(tmp_path / "export")
    assert cfg2 == cfg
    assert_same_params(params, params2)
    # The export holds exactly what transformers' save_pretrained wrote: names and shapes.
    ours = load_file(tmp_path / "export" / hf.WEIGHTS)
    theirs = load_file(FIXTURES / name / hf.WEIGHTS)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(v.dtype == np.float32 for v in ours.values())
    for key, value in theirs.items():
        assert np.array_equal(ours[key], value.astype(np.float32)), key
    config = json.loads((tmp_path / "export" / hf.CONFIG).read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert config["n_positions"] == config["n_ctx"] == cfg.block_size
    assert config["eos_token_id"] is None  # a vocabulary without GPT-2's end-of-text id
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left behind


def test_bare_names_old_buffers_bf16_and_shards(tmp_path):
    """Files without the "transformer." prefix, with the causal-mask buffers of older
    transformers and a stored lm_head, in bfloat16, split in two shards with an index."""
    _, want = hf.load_hf(FIXTURES / "gpt2_a")
    tensors = load_file(FIXTURES / "gpt2_a" / hf.WEIGHTS)
    bare = {k.removeprefix("transformer."): v.astype(ml_dtypes.bfloat16)
            for k, v in tensors.items()}
    bare["lm_head.weight"] = bare["wte.weight"]
    for i in range(2):
        bare[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        bare[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    directory = tmp_path / "bare"
    directory.mkdir()
    shutil.copy(FIXTURES / "gpt2_a" / hf.CONFIG, directory / hf.CONFIG)
    names = sorted(bare)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: bare[k] for k in keys}, directory / file)
    (directory / hf.INDEX).write_text(json.dumps(
        {"weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    _, params = hf.load_hf(directory)
    for name, value in leaves(params).items():
        expected = leaves(want)[name].astype(ml_dtypes.bfloat16).astype(np.float32)
        assert value.dtype == np.float32 and np.array_equal(value, expected), name


def test_bias_free_model_exports_zero_biases(tmp_path):
    cfg = gpt.ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8,
                          bias=False)
    graphdef, params = gpt.init_params(cfg, jax.random.key(0))
    hf.save_hf(tmp_path / "export", cfg, params)
    cfg2, params2 = hf.load_hf(tmp_path / "export")
    assert cfg2.bias and cfg2 == dataclasses.replace(cfg, bias=True)
    assert not np.any(np.asarray(params2["h"]["mlp"]["c_fc"]["bias"]))
    idx = np.arange(16).reshape(2, 8) % 50
    np.testing.assert_allclose(gpt.forward(gpt.abstract_params(cfg2)[0], params2, idx),
                               gpt.forward(graphdef, params, idx), rtol=0, atol=1e-6)


def test_save_refuses_a_non_empty_directory_unless_asked(tmp_path):
    cfg, params = hf.load_hf(FIXTURES / "gpt2_a")
    (tmp_path / "empty").mkdir()
    hf.save_hf(tmp_path / "empty", cfg, params)  # an empty directory is fine
    (tmp_path / "empty" / "README.md").write_text("mine")
    with pytest.raises(UserError, match="is not empty"):
        hf.save_hf(tmp_path / "empty", cfg, params)
    hf.save_hf(tmp_path / "empty", cfg, params, overwrite=True)
    assert sorted(os.listdir(tmp_path / "empty")) == ["README.md", hf.CONFIG, hf.WEIGHTS]
    assert sorted(os.listdir(tmp_path)) == ["empty"]
    with pytest.raises(UserError, match="param wpe.embedding has shape"):
        hf.save_hf(tmp_path / "other", dataclasses.replace(cfg, block_size=64), params)


# --- Mistakes ----------------------------------------------------------------------------------


def drop_tensor(directory, name):
    tensors = load_file(directory / hf.WEIGHTS)
    del tensors[name]
    save_file(tensors, directory / hf.WEIGHTS)


def retype_tensor(directory, name):
    tensors = load_file(directory / hf.WEIGHTS)
    tensors[name] = tensors[name].astype(np.int32)
    save_file(tensors, directory / hf.WEIGHTS)


MISTAKES = {  # a change to a copy of gpt2_a -> what the message must name
    "no config": (lambda d: (d / hf.CONFIG).unlink(), ["config.json", "is missing"]),
    "no weights": (lambda d: (d / hf.WEIGHTS).unlink(), ["model.safetensors", "is missing"]),
    "torch only": (lambda d: (d / hf.WEIGHTS).rename(d / "pytorch_model.bin"),
                   ["model.safetensors", "pytorch_model.bin"]),
    "bad json": (lambda d: (d / hf.CONFIG).write_text("{"), ["config.json", "JSON"]),
    "not gpt2": (lambda d: edit_config(d, model_type="llama"), ["config.json", "model_type"]),
    "relu": (lambda d: edit_config(d, activation_function="relu"),
             ["config.json", "activation_function='relu'"]),
    "eps": (lambda d: edit_config(d, layer_norm_epsilon=1e-6),
            ["config.json", "layer_norm_epsilon"]),
    "untied": (lambda d: edit_config(d, tie_word_embeddings=False),
               ["config.json", "tie_word_embeddings"]),
    "heads": (lambda d: edit_config(d, n_head=3), ["config.json", "n_head=3"]),
    "context": (lambda d: edit_config(d, n_positions=64),
                ["model.safetensors", "'transformer.wpe.weight'", "(32, 64)", "(64, 64)"]),
    "width": (lambda d: edit_config(d, n_embd=32, n_head=4),
              ["model.safetensors", "'transformer.wte.weight'", "shape"]),
    "vocabulary": (lambda d: edit_config(d, vocab_size=501),
                   ["model.safetensors", "'transformer.wte.weight'", "(500, 64)"]),
    "layers": (lambda d: edit_config(d, n_layer=1),
               ["model.safetensors", "unexpected tensor 'transformer.h.1.", "n_layer=1"]),
    "missing tensor": (lambda d: drop_tensor(d, "transformer.h.1.mlp.c_fc.bias"),
                       ["model.safetensors", "'transformer.h.1.mlp.c_fc.bias' is missing"]),
    "dtype": (lambda d: retype_tensor(d, "transformer.ln_f.bias"),
              ["model.safetensors", "'transformer.ln_f.bias'", "dtype I32"]),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_are_named(mistake, tmp_path):
    change, words = MISTAKES[mistake]
    directory = copy_model("gpt2_a", tmp_path)
    change(directory)
    with pytest.raises(UserError) as e:
        hf.load_hf(directory)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        hf.load_hf(tmp_path / "nothing")
    with pytest.raises(UserError, match="never downloads"):
        hf.load_pretrained(tmp_path / "gpt2")


# --- transformers reads our export (only where transformers is installed) ----------------------


@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_our_export(name, tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch

    ref = reference(name)
    cfg, params = hf.load_hf(FIXTURES / name)
    ours = np.asarray(gpt.forward(gpt.abstract_params(cfg)[0], params, ref["input_ids"]))
    hf.save_hf(tmp_path / "export", cfg, params)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(ref["input_ids"]).long()).logits.float().numpy()
    assert float(np.abs(theirs - ours).max()) <= TOLERANCE


# --- init_from: fine-tuning and sampling -------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_vocab_dir(tmp_path_factory):
    """A tiny random model over GPT-2's 50257-token vocabulary, exported in HF layout."""
    cfg = gpt.ModelConfig(vocab_size=50257, n_layer=2, n_head=4, n_embd=32, block_size=16)
    _, params = gpt.init_params(cfg, jax.random.key(42))
    return hf.save_hf(tmp_path_factory.mktemp("hf") / "tiny-gpt2", cfg, params)


def with_train(config, **changes):
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))


def test_fine_tune_from_hf_weights_then_resume(gpt2_vocab_dir, run_config, tmp_path):
    _, source = hf.load_hf(gpt2_vocab_dir)
    # The run asks for another shape and dropout: the shape comes from the weights.
    config = run_config(tmp_path / "out", model=dict(n_layer=3, n_embd=48, dropout=0.1),
                        max_iters=3, learning_rate=1e-4, min_lr=1e-5, eval_interval=3)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer="gpt2"))
    summary = train(with_train(config, init_from=str(gpt2_vocab_dir)))
    assert summary["start_step"] == 0 and math.isfinite(summary["val_loss"])
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model"]["n_layer"] == 2 and saved["model"]["n_embd"] == 32
    assert saved["model"]["dropout"] == 0.1 and saved["model"]["vocab_size"] == 50257
    tuned, source = leaves(summary["params"]), leaves(source)
    changes = [np.abs(tuned[name] - source[name]).max() for name in source]
    assert 0 < max(changes) < 1e-3  # a few small steps away from the imported weights
    resumed = train(with_train(config, init_from=str(gpt2_vocab_dir), resume=True, max_iters=4))
    assert resumed["start_step"] == 3


def test_init_from_a_run_then_export_it(run_config, tmp_path):
    first = train(run_config(tmp_path / "a", max_iters=2, eval_interval=2))
    # learning rate 0: the params must stay exactly those of the first run's checkpoint.
    second = train(run_config(tmp_path / "b", model=dict(n_layer=1), max_iters=2,
                              eval_interval=2, learning_rate=0.0, min_lr=0.0,
                              init_from=str(tmp_path / "a")))
    assert_same_params(second["params"], first["params"])
    hf.main(["export", "--out_dir", str(tmp_path / "a"), "--to", str(tmp_path / "export")])
    cfg, exported = hf.load_hf(tmp_path / "export", vocab_multiple=64)
    # The padding rows of wte (never in the logits) are dropped on export, zeros on import.
    trained, exported = leaves(first["params"]), leaves(exported)
    V = cfg.vocab_size
    assert np.array_equal(exported["wte.embedding"][:V], trained["wte.embedding"][:V])
    assert not np.any(exported["wte.embedding"][V:])
    for name in trained.keys() - {"wte.embedding"}:
        assert np.array_equal(exported[name], trained[name]), name


def test_init_from_checks_the_vocabulary(gpt2_vocab_dir, run_config, tmp_path):
    config = run_config(tmp_path / "out", init_from=str(FIXTURES / "gpt2_a"))
    gpt2 = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer="gpt2"))
    with pytest.raises(UserError, match="vocabulary of 500 tokens, fewer than .*50257"):
        train(gpt2)
    with pytest.raises(UserError, match="GPT-2's vocabulary: set data.tokenizer=gpt2"):
        train(with_train(config, init_from=str(gpt2_vocab_dir)))  # char ids into GPT-2 weights
    # A char model with room for 50257 ids still reads them as characters, not GPT-2 tokens.
    char_run = run_config(tmp_path / "char-run", max_iters=1, eval_interval=1)
    train(dataclasses.replace(char_run, model=dataclasses.replace(char_run.model,
                                                                  vocab_size=50257)))
    with pytest.raises(UserError, match="trained with another tokenizer"):
        train(with_train(gpt2, init_from=str(tmp_path / "char-run")))


def test_sample_from_an_hf_directory(gpt2_vocab_dir, tmp_path):
    prompt = "Hello world"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--init_from", str(gpt2_vocab_dir),
         "--prompt", prompt, "--max_new_tokens", "8", "--temperature", "0"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    cfg, params = hf.load_hf(gpt2_vocab_dir)
    tokenizer = gpt2_tokenizer()
    ids = list(generate(gpt.abstract_params(cfg)[0], params, tokenizer.encode(prompt),
                        max_new_tokens=8, key=jax.random.key(0), temperature=0.0,
                        stop_id=tokenizer.eot_id))
    assert result.stdout == prompt + tokenizer.decode(ids) + "\n"
