"""The encoder families' training resumes exactly: N steps straight equal k steps, a restore
from the checkpoint, and N - k more steps, to the bit (the masked LM: its batches are random
windows, random lengths and random masks, all of them a function of (seed, step))."""

import jax
import numpy as np

from llm_jax.config import load_config
from llm_jax.family_training import train_family


def test_resume_gives_the_run_that_would_have_happened(tmp_path, corpus_path, data_dir):
    args = ["mlm", "--max_iters=4", "--eval_interval=100", "--eval_iters=1", "--log_interval=2",
            "--progress=false", "--batch_size=4", "--warmup_iters=1", "--ckpt_interval=100",
            "--n_layer=1", "--n_embd=32", "--n_head=2", "--scan_unroll=1", "--block_size=32",
            "--dropout=0.1", "--lr_decay_iters=4", "--data.source=text",
            f"--data.path={corpus_path}", f"--data.data_dir={data_dir}"]
    straight = train_family(load_config([*args, f"--out_dir={tmp_path / 'a'}"]))
    train_family(load_config([*args, f"--out_dir={tmp_path / 'b'}", "--max_iters=2"]))
    resumed = train_family(load_config([*args, f"--out_dir={tmp_path / 'b'}", "--resume=true"]))
    assert resumed["start_step"] == 2
    for x, y in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(x, y)
    assert straight["final_loss"] == resumed["final_loss"]
