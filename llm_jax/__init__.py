"""llm_jax: GPT-family language models in functional JAX (Flax NNX, optax, orbax, tiktoken).

The modules, by concern: config (run configuration), tokenizers, data (corpus, preparation,
batches), model (GPT-2), loss, optim, step (train/eval steps), checkpoint, training (the run),
sampling (generation), inference (loading a trained model).
"""

__version__ = "0.1.0"
