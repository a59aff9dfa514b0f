"""Beam search: keep the K best partial sequences, over any model with a per-row cache.

Shapes: B batch, K beams, R = B * K rows, P padded prompt length, V vocabulary.

Beam search (`beam_search`) keeps the K best partial sequences by summed log-probability; beams
that emit end-of-text are set aside with score logp / length**length_penalty and the best
finished or unfinished beam is returned. `beam_loop` is the search itself, all steps in one
`lax.while_loop`, over a `feed` function that runs a model's next tokens: the GPT with its
key/value cache here (`_beam_search`), the encoder-decoder in llm_jax/seq2seq.py.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import model as gpt
from llm_jax.errors import UserError
from llm_jax.sampling import _pad_left, _split_layers


def beam_loop(feed, logits_RV, state, *, batch: int, beam: int, steps: int, stop_id,
              length_penalty):
    """Beam search over any model with per-row state, all `steps` in one `lax.while_loop`.

    Rows are batch-major: R = batch * beam, item b's beams at b*K ... b*K + K-1. logits_RV:
    the next-token logits of every row (at first the K rows of an item are copies, and only
    beam 0 is alive, so no sequence repeats). feed(state, rows_R, tokens_R, t) -> (logits_RV,
    state): reorder the state's rows to the survivors' parents rows_R, then run their tokens,
    the t-th new ones.

    Each step keeps the 2K best candidates of the K x V (enough for K to survive even if K of
    them end there). A candidate ending in stop_id (its length counts it) or at `steps` is
    finished: the K best finished by logp / length**length_penalty are kept; the K best others
    by summed log-probability stay alive. The loop stops early once no alive beam can beat the
    finished ones. -> (tokens (B, K, steps), lengths (B, K), scores (B, K)), best first.
    """
    B, K = batch, beam
    NEG = jnp.float32(-jnp.inf)
    V = logits_RV.shape[-1]

    def norm(score, length):
        return score / length.astype(jnp.float32) ** length_penalty

    def cond(c):
        t = c["t"]
        # score / length**penalty only falls as tokens are added, so an alive beam's best is
        # at the next length or at the last.
        bound_B = jnp.maximum(norm(c["alive_score"][:, 0], t + 1),
                              norm(c["alive_score"][:, 0], jnp.int32(steps)))
        settled = jnp.all(c["fin_score"][:, -1] > bound_B)
        return (t < steps) & ~settled & jnp.any(c["alive_score"] > NEG)

    def body(c):
        t = c["t"]
        logp_BKV = jax.nn.log_softmax(c["logits"].astype(jnp.float32), axis=-1).reshape(B, K, V)
        cand_BX, i_BX = jax.lax.top_k((c["alive_score"][:, :, None] + logp_BKV).reshape(B, -1),
                                      min(2 * K, K * V))
        parent_BX, token_BX = i_BX // V, i_BX % V
        seq_BXN = jnp.take_along_axis(c["seq"], parent_BX[..., None], axis=1).at[:, :, t].set(
            token_BX)
        ends_BX = (token_BX == stop_id) | (t == steps - 1)
        all_score = jnp.concatenate([c["fin_score"], jnp.where(ends_BX, norm(cand_BX, t + 1),
                                                               NEG)], axis=1)
        all_seq = jnp.concatenate([c["fin_seq"], seq_BXN], axis=1)
        all_len = jnp.concatenate([c["fin_len"], jnp.full(ends_BX.shape, t + 1, jnp.int32)],
                                  axis=1)
        fin_score, keep_BK = jax.lax.top_k(all_score, K)
        fin_seq = jnp.take_along_axis(all_seq, keep_BK[..., None], axis=1)
        fin_len = jnp.take_along_axis(all_len, keep_BK, axis=1)
        alive_score, keep_BK = jax.lax.top_k(jnp.where(ends_BX, NEG, cand_BX), K)
        parent_BK = jnp.take_along_axis(parent_BX, keep_BK, axis=1)
        token_BK = jnp.take_along_axis(token_BX, keep_BK, axis=1)
        rows_R = (jnp.arange(B)[:, None] * K + parent_BK).reshape(B * K)
        logits, state = feed(c["state"], rows_R, token_BK.reshape(B * K), t)
        return {"t": t + 1, "logits": logits, "state": state, "alive_score": alive_score,
                "seq": jnp.take_along_axis(seq_BXN, keep_BK[..., None], axis=1),
                "fin_score": fin_score, "fin_seq": fin_seq, "fin_len": fin_len}

    c = {"t": jnp.int32(0), "logits": logits_RV, "state": state,
         "alive_score": jnp.full((B, K), NEG).at[:, 0].set(0.0),
         "seq": jnp.zeros((B, K, steps), jnp.int32), "fin_score": jnp.full((B, K), NEG),
         "fin_seq": jnp.zeros((B, K, steps), jnp.int32), "fin_len": jnp.zeros((B, K), jnp.int32)}
    c = jax.lax.while_loop(cond, body, c)
    return c["fin_seq"], c["fin_len"], c["fin_score"]


@partial(jax.jit, static_argnames=("graphdef", "beam", "steps"))
def _beam_search(graphdef, params, layers, idx_BP, mask_BP, stop_id, length_penalty,
                 beam: int, steps: int):
    """Beam search for B left-padded prompts (`beam_loop` over the cached GPT)."""
    B, P = idx_BP.shape
    K = beam
    idx_RP, mask_RP = jnp.repeat(idx_BP, K, axis=0), jnp.repeat(mask_BP, K, axis=0)
    cache = gpt.init_cache(gpt.merge(graphdef, params).cfg, B * K)
    S = cache["v"].shape[3]
    pos_RP = jnp.maximum(jnp.cumsum(mask_RP, axis=1) - 1, 0)
    valid_RS = jnp.zeros((B * K, S), bool).at[:, :P].set(mask_RP.astype(bool))
    logits_RPV, cache = gpt.forward_cached(graphdef, params, idx_RP, pos_RP, 0, cache, valid_RS,
                                           layers)

    def feed(state, rows_R, token_R, t):
        cache, valid_RS, pos_R = state
        cache = jax.tree.map(lambda x: x[:, rows_R], cache)  # (L, R, ...): rows on axis 1
        slot = P + t
        valid_RS = valid_RS[rows_R].at[:, slot].set(True)
        pos_R = pos_R[rows_R]
        logits_R1V, cache = gpt.forward_cached(graphdef, params, token_R[:, None],
                                               pos_R[:, None], slot, cache, valid_RS, layers)
        return logits_R1V[:, 0], (cache, valid_RS, pos_R + 1)

    return beam_loop(feed, logits_RPV[:, -1], (cache, valid_RS, pos_RP[:, -1] + 1), batch=B,
                     beam=K, steps=steps, stop_id=stop_id, length_penalty=length_penalty)


def beam_search_batch(graphdef, params, prompts: list[list[int]], *, beam: int,
                      max_new_tokens: int, length_penalty: float = 1.0,
                      stop_id: int | None = None) -> list[list[int]]:
    """For each prompt, the best continuation by logp / length**length_penalty.

    K = `beam` partial sequences survive each step (the K best by summed log-probability,
    among candidates that do not end); a candidate ending in `stop_id` (its length counts the
    stop token) or reaching max_new_tokens is finished, and the K best finished sequences by
    normalised score are kept. The loop stops early once no alive beam can beat them.
    Costs K rows of the cached model per prompt and a top-K over K x V candidates per step.
    """
    S = gpt.merge(graphdef, params).cfg.block_size
    if not prompts or any(not p for p in prompts) or beam < 1 or max_new_tokens < 1:
        raise UserError("beam search needs prompts, a beam width >= 1 and max_new_tokens >= 1")
    if max_new_tokens >= S:
        raise UserError(f"beam search needs max_new_tokens < block_size ({S})")
    rows = [list(p[-(S - max_new_tokens):]) for p in prompts]  # prompt + new tokens fit
    idx, mask = _pad_left(rows, S - max_new_tokens)
    seq_BKN, len_BK, score_BK = _beam_search(
        graphdef, params, _split_layers(params), idx, mask,
        -1 if stop_id is None else stop_id, float(length_penalty), beam=beam,
        steps=max_new_tokens)
    seq_BKN, len_BK = np.asarray(seq_BKN), np.asarray(len_BK)
    return [seq_BKN[b, 0, : len_BK[b, 0]].tolist() for b in range(len(prompts))]


def beam_search(graphdef, params, prompt: list[int], *, beam: int, max_new_tokens: int,
                length_penalty: float = 1.0, stop_id: int | None = None) -> list[int]:
    """The best continuation of one prompt (see `beam_search_batch`)."""
    return beam_search_batch(graphdef, params, [prompt], beam=beam,
                             max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                             stop_id=stop_id)[0]
