"""Sampling from a trained model, one token at a time, streamed as it is produced.

Each new token is predicted from all the tokens before it (at most `block_size` of them), which
is why a language model writes one token at a time. This sampler keeps the context in a
fixed-size window of `block_size` tokens, so the jitted step compiles once whatever the prompt
length; when the text outgrows the context the window slides and the oldest tokens drop out.
Each step recomputes the whole window: simple and obviously correct, at O(block_size) work per
token.

Strategies: temperature (0 means greedy: always the most likely token) and top-k.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import model as gpt
from llm_jax.errors import UserError


def choose_token(logits_BV, key, temperature, top_k: int):
    """Pick the next token from float32 logits: greedy when temperature == 0, else sampled."""
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    sampled_B = jax.random.categorical(key, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _next_token(graphdef, params, window_BT, length, key, temperature, top_k: int):
    logits_BTV = gpt.forward(graphdef, params, window_BT)
    last_BV = jax.lax.dynamic_index_in_dim(logits_BTV, length - 1, axis=1, keepdims=False)
    return choose_token(last_BV, key, temperature, top_k)


def generate(graphdef, params, prompt: list[int], *, max_new_tokens: int, key,
             temperature: float = 1.0, top_k: int = 0, stop_id: int | None = None
             ) -> Iterator[int]:
    """Yield up to max_new_tokens token ids continuing `prompt` (stops after `stop_id`)."""
    if not prompt:
        raise UserError("the prompt is empty: give at least one token")
    T = params["wpe"]["embedding"].shape[0]  # the context length, block_size
    tokens = list(prompt)
    window = np.zeros((1, T), np.int32)
    for i in range(max_new_tokens):
        context = tokens[-T:]
        window[0, : len(context)] = context
        token = int(_next_token(graphdef, params, window, len(context), jax.random.fold_in(key, i),
                                temperature, top_k)[0])
        tokens.append(token)
        yield token
        if token == stop_id:
            return


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Turn a stream of ids into a stream of text pieces, never splitting a UTF-8 character."""
    generated: list[int] = []
    shown = ""
    for token in ids:
        generated.append(token)
        text = tokenizer.decode(generated)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            continue
        yield text[len(shown):]
        shown = text
    text = tokenizer.decode(generated)
    if text != shown:
        yield text[len(shown):]
