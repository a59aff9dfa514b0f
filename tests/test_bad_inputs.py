"""Every row of docs/robustness.md's table of bad inputs: the one-line message it gets, and
nothing on disk damaged (the files the command was pointed at hash the same afterwards)."""

import hashlib
import shutil
from pathlib import Path

import pytest

import sample as sample_py
import train as train_py
from llm_jax import training
from llm_jax.errors import UserError

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=2",
        "--max_iters=2", "--eval_iters=1", "--progress=false"]


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path (or of path itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def world(tmp_path_factory, run_config, corpus_path):
    """Files to feed the tools: good and bad texts, a trained run, a corrupted copy of it."""
    root = tmp_path_factory.mktemp("bad")
    (root / "ok.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.dat").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("café au lait, crème brûlée\n".encode("latin-1") * 40)
    (root / "bad.toml").write_text("[model]\nn_layer = \n")
    (root / "code.toml").write_text('[model]\nn_layer = __import__("os").system("touch x")\n')
    (root / "a_file").write_text("not a directory\n")
    shutil.copy(corpus_path, root / "corpus.txt")  # the run's text
    run = root / "run"
    training.train(run_config(run, max_iters=2, model={"n_layer": 1}))
    corrupt = root / "corrupt"
    shutil.copytree(run, corrupt)
    for blob in (corrupt / "ckpt").glob("*/params/ocdbt.process_0/d/*"):  # the params' data
        data = bytearray(blob.read_bytes())
        data[len(data) // 2:len(data) // 2 + 16] = b"\xff" * 16
        blob.write_bytes(bytes(data))
    return root


def text(world, name):
    return ["--data.source=text", f"--data.path={world / name}",
            f"--data.data_dir={world / 'data'}", f"--out_dir={world / 'out'}"]


# (input tried, command, what the message says, the paths that must not change)
ROWS = [
    ("missing data file", lambda w: ["train", *TINY, *text(w, "missing.txt")],
     r"data.path '.*missing.txt' does not exist", []),
    ("empty data file", lambda w: ["train", *TINY, *text(w, "empty.txt")],
     r"the corpus is empty: text file '.*empty.txt' has no text", ["empty.txt"]),
    ("binary data file", lambda w: ["train", *TINY, *text(w, "binary.dat")],
     r"'.*binary.dat' is not UTF-8 text \(invalid start byte at byte 128\)", ["binary.dat"]),
    ("non-UTF-8 (Latin-1) text", lambda w: ["train", *TINY, *text(w, "latin1.txt")],
     r"'.*latin1.txt' is not UTF-8 text \(invalid continuation byte at byte 3\)",
     ["latin1.txt"]),
    ("unknown preset", lambda w: ["train", "gpt3"], r"unknown preset 'gpt3' \(did you mean 'gpt2'\?\); presets: classify, default", []),
    ("unknown key", lambda w: ["train", "--n_layr=3"],
     r"unknown config key 'n_layr' \(did you mean 'n_layer'\?\)", []),
    ("wrong value type", lambda w: ["train", "--n_layer=two"],
     r"invalid value 'two' for model.n_layer: expected int", []),
    ("zero size", lambda w: ["train", "--n_layer=0"], r"model.n_layer must be at least 1, got 0",
     []),
    ("negative size", lambda w: ["train", "--batch_size=-4"],
     r"train.batch_size must be at least 1, got -4", []),
    ("n_embd not divisible by n_head", lambda w: ["train", "--n_embd=30", "--n_head=4"],
     r"model.n_embd=30 must be divisible by model.n_head=4", []),
    ("config file that is not TOML", lambda w: ["train", str(w / "bad.toml")],
     r"config file '.*bad.toml' is not valid TOML: Invalid value \(at line 2", ["bad.toml"]),
    ("config file with code in it", lambda w: ["train", str(w / "code.toml")],
     r"config file '.*code.toml' is not valid TOML", ["code.toml"]),
    ("out_dir is a file", lambda w: ["train", *TINY, *text(w, "ok.txt")[:3],
                                     f"--out_dir={w / 'a_file'}"],
     r"cannot write to out_dir '.*a_file'", ["a_file"]),
    ("a context longer than the model's", lambda w: [
        "train", *TINY, *text(w, "corpus.txt")[:3], f"--init_from={w / 'run'}", "--block_size=64",
        f"--out_dir={w / 'longer'}"],
     r"model.block_size=64 is longer than the context of init_from '.*run' \(16 positions\)",
     ["run"]),
    ("a checkpoint from another model", lambda w: [
        "train", *TINY, "--n_layer=3", "--vocab_multiple=64", *text(w, "corpus.txt")[:3],
        f"--out_dir={w / 'run'}",
        "--resume=true", "--max_iters=4"],
     r"checkpoint in '.*run' has model.n_layer=1, the config asks for 3", ["run"]),
    ("a corrupted checkpoint", lambda w: ["sample", "--out_dir", str(w / "corrupt"),
                                          "--max_new_tokens", "3"],
     r"checkpoint '.*corrupt.ckpt.2' is corrupted: params\['[a-z_]+'\]\S* does not read back "
     r"as it was written \(\d array\(s\) differ\)", ["corrupt"]),
    ("a missing run directory", lambda w: ["sample", "--out_dir", str(w / "nowhere")],
     r"checkpoint directory '.*nowhere' does not exist", []),
    ("characters outside a character vocabulary", lambda w: [
        "sample", "--out_dir", str(w / "run"), "--prompt", "the fox ☃", "--max_new_tokens", "3"],
     r"text has 1 character\(s\) outside the char vocabulary of \d+ \(built from the training "
     r"text\): '☃' \(U\+2603\)", ["run"]),
]


@pytest.mark.parametrize("name, argv, message, kept", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gets_a_one_line_message_and_nothing_is_damaged(world, name, argv, message,
                                                                  kept):
    before = {p: digest(world / p) for p in kept}
    script, *args = argv(world)
    with pytest.raises(UserError, match=message) as e:
        (train_py if script == "train" else sample_py).main(args)
    assert "\n" not in str(e.value)  # one line
    assert {p: digest(world / p) for p in kept} == before
    assert not (world / "x").exists()  # config text is data: nothing ran


def test_a_prompt_longer_than_the_context_keeps_its_end(world, capsys):
    before = digest(world / "run")
    sample_py.main(["--out_dir", str(world / "run"), "--prompt", "the lazy dog " * 10,
                    "--max_new_tokens", "3", "--temperature", "0"])
    err = capsys.readouterr().err
    assert "note: the prompt has 130 tokens; keeping the last 16 (the context length)" in err
    assert digest(world / "run") == before
