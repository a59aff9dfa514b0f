"""Generation with a key/value cache: prefill the prompt once, then decode one token per step.

Shapes: B batch (prompts, or prompts x beams), P padded prompt length, S cache slots
(= block_size), N decode steps per chunk, V vocabulary, L layers, H heads, K head dim.

Design choices:
- The cache is preallocated, S = block_size slots per row (`model.init_cache`), so
  every step has the same shapes and compiles once. Prompts of different lengths are
  left-padded to one length P (rounded up to a power of two, so few prefill shapes compile); a
  (B, S) mask of valid slots hides the padding and position ids count real tokens only, so a
  padded row computes exactly what it would alone.
- Decoding runs in chunks: one jitted `jax.lax.scan` of N steps (default 16) returns N tokens
  per row and the updated cache; a Python generator calls it and yields tokens chunk by chunk.
  A Python loop over a jitted single step pays a dispatch and a host sync per token; a single
  `while_loop` over all steps would not stream. Chunks keep the dispatch cost per N tokens while
  still streaming (a few tens of milliseconds of latency per chunk on CPU). The time to the first
  token is the prefill alone: its token is yielded before the first chunk runs.
- One chunk of look-ahead: the next chunk is queued (JAX dispatches asynchronously) before the
  host reads this one's tokens, so the device never waits for the dispatch (about 1.5 ms a
  chunk of the "small" shape), the stop tests or the caller's printing. Measured with a caller
  that spends 20 ms on each chunk: 117 -> 156 tokens/s at batch 1. The cost: when rows stop
  early, one chunk is computed for nothing.
- Each chunk attends to a prefix of the cache only: the smallest power of two of slots (at
  least 64) that holds the chunk's last token (`attention_window`). Later slots are invisible
  anyway, so this changes no result, only the bytes read: a step otherwise reads every slot of
  every row, most of its memory traffic at batch 64 (measured: batch 64 from about 600 to about
  800 tokens/s on the "small" shape). A cache of S slots compiles at most log2(S / 64) + 1
  chunk variants.
- A chunk draws the sampling noise of all its steps before the scan (`gumbel_noise`, bit for
  bit what `jax.random.categorical` would draw from the same keys): one random-bits loop per
  chunk instead of one per step.
- Rows that have finished (end-of-text, stop string, max tokens) keep computing until the chunk
  ends; the host drops what they produce. Stops are checked on the host between chunks.
- Context limit: once all block_size slots are used, the last block_size // 2 tokens of every
  row are prefilled again into a fresh cache (a sliding window that moves by half a block at a
  time), so generation never stops for length; each slide costs one prefill, and afterwards the
  model sees between block_size // 2 and block_size tokens of context. Within block_size the
  result equals recomputing the full context at each step (the last chunk before a full cache
  is shortened to fit, and prompt padding never takes slots that the new tokens need).
- Token choice (`choose_token`): temperature 0 is greedy; otherwise logits / T, then top-k,
  then top-p (the smallest set of most likely tokens whose probability reaches p), then a draw.
  Keys are folded with the step index, so results depend on the seed, not on the chunk size.
- Beam search over the same cache lives in llm_jax/beam.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import model as gpt
from llm_jax.errors import UserError


def choose_token(logits_BV, key, temperature, top_k: int = 0, top_p: float = 1.0,
                 gumbel_BV=None):
    """Pick the next token from float32 logits: greedy when temperature == 0, else sampled.

    top_k and top_p are static (Python numbers): a filter that keeps everything is not built.
    The draw is argmax(logits + Gumbel noise), as `jax.random.categorical(key, ...)`; a caller
    that drew the noise already (`gumbel_noise`, a whole decode chunk at once) passes it as
    gumbel_BV instead of a key, with the same result.
    """
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    V = logits_BV.shape[-1]
    logits_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    if 0 < top_k < V:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
        keep_BV = (before_BV < top_p) | (jnp.arange(V) == 0)
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    if gumbel_BV is None:
        gumbel_BV = jax.random.gumbel(key, logits_BV.shape, logits_BV.dtype)
    sampled_B = jnp.argmax(logits_BV + gumbel_BV, axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def gumbel_noise(key, step0, steps: int, shape) -> jax.Array:
    """The Gumbel noise of `steps` consecutive draws, (steps, *shape): draw i uses
    fold_in(key, step0 + i), exactly the noise `choose_token` would draw from that key.

    One random-bits computation for the whole chunk instead of one per step: on CPU each is a
    small loop of its own (about 3 % of a batch-1 decode step)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, step0 + i))(jnp.arange(steps))
    return jax.vmap(lambda k: jax.random.gumbel(k, shape, jnp.float32))(keys)


def attention_window(slot_end: int, slots: int) -> int:
    """How many cache slots a decode chunk ending before slot `slot_end` attends to: the
    smallest power of two >= slot_end (at least 64), at most the cache's `slots`.

    Slots beyond the chunk's last one are never visible, so reading only a prefix of the
    cache changes nothing but the memory traffic (the whole cache per row and step otherwise;
    most of a step's bytes at batch 64). Powers of two keep the compiled variants few."""
    return min(slots, max(64, 1 << (slot_end - 1).bit_length()))


_split_layers = jax.jit(gpt.split_layers)


@partial(jax.jit, static_argnames=("graphdef", "top_k", "top_p"))
def _prefill(graphdef, params, layers, idx_BP, mask_BP, key, temperature, top_k: int, top_p):
    B, P = idx_BP.shape
    cache = gpt.init_cache(gpt.merge(graphdef, params).cfg, B)
    S = cache["v"].shape[3]
    pos_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
    valid_BS = jnp.zeros((B, S), bool).at[:, :P].set(mask_BP.astype(bool))
    logits_BPV, cache = gpt.forward_cached(graphdef, params, idx_BP, pos_BP, 0, cache, valid_BS,
                                           layers)
    token_B = choose_token(logits_BPV[:, -1], key, temperature, top_k, top_p)
    state = {"cache": cache, "valid": valid_BS, "token": token_B, "pos": pos_BP[:, -1] + 1,
             "slot": jnp.int32(P)}
    return token_B, state


@partial(jax.jit, static_argnames=("graphdef", "top_k", "top_p", "steps", "window"),
         donate_argnames=("state",))
def _decode_chunk(graphdef, params, layers, state, key, step0, temperature, top_k: int, top_p,
                  steps: int, window: int):
    """`steps` decode steps in one scan: feed the last token, choose the next, attending to
    the first `window` cache slots (`attention_window`).

    -> (tokens (N, B), state); the state passed in is donated."""
    B = state["token"].shape[0]
    V = gpt.merge(graphdef, params).cfg.vocab_size
    noise_NBV = gumbel_noise(key, step0, steps, (B, V))

    def step(state, noise_BV):
        slot = state["slot"]
        valid_BS = state["valid"].at[:, slot].set(True)
        logits_B1V, cache = gpt.forward_cached(graphdef, params, state["token"][:, None],
                                               state["pos"][:, None], slot, state["cache"],
                                               valid_BS, layers, window=window)
        token_B = choose_token(logits_B1V[:, 0], None, temperature, top_k, top_p, noise_BV)
        new = {"cache": cache, "valid": valid_BS, "token": token_B, "pos": state["pos"] + 1,
               "slot": slot + 1}
        return new, token_B

    state, tokens_NB = jax.lax.scan(step, state, noise_NBV)
    return tokens_NB, state


def _pad_left(rows: list[list[int]], cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad to one length: a power of two (few prefill shapes to compile), at most cap."""
    P = max(len(r) for r in rows)
    P = max(P, min(cap, max(8, 1 << (P - 1).bit_length())))
    idx, mask = np.zeros((len(rows), P), np.int32), np.zeros((len(rows), P), np.int32)
    for b, r in enumerate(rows):
        idx[b, P - len(r):], mask[b, P - len(r):] = r, 1
    return idx, mask


def stream(graphdef, params, prompts: list[list[int]], *, max_new_tokens: int, key,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           stop_id: int | None = None, stop: Callable[[list[int]], bool] | None = None,
           chunk: int = 16) -> Iterator[list[list[int]]]:
    """Generate for a batch of prompts; yield, per chunk, the new tokens of each row.

    A row stops after `stop_id` (included), after max_new_tokens, or once `stop(new_tokens)`
    is true (checked after every token on the host, e.g. "the decoded text holds a stop
    string"); the generator ends when all rows have stopped.
    """
    if not prompts or any(not p for p in prompts):
        raise UserError("the prompt is empty: give at least one token")
    S = gpt.merge(graphdef, params).cfg.block_size
    if S < 4:
        raise UserError("block_size must be at least 4 to generate with a cache")
    chunk = max(1, min(chunk, S // 4))  # a chunk always fits after a slide to S // 2
    rows = [list(p[-S:]) for p in prompts]
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    top_k, top_p = int(top_k), float(top_p)
    layers = _split_layers(params)  # once per call: every decode step reads these

    def take(tokens_NB) -> list[list[int]]:
        new = [[] for _ in prompts]
        for b in range(len(prompts)):
            for t in tokens_NB[:, b].tolist():
                if done[b]:
                    break
                new[b].append(t)
                rows[b].append(t)
                out[b].append(t)
                done[b] = (t == stop_id or len(out[b]) >= max_new_tokens
                           or (stop is not None and stop(out[b])))
        return new

    def launch(state, slot: int, n: int):
        """Queue the next chunk (JAX dispatches asynchronously) -> (tokens, state, slot, n)."""
        steps = min(chunk, S - slot)  # a shorter last chunk before the cache is full
        tokens_NB, state = _decode_chunk(graphdef, params, layers, state, key, n, temperature,
                                         top_k, top_p, steps=steps,
                                         window=attention_window(slot + steps, S))
        return tokens_NB, state, slot + steps, n + steps

    def launch_ahead(state, slot: int, n: int):
        """`launch`, unless no chunk can be needed yet: not past max_new_tokens (every row
        stops there), nor across a slide (it needs the host's tokens) -> None."""
        return launch(state, slot, n) if n < max_new_tokens and slot < S else None

    idx, mask = _pad_left(rows, S + 1 - max_new_tokens)  # no padding that would force a slide
    token_B, state = _prefill(graphdef, params, layers, idx, mask, jax.random.fold_in(key, 0),
                              temperature, top_k, top_p)
    slot, n = idx.shape[1], 1  # the next free cache slot; tokens chosen so far per row
    # One chunk ahead: the next chunk is queued before this one's tokens are read, so the
    # device never waits on the host (dispatch, stop tests, the caller's printing).
    ahead = launch_ahead(state, slot, n)
    yield take(np.asarray(token_B)[None])
    while not all(done):
        if ahead is None:
            if slot == S:
                # Slide: prefill the last S // 2 - 1 tokens before the newest into a fresh
                # cache, then feed the newest one as usual (the prefill's own choice is unused).
                idx, mask = _pad_left([r[:-1][-(S // 2 - 1):] for r in rows], S - chunk)
                _, state = _prefill(graphdef, params, layers, idx, mask, key, temperature,
                                    top_k, top_p)
                state["token"] = jnp.asarray([r[-1] for r in rows], jnp.int32)
                slot = idx.shape[1]
            ahead = launch(state, slot, n)
        tokens_NB, state, slot, n = ahead
        ahead = launch_ahead(state, slot, n)
        yield take(np.asarray(tokens_NB))


def generate(graphdef, params, prompt: list[int], *, max_new_tokens: int, key,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_id: int | None = None, stop: Callable[[list[int]], bool] | None = None,
             chunk: int = 16) -> Iterator[int]:
    """Yield up to max_new_tokens token ids continuing `prompt` (see `stream` for stops)."""
    for new in stream(graphdef, params, [prompt], max_new_tokens=max_new_tokens, key=key,
                      temperature=temperature, top_k=top_k, top_p=top_p, stop_id=stop_id,
                      stop=stop, chunk=chunk):
        yield from new[0]


def generate_batch(graphdef, params, prompts: list[list[int]], **kw) -> list[list[int]]:
    """All rows' new tokens at once (see `stream` for the options)."""
    out = [[] for _ in prompts]
    for new in stream(graphdef, params, prompts, **kw):
        for b, t in enumerate(new):
            out[b] += t
    return out


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut text before the first stop string; says whether one was found."""
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def stop_strings(tokenizer, stops: list[str]) -> Callable[[list[int]], bool] | None:
    """A `stop` test for `stream`: true once the decoded tokens contain one of `stops`."""
    stops = [t for t in stops if t]
    if not stops:
        return None
    return lambda ids: any(t in tokenizer.decode(ids) for t in stops)


def generate_text(tokenizer, graphdef, params, prompts: list[str], *, stop: list[str] = (),
                  **kw) -> list[str]:
    """Text in, text out, for notebooks: each prompt's continuation, cut before a stop string.

    Keyword arguments as `stream` (max_new_tokens, key, temperature, top_k, top_p, chunk);
    generation ends at the tokenizer's end-of-text token or when a stop string appears.
    """
    ids = generate_batch(graphdef, params, [tokenizer.encode(p) for p in prompts],
                         stop_id=tokenizer.eot_id, stop=stop_strings(tokenizer, list(stop)), **kw)
    return [cut_at_stop(tokenizer.decode(i), list(stop))[0] for i in ids]


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
