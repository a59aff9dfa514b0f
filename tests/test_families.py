"""train.py end to end for the masked LM, the classifier fine-tuned from it and the
encoder-decoder, then the commands that use their runs. In-process, tiny shapes, a few steps."""

import dataclasses
import json

import pytest

import train as train_py
from llm_jax import encoder, seq2seq
from llm_jax.config import load_preset
from llm_jax.errors import UserError
from llm_jax.family_training import abstract_params
from llm_jax.inference import load_model


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_py_runs_every_family(tmp_path, corpus_path, data_dir, capsys):
    common = ["--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--log_interval=2",
              "--progress=false", "--batch_size=4", "--warmup_iters=1", "--ckpt_interval=100"]
    corpus = ["--data.source=text", f"--data.path={corpus_path}", f"--data.data_dir={data_dir}"]
    small = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--scan_unroll=1", "--block_size=64"]
    mlm, cls = tmp_path / "mlm", tmp_path / "cls"
    train_py.main(["mlm", f"--out_dir={mlm}", *common, *corpus, *small])
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(records(mlm)[-2])
    assert json.loads((mlm / "config.json").read_text())["model"]["vocab_size"] > 4

    # The classifier takes its shape and encoder from the MLM run, whatever the preset says.
    train_py.main(["classify", f"--out_dir={cls}", f"--init_from={mlm}", *common, *corpus])
    saved = json.loads((cls / "config.json").read_text())["model"]
    assert (saved["family"], saved["n_layer"], saved["n_embd"], saved["n_class"]) == (
        "classifier", 1, 32, 2)
    assert "test_accuracy" in records(cls)[-2]
    out = capsys.readouterr().out
    assert "encoder from" in out and "test accuracy" in out

    s2s = tmp_path / "s2s"
    train_py.main(["seq2seq", "--task=reverse", *small[:4], "--block_size=16", "--n_dec_layer=1",
                   f"--out_dir={s2s}", *common])
    assert "test_exact_match" in records(s2s)[-2]

    # The commands read the runs back.
    encoder.main(["fill", "--out_dir", str(mlm), "--top", "2", "the [MASK] __ dog"])  # BPE
    encoder.main(["classify", "--out_dir", str(cls), "the quick brown fox jumps"])
    seq2seq.main(["decode", "--out_dir", str(s2s), "abc"])
    out = capsys.readouterr().out
    assert "blank 2:" in out and "filled: the " in out
    assert "real" in out and "shuffled" in out and "abc -> " in out
    with pytest.raises(UserError, match="needs a seq2seq run"):
        seq2seq.main(["decode", "--out_dir", str(mlm), "abc"])
    with pytest.raises(UserError, match="mlm model.*python -m llm_jax.encoder fill"):
        load_model(str(mlm))  # what sample.py does with a run directory
    with pytest.raises(UserError, match="already holds checkpoints"):
        train_py.main(["mlm", f"--out_dir={mlm}", *common, *corpus, *small])


@pytest.mark.parametrize("name, family", [("mlm", "mlm"), ("classify", "classifier"),
                                          ("seq2seq", "seq2seq")])
def test_family_presets_build_their_models(name, family):
    cfg = load_preset(name).model
    assert cfg.family == family
    cfg = dataclasses.replace(cfg, vocab_size=100, n_class=2)
    _, abstract = abstract_params(cfg)  # shapes only
    L, D = cfg.n_layer, cfg.n_embd
    body = abstract["encoder"]
    assert body["h"]["attn"]["c_attn"]["kernel"].shape == (L, D, 3 * D)
    assert body["wte"]["embedding"].shape == (cfg.padded_vocab_size, D)
    if family == "seq2seq":
        n_dec = cfg.n_dec_layer or L
        assert abstract["decoder"]["h"]["cross"]["c_kv"]["kernel"].shape == (n_dec, D, 2 * D)
