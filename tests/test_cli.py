"""train.py and sample.py as a user runs them: in a subprocess, from another directory.

Each run pays for a Python start, importing JAX and compiling, so there are few of them: one
training run is shared by every test that needs a checkpoint.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import WORDS

ROOT = Path(__file__).resolve().parent.parent
TRAIN, SAMPLE = str(ROOT / "train.py"), str(ROOT / "sample.py")
SEPARATOR = "\n\n---------------\n"  # what sample.py prints between two samples
TINY_ARGS = ["--n_layer=2", "--n_embd=32", "--n_head=4", "--block_size=16", "--batch_size=8",
             "--eval_iters=2", "--progress=false"]


def run(script, *args, cwd, stdin=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def data_args(corpus, data_dir):
    return ["--data.source=text", f"--data.path={corpus}", f"--data.data_dir={data_dir}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_path):
    """A char model trained by train.py for 20 steps: (its out_dir, the arguments used)."""
    cwd = tmp_path_factory.mktemp("cli")
    args = [*data_args(corpus_path, cwd / "data"), f"--out_dir={cwd / 'out'}", *TINY_ARGS,
            "--max_iters=20", "--eval_interval=10", "--log_interval=10"]
    result = run(TRAIN, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "out", args


def samples(stdout: str) -> list[str]:
    assert stdout.endswith("\n")
    return stdout[:-1].split(SEPARATOR)


# --- The happy path ----------------------------------------------------------------------------


def test_train_leaves_checkpoints_and_logs(trained):
    out_dir, _ = trained
    assert (out_dir / "ckpt" / "20" / "meta").is_dir()
    assert (out_dir / "best").is_dir() and any((out_dir / "best").iterdir())
    assert (out_dir / "config.json").is_file()
    assert '"step": 20' in (out_dir / "metrics.jsonl").read_text()


def test_sample_continues_the_prompt_reproducibly(trained, tmp_path):
    out_dir, _ = trained
    args = ["--out_dir", out_dir, "--max_new_tokens", 30, "--seed", 1, "--num_samples", 2]
    first = run(SAMPLE, *args, "--prompt", "The ", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    texts = samples(first.stdout)
    assert len(texts) == 2
    for text in texts:
        assert text.startswith("The ") and len(text) == len("The ") + 30, repr(text)
    assert texts[0] != texts[1]  # sample i draws from its own key

    from_stdin = run(SAMPLE, *args, "--prompt", "-", cwd=tmp_path, stdin="The ")
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == first.stdout  # same seed, same prompt: the same text


def test_temperature_zero_is_greedy_from_the_default_prompt(trained, tmp_path):
    out_dir, _ = trained
    greedy = run(SAMPLE, "--out_dir", out_dir, "--max_new_tokens", 30, "--temperature", 0,
                 "--num_samples", 2, cwd=tmp_path)
    assert greedy.returncode == 0, greedy.stderr
    first, second = samples(greedy.stdout)
    assert first == second  # different keys, yet the same text: no sampling at temperature 0
    assert first.startswith("\n") and len(first) == 1 + 30  # a char model starts from a newline


# --- Mistakes: exit status 2, one line naming the culprit, no traceback -------------------------


def assert_user_error(result, *culprits):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for culprit in culprits:
        assert culprit in lines[0], lines[0]


def test_missing_data_file(tmp_path):
    result = run(TRAIN, "--data.source=text", "--data.path=/nonexistent", *TINY_ARGS,
                 cwd=tmp_path)
    assert_user_error(result, "/nonexistent")


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run(TRAIN, *data_args(empty, tmp_path / "data"), *TINY_ARGS, cwd=tmp_path)
    assert_user_error(result, "empty", str(empty))


def test_unknown_config_key(tmp_path):
    assert_user_error(run(TRAIN, "--n_layr=3", cwd=tmp_path), "n_layr", "n_layer")


def test_unknown_preset(tmp_path):
    assert_user_error(run(TRAIN, "nosuchpreset", cwd=tmp_path), "nosuchpreset", "tiny")


def test_sample_from_a_missing_run_directory(tmp_path):
    result = run(SAMPLE, "--out_dir", tmp_path / "missing", cwd=tmp_path)
    assert_user_error(result, str(tmp_path / "missing"))


def test_resume_with_another_model_shape(trained, tmp_path):
    out_dir, args = trained
    before = sorted(p.name for p in (out_dir / "ckpt").iterdir())
    result = run(TRAIN, *args, "--resume=true", "--model.n_layer=3", cwd=tmp_path)
    assert_user_error(result, "n_layer", str(out_dir))
    assert sorted(p.name for p in (out_dir / "ckpt").iterdir()) == before


def test_prompt_outside_the_char_vocabulary(trained, tmp_path):
    out_dir, _ = trained
    result = run(SAMPLE, "--out_dir", out_dir, "--prompt", "héllo€", cwd=tmp_path)
    assert_user_error(result, "'é' (U+00E9)", "'€' (U+20AC)")


# --- Fine-tuning and chat ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tuned(trained, tmp_path_factory):
    """The trained char model fine-tuned by `train.py sft` on a JSON Lines file for 10 steps."""
    out_dir, args = trained
    cwd = tmp_path_factory.mktemp("sft")
    words = sorted({w for w in WORDS if w.isalpha() and len(w) <= 5})  # 4 + 2 * 5 <= 16 + 1
    chat = cwd / "chat.jsonl"
    chat.write_text("".join(f'{{"prompt": "{w}", "response": "{w[::-1]}"}}\n' for w in words * 2))
    result = run(TRAIN, "sft", f"--init_from={out_dir}", f"--out_dir={cwd / 'sft'}",
                 "--block_size=16", "--data.source=jsonl", f"--data.path={chat}",
                 "--val_fraction=0.3",
                 f"--data.data_dir={cwd / 'data'}", "--max_iters=10", "--eval_interval=10",
                 "--log_interval=5", "--batch_size=4", "--eval_iters=2", "--progress=false",
                 "--freeze=wte,h.0", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "loss on answers only" in result.stdout and "freezing 'wte,h.0'" in result.stdout
    return cwd / "sft", chat


def test_chat_replies_to_each_line_of_stdin(fine_tuned, tmp_path):
    sft_dir, _ = fine_tuned
    result = run(SAMPLE, "--out_dir", sft_dir, "--chat", "--temperature", 0,
                 "--max_new_tokens", 4, cwd=tmp_path, stdin="dog\nhé\ncat\n")
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("\n")
    assert len(replies) >= 3 and replies[-1] == ""  # a line per reply (a reply may hold "\n")
    assert all(len(r) <= 4 for r in replies)
    assert "'é' (U+00E9)" in result.stderr  # a turn the vocabulary cannot encode is skipped


def test_sft_eval_scores_the_fine_tuned_and_the_pretrained_model(fine_tuned, trained, tmp_path):
    sft_dir, chat = fine_tuned
    result = run("-m", "llm_jax.sft", "eval", "--out_dir", sft_dir, "--n", 4, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert re.search(r"held-out accuracy: \d+\.\d% \(\d/4 exact matches", result.stdout), \
        result.stdout
    out_dir, _ = trained
    result = run("-m", "llm_jax.sft", "eval", "--out_dir", out_dir, "--source", "jsonl",
                 "--path", chat, "--val_fraction", 0.3, "--n", 4, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "has no chat tokens" in result.stdout and "held-out accuracy:" in result.stdout


def test_chat_needs_a_fine_tuned_model(trained, tmp_path):
    out_dir, _ = trained
    result = run(SAMPLE, "--out_dir", out_dir, "--chat", cwd=tmp_path, stdin="hi\n")
    assert_user_error(result, "chat tokens", str(out_dir))


def test_bad_jsonl_line_is_named(trained, tmp_path):
    out_dir, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "no response"}\n')
    result = run(TRAIN, "sft", f"--init_from={out_dir}", f"--out_dir={tmp_path / 'o'}",
                 "--data.source=jsonl", f"--data.path={bad}", cwd=tmp_path)
    assert_user_error(result, str(bad), "line 2")
