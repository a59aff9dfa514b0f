"""Attention: one signature, a ladder of interchangeable implementations.

Shapes: B batch, T query positions (target), S key/value positions (source), H heads,
K head dim.

    y_BTHK = attention(q_BTHK, k_BSHK, v_BSHK, causal=..., kv_mask_BS=..., impl=...)

computes softmax(Q K^T / sqrt(K) + M) V for each head, where the mask M hides keys:
- causal=True: query t sees the keys s <= t (a decoder's self-attention; T == S);
- kv_mask_BS: True marks the real keys of each sequence, False its padding. An encoder is
  causal=False with this mask; cross-attention is S != T with the source's padding here.
- q_mask_BT (optional): True marks the real queries; padded query rows output zeros. Not needed
  for correctness (a padded query attends to real keys, so its row is finite, and the loss
  masks it), but it makes "padding in, zeros out" explicit.
A query that sees no key at all (all its keys padded, e.g. left padding under a causal mask)
outputs zeros with zero gradients, in every implementation; never NaN.

Implementations (`IMPLEMENTATIONS`, chosen with impl=; each takes the same keyword arguments):
- "reference": the formula as written: a (B, H, T, S) score matrix, an additive mask of
  float32's lowest finite value, softmax in float32, dropout on the weights with an explicit
  key. `masked_attention` is its core and gives what llm_jax/model.py's `attention` gives.
- "xla": `jax.nn.dot_product_attention` with implementation=None, which in jax 0.10 means its
  XLA path (a T x S matrix, like the reference; `implementation="cudnn"` is cuDNN's fused
  kernel on GPUs that support it, bf16/fp16 only, and a registry entry away). No dropout.
- "flash": FlashAttention-2 in pure JAX: a scan over tiles of block_size queries, and within it
  a loop over tiles of keys with the online softmax (running max m, running sum l, rescaled
  accumulator), so no T x S array ever exists and memory grows linearly in T. Causal tiles above
  the diagonal are skipped, not masked. A `jax.custom_vjp` backward recomputes each tile from
  the saved (q, k, v, out, logsumexp). Lengths that are not a multiple of block_size are padded
  and the padded keys masked. No dropout.
Implementations without dropout raise ValueError when dropout is asked for (a rate > 0 with a
key); with key=None (evaluation) the rate is ignored, as `dropout` does.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from llm_jax.blocked_attention import blocked_causal_attention

NEG = jnp.finfo(jnp.float32).min  # the additive mask: finite, so exp() gives 0 and never NaN


# ---- masks: True = the query may look at this key ----------------------------------------

def causal_mask(T: int):
    """(T, T): query t sees the keys s <= t."""
    return jnp.tril(jnp.ones((T, T), dtype=bool))


def padding_mask(lengths_B, T: int):
    """(B, T): True for the first lengths[b] positions (right padding)."""
    return jnp.arange(T)[None, :] < jnp.asarray(lengths_B)[:, None]


def encoder_mask(lengths_B, T: int):
    """(B, T, T): bidirectional self-attention; every query sees every real key."""
    return cross_mask(lengths_B, T, T)


def decoder_mask(lengths_B, T: int):
    """(B, T, T): causal self-attention over real keys (causal and padding combined)."""
    return causal_mask(T)[None] & padding_mask(lengths_B, T)[:, None, :]


def cross_mask(src_lengths_B, T: int, S: int):
    """(B, T, S): T target queries over S source keys, of which src_lengths[b] are real."""
    src_BS = padding_mask(src_lengths_B, S)
    return jnp.broadcast_to(src_BS[:, None, :], (src_BS.shape[0], T, S))


def visible_mask(T: int, S: int, causal: bool, kv_mask_BS=None):
    """The (B or 1, T, S) mask that `attention`'s arguments stand for."""
    visible_BTS = jnp.ones((1, T, S), dtype=bool)
    if causal:
        visible_BTS = visible_BTS & causal_mask(T)[None]
    if kv_mask_BS is not None:
        visible_BTS = visible_BTS & kv_mask_BS[:, None, :]
    return visible_BTS


def _rows_seeing_keys(causal: bool, kv_mask_BS):
    """(B, T) under a causal mask, else (B, 1): whether a query sees at least one key."""
    if causal:
        return jnp.cumsum(kv_mask_BS, axis=1) > 0
    return jnp.any(kv_mask_BS, axis=1, keepdims=True)


# ---- (a) reference --------------------------------------------------------------------------

def dropout(x, rate: float, key):
    """Inverted dropout with an explicit key; identity when key is None or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def masked_attention(q_BTHK, k_BSHK, v_BSHK, visible_BTS, key=None, rate: float = 0.0):
    """softmax(Q K^T / sqrt(K) + M) V, written out as the formula reads.

    visible_BTS (broadcastable) says which keys each query may see; M is 0 there and float32's
    lowest finite value elsewhere, whose exp() is exactly 0 next to any visible score. A row
    that sees nothing gets uniform weights from that floor (the mean of V); its output is set
    to zeros, which zeroes its gradients too. Zeroing the output, not the weights, keeps every
    other row bit for bit what llm_jax/model.py's `attention` gives, dropout included.
    """
    K = q_BTHK.shape[3]
    scores_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK).astype(jnp.float32)
    scores_BHTS = scores_BHTS / math.sqrt(K)
    visible_B1TS = visible_BTS[:, None]
    scores_BHTS = scores_BHTS + jnp.where(visible_B1TS, 0.0, NEG)
    weights_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    weights_BHTS = dropout(weights_BHTS, rate, key).astype(v_BSHK.dtype)
    y_BTHK = jnp.einsum("bhts,bshk->bthk", weights_BHTS, v_BSHK)
    sees_BT11 = visible_BTS.any(axis=-1)[:, :, None, None]
    return jnp.where(sees_BT11, y_BTHK, 0)


def reference_attention(q_BTHK, k_BSHK, v_BSHK, *, causal, kv_mask_BS, dropout_rate,
                        dropout_key, block_size):
    del block_size  # one tile: the whole matrix
    visible_BTS = visible_mask(q_BTHK.shape[1], k_BSHK.shape[1], causal, kv_mask_BS)
    return masked_attention(q_BTHK, k_BSHK, v_BSHK, visible_BTS, dropout_key, dropout_rate)


def _refuse_dropout(impl: str, rate: float, key):
    if rate > 0.0 and key is not None:
        raise ValueError(f"attention impl {impl!r} has no dropout; use impl='reference' to "
                         "train with attention dropout, or dropout_rate=0")


# ---- (b) jax.nn.dot_product_attention -------------------------------------------------------

def xla_attention(q_BTHK, k_BSHK, v_BSHK, *, causal, kv_mask_BS, dropout_rate, dropout_key,
                  block_size):
    del block_size
    _refuse_dropout("xla", dropout_rate, dropout_key)
    # A general key mask rather than key_value_seq_lengths: it also covers left padding.
    mask_B11S = None if kv_mask_BS is None else kv_mask_BS[:, None, None, :]
    y_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask=mask_B11S,
                                          is_causal=causal, implementation=None)
    if kv_mask_BS is None:
        return y_BTHK
    # jax gives a row that sees no key the mean of V (its mask is a finite floor); zero it.
    sees_BT = _rows_seeing_keys(causal, kv_mask_BS)
    return jnp.where(sees_BT[:, :, None, None], y_BTHK, 0)


# ---- (c) flash: tiles, online softmax, recomputing backward ---------------------------------

def _tile(x, i, size: int, axis: int):
    return lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _tile_visible(mask_Bk, i, j, bq: int, bk: int, causal: bool):
    """(B, 1, bq, bk): which keys of key tile j the queries of query tile i see."""
    visible_B1qk = mask_Bk[:, None, None, :]
    if causal:
        rows_q = i * bq + jnp.arange(bq)
        cols_k = j * bk + jnp.arange(bk)
        visible_B1qk = visible_B1qk & (cols_k[None, :] <= rows_q[:, None])
    return visible_B1qk


def _flash_forward(q_BHTK, k_BHSK, v_BHSK, mask_BS, causal, bq, bk):
    """-> (y_BHTK, lse_BHT); T, S multiples of bq, bk; lse is 0 on rows that see no key."""
    B, H, T, K = q_BHTK.shape
    n_k = k_BHSK.shape[2] // bk
    f32 = jnp.promote_types(q_BHTK.dtype, jnp.float32)

    def query_tile(_, i):
        q_BHqK = _tile(q_BHTK, i, bq, 2)

        def key_tile(j, carry):
            m_BHq, l_BHq, acc_BHqK = carry
            k_BHkK, v_BHkK = _tile(k_BHSK, j, bk, 2), _tile(v_BHSK, j, bk, 2)
            s_BHqk = jnp.einsum("bhqd,bhkd->bhqk", q_BHqK, k_BHkK,
                                preferred_element_type=f32) / math.sqrt(K)
            visible_B1qk = _tile_visible(_tile(mask_BS, j, bk, 1), i, j, bq, bk, causal)
            m_new_BHq = jnp.maximum(m_BHq, jnp.where(visible_B1qk, s_BHqk, -jnp.inf).max(-1))
            m_safe_BHq = jnp.where(jnp.isfinite(m_new_BHq), m_new_BHq, 0.0)  # nothing seen yet
            p_BHqk = jnp.where(visible_B1qk, jnp.exp(s_BHqk - m_safe_BHq[..., None]), 0.0)
            alpha_BHq = jnp.exp(m_BHq - m_safe_BHq)  # rescales the sums kept under the old max
            l_BHq = alpha_BHq * l_BHq + p_BHqk.sum(-1)
            acc_BHqK = alpha_BHq[..., None] * acc_BHqK + jnp.einsum(
                "bhqk,bhkd->bhqd", p_BHqk.astype(v_BHSK.dtype), v_BHkK,
                preferred_element_type=f32)
            return m_new_BHq, l_BHq, acc_BHqK

        init = (jnp.full((B, H, bq), -jnp.inf, f32), jnp.zeros((B, H, bq), f32),
                jnp.zeros((B, H, bq, K), f32))
        n_seen = i + 1 if causal else n_k  # causal: key tiles right of the diagonal are skipped
        m_BHq, l_BHq, acc_BHqK = lax.fori_loop(0, n_seen, key_tile, init)
        seen_BHq = l_BHq > 0  # l >= 1 once any key was seen: the max term contributes exp(0)
        l_BHq = jnp.where(seen_BHq, l_BHq, 1.0)
        y_BHqK = (acc_BHqK / l_BHq[..., None]).astype(q_BHTK.dtype)  # acc is 0 if nothing seen
        lse_BHq = jnp.where(seen_BHq, m_BHq + jnp.log(l_BHq), 0.0)
        return None, (y_BHqK, lse_BHq)

    _, (y_nBHqK, lse_nBHq) = lax.scan(query_tile, None, jnp.arange(T // bq))
    y_BHTK = jnp.moveaxis(y_nBHqK, 0, 2).reshape(B, H, T, K)
    return y_BHTK, jnp.moveaxis(lse_nBHq, 0, 2).reshape(B, H, T)


def _flash_backward(causal, bq, bk, residuals, dy_BHTK):
    """FlashAttention-2's backward: per key tile, loop over query tiles recomputing P."""
    q_BHTK, k_BHSK, v_BHSK, mask_BS, y_BHTK, lse_BHT = residuals
    B, H, T, K = q_BHTK.shape
    n_q, n_k = T // bq, k_BHSK.shape[2] // bk
    f32 = jnp.promote_types(q_BHTK.dtype, jnp.float32)
    scale = 1.0 / math.sqrt(K)
    # D = rowsum(dO * O) = sum_s P_ts dP_ts: the softmax backward's subtracted term, per row.
    d_BHT = jnp.sum(dy_BHTK.astype(f32) * y_BHTK.astype(f32), axis=-1)

    def key_tile(dq_BHTK, j):
        k_BHkK, v_BHkK = _tile(k_BHSK, j, bk, 2), _tile(v_BHSK, j, bk, 2)
        mask_Bk = _tile(mask_BS, j, bk, 1)

        def query_tile(i, carry):
            dq_BHTK, dk_BHkK, dv_BHkK = carry
            q_BHqK, dy_BHqK = _tile(q_BHTK, i, bq, 2), _tile(dy_BHTK, i, bq, 2)
            s_BHqk = jnp.einsum("bhqd,bhkd->bhqk", q_BHqK, k_BHkK,
                                preferred_element_type=f32) * scale
            visible_B1qk = _tile_visible(mask_Bk, i, j, bq, bk, causal)
            p_BHqk = jnp.where(visible_B1qk,
                               jnp.exp(s_BHqk - _tile(lse_BHT, i, bq, 2)[..., None]), 0.0)
            dv_BHkK += jnp.einsum("bhqk,bhqd->bhkd", p_BHqk, dy_BHqK,
                                  preferred_element_type=f32)
            dp_BHqk = jnp.einsum("bhqd,bhkd->bhqk", dy_BHqK, v_BHkK, preferred_element_type=f32)
            ds_BHqk = p_BHqk * (dp_BHqk - _tile(d_BHT, i, bq, 2)[..., None])
            dq_BHqK = _tile(dq_BHTK, i, bq, 2) + scale * jnp.einsum(
                "bhqk,bhkd->bhqd", ds_BHqk, k_BHkK, preferred_element_type=f32)
            dq_BHTK = lax.dynamic_update_slice_in_dim(dq_BHTK, dq_BHqK, i * bq, axis=2)
            dk_BHkK += scale * jnp.einsum("bhqk,bhqd->bhkd", ds_BHqk, q_BHqK,
                                          preferred_element_type=f32)
            return dq_BHTK, dk_BHkK, dv_BHkK

        zeros_BHkK = jnp.zeros((B, H, bk, K), f32)
        first = j if causal else 0  # causal: query tiles above the diagonal are skipped
        dq_BHTK, dk_BHkK, dv_BHkK = lax.fori_loop(first, n_q, query_tile,
                                                  (dq_BHTK, zeros_BHkK, zeros_BHkK))
        return dq_BHTK, (dk_BHkK, dv_BHkK)

    dq_BHTK, (dk_nBHkK, dv_nBHkK) = lax.scan(key_tile, jnp.zeros((B, H, T, K), f32),
                                             jnp.arange(n_k))
    S = n_k * bk
    dk_BHSK = jnp.moveaxis(dk_nBHkK, 0, 2).reshape(B, H, S, K)
    dv_BHSK = jnp.moveaxis(dv_nBHkK, 0, 2).reshape(B, H, S, K)
    return (dq_BHTK.astype(q_BHTK.dtype), dk_BHSK.astype(k_BHSK.dtype),
            dv_BHSK.astype(v_BHSK.dtype), None)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash_core(q_BHTK, k_BHSK, v_BHSK, mask_BS, causal, bq, bk):
    return _flash_forward(q_BHTK, k_BHSK, v_BHSK, mask_BS, causal, bq, bk)[0]


def _flash_core_fwd(q_BHTK, k_BHSK, v_BHSK, mask_BS, causal, bq, bk):
    y_BHTK, lse_BHT = _flash_forward(q_BHTK, k_BHSK, v_BHSK, mask_BS, causal, bq, bk)
    return y_BHTK, (q_BHTK, k_BHSK, v_BHSK, mask_BS, y_BHTK, lse_BHT)


_flash_core.defvjp(_flash_core_fwd, _flash_backward)


def flash_attention(q_BTHK, k_BSHK, v_BSHK, *, causal, kv_mask_BS, dropout_rate, dropout_key,
                    block_size):
    _refuse_dropout("flash", dropout_rate, dropout_key)
    B, T, H, K = q_BTHK.shape
    S = k_BSHK.shape[1]
    bq, bk = min(block_size, T), min(block_size, S)  # causal: T == S, so bq == bk
    pad_T, pad_S = -T % bq, -S % bk
    mask_BS = jnp.ones((B, S), dtype=bool) if kv_mask_BS is None else kv_mask_BS
    mask_BS = jnp.pad(mask_BS, ((0, 0), (0, pad_S)))  # padded keys are hidden
    q_BHTK = jnp.pad(q_BTHK, ((0, 0), (0, pad_T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    k_BHSK, v_BHSK = (jnp.pad(x, ((0, 0), (0, pad_S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
                      for x in (k_BSHK, v_BSHK))
    y_BHTK = _flash_core(q_BHTK, k_BHSK, v_BHSK, mask_BS, causal, bq, bk)
    return y_BHTK.transpose(0, 2, 1, 3)[:, :T]


# ---- the one entry point --------------------------------------------------------------------

def blocked_attention(q_BTHK, k_BSHK, v_BSHK, *, causal, kv_mask_BS, dropout_rate, dropout_key,
                      block_size):
    _refuse_dropout("blocked", dropout_rate, dropout_key)
    if not causal or kv_mask_BS is not None:  # it serves unmasked causal self-attention only
        return reference_attention(q_BTHK, k_BSHK, v_BSHK, causal=causal, kv_mask_BS=kv_mask_BS,
                                   dropout_rate=0.0, dropout_key=None, block_size=block_size)
    return blocked_causal_attention(q_BTHK, k_BSHK, v_BSHK, block_size)


IMPLEMENTATIONS = {
    "reference": reference_attention,
    "xla": xla_attention,
    "flash": flash_attention,
    "blocked": blocked_attention,
}


def attention(q_BTHK, k_BSHK, v_BSHK, *, causal: bool = False, q_mask_BT=None, kv_mask_BS=None,
              impl: str = "reference", dropout_rate: float = 0.0, dropout_key=None,
              block_size: int = 512):
    """Multi-head attention of T queries over S keys -> y_BTHK (see the module docstring).

    block_size is the tile length of "flash" (ignored by the others). dropout_rate with
    dropout_key drops attention weights ("reference" only).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of: "
                         + ", ".join(IMPLEMENTATIONS))
    B, T, H, K = q_BTHK.shape
    S = k_BSHK.shape[1]
    if k_BSHK.shape != (B, S, H, K) or v_BSHK.shape != k_BSHK.shape:
        raise ValueError(f"q, k, v shapes {q_BTHK.shape}, {k_BSHK.shape}, {v_BSHK.shape} "
                         "do not fit (B, T, H, K), (B, S, H, K), (B, S, H, K)")
    if causal and T != S:
        raise ValueError(f"causal attention needs as many queries as keys, got T={T}, S={S}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if kv_mask_BS is not None:
        kv_mask_BS = jnp.asarray(kv_mask_BS, dtype=bool)
        if kv_mask_BS.shape != (B, S):
            raise ValueError(f"kv_mask_BS has shape {kv_mask_BS.shape}, expected {(B, S)}")
    y_BTHK = IMPLEMENTATIONS[impl](q_BTHK, k_BSHK, v_BSHK, causal=causal, kv_mask_BS=kv_mask_BS,
                                   dropout_rate=dropout_rate, dropout_key=dropout_key,
                                   block_size=block_size)
    if q_mask_BT is not None:
        q_mask_BT = jnp.asarray(q_mask_BT, dtype=bool)
        if q_mask_BT.shape != (B, T):
            raise ValueError(f"q_mask_BT has shape {q_mask_BT.shape}, expected {(B, T)}")
        y_BTHK = jnp.where(q_mask_BT[:, :, None, None], y_BTHK, 0)
    return y_BTHK
