"""Train a GPT, or a masked LM, classifier or encoder-decoder (model.family).

    python train.py                          # the default small character model, built-in corpus
    python train.py shakespeare_char         # a preset from configs/ (or a path to a .toml file)
    python train.py --max_iters=200 --model.n_layer=2 --train.out_dir=out/try
    python train.py --resume=true            # continue the run in out_dir
    python train.py mlm                      # BERT-style masked LM (configs/mlm.toml)
    python train.py classify                 # a classifier fine-tuned from out/mlm
    python train.py seq2seq                  # an encoder-decoder on a built-in task

Overrides are --section.key=value, or --key=value when the key name is unique; see
llm_jax/config.py for every key.
"""

from llm_jax import compile_cache, cpu
from llm_jax.cli import run_main
from llm_jax.config import load_config
from llm_jax.training import train


def main(argv: list[str]) -> None:
    config = load_config(argv)
    t = config.train
    cpu.retain_freed_memory()
    if config.model.family == "gpt" and not t.coordinator:  # before JAX starts its backend
        cpu.configure(cpu.devices_for(t.cpu_devices, t.batch_size, config.model.n_embd))
    compile_cache.enable()  # a second run skips XLA's compile ($LLM_JAX_CACHE_DIR=off: not)
    if config.model.family == "gpt":
        summary = train(config)
    else:
        from llm_jax.family_training import train_family

        summary = train_family(config)
    if "stopped_at" in summary:  # SIGINT/SIGTERM: a checkpoint was written, exit 0
        print(f"stopped at step {summary['stopped_at']} of {summary['steps']}; continue with "
              f"python train.py ... --resume=true (checkpoints in {summary['out_dir']})")
        return
    print(f"done: {summary['steps']} steps, val loss {summary.get('val_loss', float('nan')):.4f}; "
          f"checkpoints in {summary['out_dir']}")


if __name__ == "__main__":
    run_main(main)
