"""Shared test fixtures: the tiny model shape, a small deterministic corpus, run configs over it.

Everything runs on CPU in seconds: the model is 2 layers of width 32 over a context of 16, and
the corpus is a few kilobytes of text generated from a fixed seed (ASCII only, so that a char
vocabulary built from it lacks accented letters).
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest

from llm_jax.config import Config, DataConfig, TrainConfig
from llm_jax.model import ModelConfig

# No persistent compilation cache in the user's home from tests (nor from the scripts they run).
os.environ["LLM_JAX_CACHE_DIR"] = "off"

TINY = ModelConfig(vocab_size=65, n_layer=2, n_embd=32, n_head=4, block_size=16)

WORDS = ("the a one every quick brown lazy old young red green fox dog cat bird horse king queen "
         "river forest garden city jumps runs sleeps sings reads writes sees finds loves keeps "
         "over under near beside with without and but or while then because slowly quietly "
         "loudly bravely today tomorrow yesterday 1 2 3 42 100").split()


def make_corpus(n_chars: int = 8000, seed: int = 0) -> str:
    """Sentences of random words: varied enough to learn a little from, identical every run."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_chars:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        end = rng.choice(".!?;,:")
        line = " ".join(words).capitalize() + end
        if rng.random() < 0.2:
            line = f'"{line}" said the {rng.choice(WORDS)}.'
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Prepared token files, shared by every run on the corpus (prepare() reuses them)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def run_config(corpus_path, data_dir):
    """run_config(out_dir, model=..., **train_fields) -> a Config training TINY on the corpus."""

    def make(out_dir, model: dict | None = None, **train) -> Config:
        fields = dict(out_dir=str(out_dir), batch_size=8, max_iters=20, learning_rate=3e-3,
                      min_lr=3e-4, warmup_iters=5, eval_interval=10, eval_iters=4,
                      log_interval=5, ckpt_interval=1000, progress=False)
        fields.update(train)
        mcfg = dataclasses.replace(TINY, vocab_size=0, **(model or {}))  # 0: from the tokenizer
        return Config(model=mcfg,
                      data=DataConfig(source="text", path=str(corpus_path), tokenizer="char",
                                      data_dir=str(data_dir)),
                      train=TrainConfig(**fields))

    return make
