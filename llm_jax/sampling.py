"""Generation with a key/value cache: prefill the prompt once, then decode one token per step.

Shapes: B batch (prompts, or prompts x beams), P padded prompt length, S cache slots
(= block_size), N decode steps per chunk, V vocabulary, L layers, H heads, K head dim.

Design choices:
- The cache is preallocated, (L, B, S, H, K) for keys and for values (`model.init_cache`), so
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
- Beam search (`beam_search`) keeps the K best partial sequences by summed log-probability;
  beams that emit end-of-text are set aside with score logp / length**length_penalty and the
  best finished or unfinished beam is returned. It runs the cached model on B*K rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import model as gpt
from llm_jax.errors import UserError


def choose_token(logits_BV, key, temperature, top_k: int = 0, top_p=1.0):
    """Pick the next token from float32 logits: greedy when temperature == 0, else sampled."""
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
    keep_BV = (before_BV < top_p) | (jnp.arange(sorted_BV.shape[-1]) == 0)
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    sampled_B = jax.random.categorical(key, logits_BV, axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _prefill(graphdef, params, idx_BP, mask_BP, key, temperature, top_k: int, top_p):
    B, P = idx_BP.shape
    cache = gpt.init_cache(gpt.merge(graphdef, params).cfg, B)
    S = cache["k"].shape[2]
    pos_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
    valid_BS = jnp.zeros((B, S), bool).at[:, :P].set(mask_BP.astype(bool))
    logits_BPV, cache = gpt.forward_cached(graphdef, params, idx_BP, pos_BP, 0, cache, valid_BS)
    token_B = choose_token(logits_BPV[:, -1], key, temperature, top_k, top_p)
    state = {"cache": cache, "valid": valid_BS, "token": token_B, "pos": pos_BP[:, -1] + 1,
             "slot": jnp.int32(P)}
    return token_B, state


@partial(jax.jit, static_argnames=("graphdef", "top_k", "steps"))
def _decode_chunk(graphdef, params, state, key, step0, temperature, top_k: int, top_p, steps: int):
    """`steps` decode steps in one scan: feed the last token, choose the next. -> (tokens NB, state)."""

    def step(state, i):
        slot = state["slot"]
        valid_BS = state["valid"].at[:, slot].set(True)
        logits_B1V, cache = gpt.forward_cached(graphdef, params, state["token"][:, None],
                                               state["pos"][:, None], slot, state["cache"],
                                               valid_BS)
        token_B = choose_token(logits_B1V[:, 0], jax.random.fold_in(key, step0 + i),
                               temperature, top_k, top_p)
        new = {"cache": cache, "valid": valid_BS, "token": token_B, "pos": state["pos"] + 1,
               "slot": slot + 1}
        return new, token_B

    state, tokens_NB = jax.lax.scan(step, state, jnp.arange(steps))
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
           stop_id: int | None = None, chunk: int = 16) -> Iterator[list[list[int]]]:
    """Generate for a batch of prompts; yield, per chunk, the new tokens of each row.

    A row stops after `stop_id` (included) or max_new_tokens; the generator ends when all have.
    """
    if not prompts or any(not p for p in prompts):
        raise UserError("the prompt is empty: give at least one token")
    S = params["wpe"]["embedding"].shape[0]  # block_size
    if S < 4:
        raise UserError("block_size must be at least 4 to generate with a cache")
    chunk = max(1, min(chunk, S // 4))  # a chunk always fits after a slide to S // 2
    rows = [list(p[-S:]) for p in prompts]
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    top_p = float(top_p)

    def take(tokens_NB) -> list[list[int]]:
        new = [[] for _ in prompts]
        for b in range(len(prompts)):
            for t in tokens_NB[:, b].tolist():
                if done[b]:
                    break
                new[b].append(t)
                rows[b].append(t)
                out[b].append(t)
                done[b] = t == stop_id or len(out[b]) >= max_new_tokens
        return new

    idx, mask = _pad_left(rows, S + 1 - max_new_tokens)  # no padding that would force a slide
    token_B, state = _prefill(graphdef, params, idx, mask, jax.random.fold_in(key, 0),
                              temperature, top_k, top_p)
    yield take(np.asarray(token_B)[None])
    slot, n = idx.shape[1], 1  # the next free cache slot; tokens chosen so far per row
    while not all(done):
        if slot == S:
            # Slide: prefill the last S // 2 - 1 tokens before the newest into a fresh cache,
            # then feed the newest one as usual (the prefill's own choice is not used).
            idx, mask = _pad_left([r[:-1][-(S // 2 - 1):] for r in rows], S - chunk)
            _, state = _prefill(graphdef, params, idx, mask, key, temperature, top_k, top_p)
            state["token"] = jnp.asarray([r[-1] for r in rows], jnp.int32)
            slot = idx.shape[1]
        steps = min(chunk, S - slot)  # a shorter last chunk before the cache is full
        tokens_NB, state = _decode_chunk(graphdef, params, state, key, n, temperature, top_k,
                                         top_p, steps=steps)
        slot, n = slot + steps, n + steps
        yield take(np.asarray(tokens_NB))


def generate(graphdef, params, prompt: list[int], *, max_new_tokens: int, key,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_id: int | None = None, chunk: int = 16) -> Iterator[int]:
    """Yield up to max_new_tokens token ids continuing `prompt` (stops after `stop_id`)."""
    for new in stream(graphdef, params, [prompt], max_new_tokens=max_new_tokens, key=key,
                      temperature=temperature, top_k=top_k, top_p=top_p, stop_id=stop_id,
                      chunk=chunk):
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


def generate_text(tokenizer, graphdef, params, prompts: list[str], *, stop: list[str] = (),
                  **kw) -> list[str]:
    """Text in, text out, for notebooks: each prompt's continuation, cut at a stop string."""
    ids = generate_batch(graphdef, params, [tokenizer.encode(p) for p in prompts],
                         stop_id=tokenizer.eot_id, **kw)
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


@partial(jax.jit, static_argnames=("graphdef",))
def _beam_prefill(graphdef, params, idx_BP):
    B, P = idx_BP.shape
    cache = gpt.init_cache(gpt.merge(graphdef, params).cfg, B)
    valid_BS = jnp.zeros((B, cache["k"].shape[2]), bool).at[:, :P].set(True)
    pos_BP = jnp.broadcast_to(jnp.arange(P), (B, P))
    logits_BPV, cache = gpt.forward_cached(graphdef, params, idx_BP, pos_BP, 0, cache, valid_BS)
    state = {"cache": cache, "valid": valid_BS, "pos": pos_BP[:, -1] + 1, "slot": jnp.int32(P)}
    return jax.nn.log_softmax(logits_BPV[:, -1]), state


@partial(jax.jit, static_argnames=("graphdef",))
def _beam_step(graphdef, params, state, parent_B, token_B):
    """Reorder the cache rows to the surviving beams' parents, feed their new tokens."""
    cache = jax.tree.map(lambda c: c[:, parent_B], state["cache"])
    slot = state["slot"]
    valid_BS = state["valid"][parent_B].at[:, slot].set(True)
    logits_B1V, cache = gpt.forward_cached(graphdef, params, token_B[:, None],
                                           state["pos"][parent_B][:, None], slot, cache,
                                           valid_BS)
    state = {"cache": cache, "valid": valid_BS, "pos": state["pos"][parent_B] + 1,
             "slot": slot + 1}
    return jax.nn.log_softmax(logits_B1V[:, 0]), state


def beam_search(graphdef, params, prompt: list[int], *, beam: int, max_new_tokens: int,
                length_penalty: float = 1.0, stop_id: int | None = None) -> list[int]:
    """The best continuation by logp / length**length_penalty among the beams kept.

    K = `beam` partial sequences survive each step (the K best by summed log-probability); a
    candidate ending in `stop_id` is set aside as finished (its length counts the stop token).
    At the end the unfinished beams join the finished ones and the best normalized score wins.
    """
    S = params["wpe"]["embedding"].shape[0]
    if not prompt or beam < 1:
        raise UserError("beam search needs a prompt and a beam width >= 1")
    prompt = list(prompt[-(S - max_new_tokens):]) if len(prompt) + max_new_tokens > S \
        else list(prompt)
    if len(prompt) + max_new_tokens > S:
        raise UserError(f"beam search needs prompt + new tokens <= block_size ({S})")
    logp_KV, state = _beam_prefill(graphdef, params, np.tile(np.int32(prompt), (beam, 1)))
    scores = np.full(beam, -np.inf)
    scores[0] = 0.0  # at first all rows hold the same prompt: count it once
    seqs: list[list[int]] = [[] for _ in range(beam)]
    finished: list[tuple[float, list[int]]] = []
    norm = lambda score, n: score / n ** length_penalty  # noqa: E731
    for t in range(max_new_tokens):
        logp_KV = np.asarray(logp_KV, np.float64)
        V = logp_KV.shape[1]
        total = (scores[:, None] + logp_KV).ravel()
        order = np.argsort(-total, kind="stable")[: 2 * beam]
        parents, tokens, new_scores = [], [], []
        for i in order:
            if not np.isfinite(total[i]):
                break
            k, v = divmod(int(i), V)
            if v == stop_id:
                finished.append((norm(total[i], t + 1), seqs[k] + [v]))
            elif len(parents) < beam:
                parents.append(k), tokens.append(v), new_scores.append(total[i])
            if len(parents) == beam:
                break
        if not parents or t == max_new_tokens - 1:
            finished += [(norm(s, t + 1), seqs[k] + [v])
                         for k, v, s in zip(parents, tokens, new_scores)]
            break
        pad = beam - len(parents)
        seqs = [seqs[k] + [v] for k, v in zip(parents, tokens)] + [[]] * pad
        scores = np.array(new_scores + [-np.inf] * pad)
        logp_KV, state = _beam_step(graphdef, params, state,
                                    np.int32(parents + [0] * pad), np.int32(tokens + [0] * pad))
    return max(finished, key=lambda f: f[0])[1]
