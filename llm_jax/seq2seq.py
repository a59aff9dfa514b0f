"""Encoder-decoder Transformer ("Attention Is All You Need"), with cached greedy and beam search
decoding, and the decode and eval commands.

Shapes: B batch, S source positions, T target positions (decoder slots), D model width, H heads,
K head dim, V vocabulary, L decoder layers, R = B*beam rows of a beam search, N rows of the
residual stream (B*T).

Design choices:
- The encoder is llm_jax/encoder.py's (bidirectional self-attention over the source, [PAD]
  hidden). A decoder block puts cross-attention between the GPT block's two halves:
      x = x + attn(ln_1(x))          causal self-attention, target padding hidden
      x = x + cross(ln_2(x), memory) queries from the target; keys, values from the encoder
                                     output; source padding hidden
      x = x + mlp(ln_3(x))
  Only cross-attention carries the source into the decoder.
- One vocabulary and one embedding table for source, target and the tied output head, as in the
  original Transformer (the tasks here are characters on both sides). The decoder has its own
  position table and `model.n_dec_layer` blocks. Rotary positions, when chosen, rotate the
  self-attentions only: a source and a target position are not comparable, so cross-attention
  has none (as T5).
- Teacher forcing: the decoder reads [CLS] + target and predicts target + [SEP] at every
  position in one pass; the loss counts the real target positions only.
- Decoding runs the encoder once and computes every layer's cross-attention keys and values
  once; the self-attention keys and values go into a cache of T slots, one per step, so a step
  costs one token's work. A cached step is the same `attention` call with a key mask of the
  slots written so far, which is causality by construction.
- Greedy decoding is one `lax.while_loop` that stops once every row has emitted [SEP]. Beam
  search is llm_jax/sampling.py's algorithm on B*K rows in one `lax.while_loop`: the self-
  attention cache is reordered by parent at each step; the cross-attention keys and values are
  repeated K times once and never reordered (a beam's parent is a beam of the same source).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.attention import dropout
from llm_jax.cli import run_main
from llm_jax.encoder import (Encoder, SelfAttention, attend, embed, rope_for, run_blocks,
                             stack_blocks, tied_logits)
from llm_jax.errors import UserError
from llm_jax.loss import cross_entropy_sum
from llm_jax.model import MLP, ModelConfig, _linear, _norm
from llm_jax.beam import beam_loop
from llm_jax.tasks import SpecialVocab, pad_rows


def decoder_config(cfg: ModelConfig) -> ModelConfig:
    """The decoder's config: n_layer = n_dec_layer (GPT-2's init scales by its own depth)."""
    return dataclasses.replace(cfg, n_layer=cfg.n_dec_layer or cfg.n_layer)


class CrossAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.c_q = _linear(cfg, cfg.n_embd, cfg.n_embd, rngs)
        self.c_kv = _linear(cfg, cfg.n_embd, 2 * cfg.n_embd, rngs)
        self.c_proj = _linear(cfg, cfg.n_embd, cfg.n_embd, rngs,
                              std=0.02 / math.sqrt(2 * cfg.n_layer))

    def kv(self, memory_BSD):
        """The encoder output's keys and values, (B, S, H, K) each: computed once per source."""
        B, S, D = memory_BSD.shape
        k, v = jnp.split(self.c_kv(memory_BSD.reshape(B * S, D)), 2, axis=-1)
        return tuple(t.reshape(B, S, self.cfg.n_head, self.cfg.head_dim) for t in (k, v))

    def __call__(self, x_ND, B: int, kv, src_mask_BS, key=None):
        cfg = self.cfg
        k_att, k_out = jax.random.split(key) if key is not None else (None, None)
        q_BTHK = self.c_q(x_ND).reshape(B, -1, cfg.n_head, cfg.head_dim)
        y_BTHK = attend(cfg, q_BTHK, *kv, False, src_mask_BS, k_att)
        return dropout(self.c_proj(y_BTHK.reshape(x_ND.shape)), cfg.dropout, k_out)


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln_1 = _norm(cfg, rngs)
        self.attn = SelfAttention(cfg, rngs)
        self.ln_2 = _norm(cfg, rngs)
        self.cross = CrossAttention(cfg, rngs)
        self.ln_3 = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_ND, B: int, tgt_mask_BT, kv, src_mask_BS, key=None, rope=None):
        k1, k2, k3 = jax.random.split(key, 3) if key is not None else (None, None, None)
        x_ND = x_ND + self.attn(self.ln_1(x_ND), B, tgt_mask_BT, True, k1, rope)
        x_ND = x_ND + self.cross(self.ln_2(x_ND), B, kv, src_mask_BS, k2)
        x_ND = x_ND + self.mlp(self.ln_3(x_ND), k3)
        return x_ND


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        if cfg.position == "learned":
            self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, dtype=cfg.dtype,
                                 embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.h = stack_blocks(DecoderBlock, cfg, cfg.n_layer, rngs)
        self.ln_f = _norm(cfg, rngs)


class Seq2Seq(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(decoder_config(cfg), rngs)

    def embed_target(self, tgt_BT, pos_BT):
        return embed(self.decoder.cfg, self.encoder.wte, getattr(self.decoder, "wpe", None),
                     tgt_BT, pos_BT)

    def decode(self, tgt_BT, tgt_mask_BT, memory_BSD, src_mask_BS, key=None):
        """Teacher forcing: decoder inputs (B, T) -> float32 logits (B, T, V)."""
        dcfg = self.decoder.cfg
        B, T = tgt_BT.shape
        k_embd, k_blocks = jax.random.split(key) if key is not None else (None, None)
        pos_BT = jnp.arange(T)[None]
        x_BTD = dropout(self.embed_target(tgt_BT, pos_BT), dcfg.dropout, k_embd)
        rope = rope_for(dcfg, pos_BT)

        def call(blk, x_ND, k):
            return blk(x_ND, B, tgt_mask_BT, blk.cross.kv(memory_BSD), src_mask_BS, k, rope)

        x_ND = run_blocks(self.decoder.h, x_BTD.reshape(B * T, -1), dcfg, k_blocks, call)
        h_BTD = self.decoder.ln_f(x_ND).reshape(B, T, -1)
        return tied_logits(self.encoder.wte, h_BTD, self.cfg.vocab_size)

    def __call__(self, src_BS, src_mask_BS, tgt_BT, tgt_mask_BT, key=None):
        k_enc, k_dec = jax.random.split(key) if key is not None else (None, None)
        memory_BSD = self.encoder(src_BS, src_mask_BS, k_enc)
        return self.decode(tgt_BT, tgt_mask_BT, memory_BSD, src_mask_BS, k_dec)


def init_params(cfg: ModelConfig, key) -> tuple[nnx.GraphDef, dict]:
    graphdef, state = nnx.split(Seq2Seq(cfg, nnx.Rngs(params=key)), nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    model = nnx.eval_shape(lambda: Seq2Seq(cfg, nnx.Rngs(params=0)))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def merge(graphdef, params) -> Seq2Seq:
    return nnx.merge(graphdef, nnx.State(params))


def forward(graphdef, params, src_BS, src_mask_BS, tgt_BT, tgt_mask_BT, key=None):
    """Teacher-forced logits (B, T, V). Pure: safe under jit, grad and vmap."""
    return merge(graphdef, params)(src_BS, src_mask_BS, tgt_BT, tgt_mask_BT, key)


def loss(graphdef, params, batch: dict, key=None):
    """(summed loss over the real target tokens, their number, how many were predicted right)."""
    logits_BTV = forward(graphdef, params, batch["src"], batch["src_mask"], batch["tgt_in"],
                         batch["tgt_mask"], key)
    loss_sum, count = cross_entropy_sum(logits_BTV, batch["tgt_out"], batch["tgt_mask"])
    right_BT = (jnp.argmax(logits_BTV, axis=-1) == batch["tgt_out"]) & batch["tgt_mask"]
    return loss_sum, count, right_BT.sum().astype(jnp.float32)


def make_batch(pairs: list[tuple[str, str]], vocab: SpecialVocab, S: int, T: int) -> dict:
    """source [SEP] / [CLS] target (decoder input) / target [SEP] (what it predicts)."""
    src, src_mask = pad_rows([vocab.encode(s) + [vocab.sep_id] for s, _ in pairs], S,
                             vocab.pad_id)
    tgt_in, tgt_mask = pad_rows([[vocab.cls_id] + vocab.encode(t) for _, t in pairs], T,
                                vocab.pad_id)
    tgt_out, _ = pad_rows([vocab.encode(t) + [vocab.sep_id] for _, t in pairs], T, vocab.pad_id)
    return {"src": src, "src_mask": src_mask, "tgt_in": tgt_in, "tgt_mask": tgt_mask,
            "tgt_out": tgt_out}


# --- Cached decoding -----------------------------------------------------------------------


def start(graphdef, params, src_BS, src_mask_BS, slots: int) -> tuple[dict, dict]:
    """Encode once -> (cross: every layer's keys/values of the source, (L, B, S, H, K), and the
    source mask; cache: empty self-attention keys/values, (L, B, slots, H, K))."""
    model = merge(graphdef, params)
    dcfg = model.decoder.cfg
    memory_BSD = model.encoder(src_BS, src_mask_BS)
    block_def, block_state = nnx.split(model.decoder.h)
    ck, cv = jax.lax.map(lambda state: nnx.merge(block_def, state).cross.kv(memory_BSD),
                         block_state)
    shape = (dcfg.n_layer, src_BS.shape[0], slots, dcfg.n_head, dcfg.head_dim)
    cache = {"k": jnp.zeros(shape, dcfg.dtype), "v": jnp.zeros(shape, dcfg.dtype)}
    return {"k": ck, "v": cv, "mask": src_mask_BS}, cache


def step(graphdef, params, cross: dict, cache: dict, token_B, t):
    """Feed one token per row at decoder position t -> (float32 logits (B, V), cache)."""
    model = merge(graphdef, params)
    dcfg = model.decoder.cfg
    B, slots = token_B.shape[0], cache["k"].shape[2]
    pos_B1 = jnp.full((B, 1), t)
    x_ND = model.embed_target(token_B[:, None], pos_B1).reshape(B, -1)
    rope = rope_for(dcfg, pos_B1)
    written_BS = jnp.broadcast_to(jnp.arange(slots) <= t, (B, slots))
    block_def, block_state = nnx.split(model.decoder.h)

    def layer(x_ND, xs):
        state, k_cache, v_cache, ck, cv = xs
        blk = nnx.merge(block_def, state)
        q, k, v = blk.attn.qkv(blk.ln_1(x_ND), B, rope)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), t, 1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), t, 1)
        y = attend(dcfg, q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), False, written_BS)
        x_ND = x_ND + blk.attn.project(y)
        x_ND = x_ND + blk.cross(blk.ln_2(x_ND), B, (ck, cv), cross["mask"])
        x_ND = x_ND + blk.mlp(blk.ln_3(x_ND))
        return x_ND, (k_cache, v_cache)

    x_ND, (k, v) = jax.lax.scan(layer, x_ND, (block_state, cache["k"], cache["v"], cross["k"],
                                              cross["v"]))
    logits_BV = tied_logits(model.encoder.wte, model.decoder.ln_f(x_ND), model.cfg.vocab_size)
    return logits_BV, {"k": k, "v": v}


@partial(jax.jit, static_argnames=("graphdef", "steps"))
def _greedy(graphdef, params, src_BS, src_mask_BS, bos, eos, steps: int):
    """-> tokens (B, steps): each row's argmax choices, [SEP] from its first [SEP] on."""
    B = src_BS.shape[0]
    cross, cache = start(graphdef, params, src_BS, src_mask_BS, steps)

    def cond(c):
        return (c["t"] < steps) & ~jnp.all(c["done"])

    def body(c):
        logits_BV, cache = step(graphdef, params, cross, c["cache"], c["token"], c["t"])
        token_B = jnp.where(c["done"], eos, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
        return {"t": c["t"] + 1, "token": token_B, "cache": cache,
                "out": c["out"].at[:, c["t"]].set(token_B), "done": c["done"] | (token_B == eos)}

    c = {"t": jnp.int32(0), "token": jnp.full((B,), bos, jnp.int32), "cache": cache,
         "out": jnp.full((B, steps), eos, jnp.int32), "done": jnp.zeros((B,), bool)}
    return jax.lax.while_loop(cond, body, c)["out"]


@partial(jax.jit, static_argnames=("graphdef", "beam", "steps"))
def _beam_search(graphdef, params, src_BS, src_mask_BS, bos, eos, length_penalty, beam: int,
                 steps: int):
    """-> (tokens (B, K, steps), lengths (B, K), scores (B, K)): finished sequences, best first
    (`beam.beam_loop`; a beam ends with [SEP] or at `steps`). The encoder runs once; each
    source's K rows share its cross-attention keys/values."""
    B, K = src_BS.shape[0], beam
    cross, cache = start(graphdef, params, src_BS, src_mask_BS, steps)
    cross = {"k": jnp.repeat(cross["k"], K, axis=1), "v": jnp.repeat(cross["v"], K, axis=1),
             "mask": jnp.repeat(cross["mask"], K, axis=0)}
    cache = jax.tree.map(lambda x: jnp.repeat(x, K, axis=1), cache)  # (L, B*K, slots, H, K)
    logits_RV, cache = step(graphdef, params, cross, cache, jnp.full((B * K,), bos, jnp.int32), 0)

    def feed(cache, rows_R, token_R, t):
        cache = jax.tree.map(lambda x: x[:, rows_R], cache)  # (L, R, slots, H, K)
        return step(graphdef, params, cross, cache, token_R, t + 1)

    return beam_loop(feed, logits_RV, cache, batch=B, beam=K, steps=steps, stop_id=eos,
                     length_penalty=length_penalty)


def _sources(vocab: SpecialVocab, sources: list[str], S: int):
    rows = [vocab.encode(s) + [vocab.sep_id] for s in sources]
    if any(len(r) > S for r in rows):
        raise UserError(f"a source is longer than the model's block_size ({S - 1} characters)")
    return pad_rows(rows, S, vocab.pad_id)


def decode_ids(graphdef, params, vocab: SpecialVocab, sources: list[str], *, beam: int = 0,
               length_penalty: float = 1.0, max_len: int = 0) -> list[list[int]]:
    """The target ids (without [SEP]) for each source: greedy when beam == 0, else beam search
    of width `beam`. Sources are padded to block_size; max_len: target tokens (0: block_size)."""
    S = merge(graphdef, params).cfg.block_size
    steps = max_len or S
    if not sources:
        return []
    if steps > S:
        raise UserError(f"max_len {steps} is more than the decoder's block_size ({S})")
    src, src_mask = _sources(vocab, sources, S)
    if beam:
        seq_BKN, len_BK, _ = _beam_search(graphdef, params, src, src_mask, vocab.cls_id,
                                          vocab.sep_id, float(length_penalty), beam=beam,
                                          steps=steps)
        rows = [r[0, : n[0]] for r, n in zip(np.asarray(seq_BKN), np.asarray(len_BK))]
    else:
        rows = list(np.asarray(_greedy(graphdef, params, src, src_mask, vocab.cls_id,
                                       vocab.sep_id, steps=steps)))
    return [[int(i) for i in r[: list(r).index(vocab.sep_id)]] if vocab.sep_id in r
            else [int(i) for i in r] for r in rows]


def decode_text(graphdef, params, vocab: SpecialVocab, sources: list[str], batch: int = 250,
                **kw) -> list[str]:
    """`decode_ids` in batches of `batch` sources, decoded to text."""
    out = []
    for i in range(0, len(sources), batch):
        out += [vocab.decode(ids) for ids in decode_ids(graphdef, params, vocab,
                                                        sources[i:i + batch], **kw)]
    return out


def exact_match(graphdef, params, vocab, pairs: list[tuple[str, str]], **kw) -> float:
    """Share of sources whose decoded target is exactly right."""
    outputs = decode_text(graphdef, params, vocab, [s for s, _ in pairs], **kw)
    return float(np.mean([o == t for o, (_, t) in zip(outputs, pairs)]))


# --- Command line --------------------------------------------------------------------------


def decode_command(args) -> None:
    from llm_jax.family_training import load_run  # it imports this module

    graphdef, params, config, vocab = load_run(args.out_dir, args.ckpt, families=("seq2seq",))
    sources = [" ".join(s.lower().split()) for s in args.source]  # the tasks' own spelling
    for source, target in zip(sources, decode_text(graphdef, params, vocab, sources,
                                                   beam=args.beam,
                                                   length_penalty=args.length_penalty)):
        print(f"{source} -> {target}")


def eval_command(args) -> None:
    import time

    from llm_jax.family_training import load_run
    from llm_jax.tasks import seq2seq_splits

    graphdef, params, config, vocab = load_run(args.out_dir, args.ckpt, families=("seq2seq",))
    pairs = seq2seq_splits(config.model.task)[args.split]
    for beam in (0, args.beam) if args.beam else (0,):
        t0 = time.perf_counter()
        acc = exact_match(graphdef, params, vocab, pairs, beam=beam,
                          length_penalty=args.length_penalty)
        name = f"beam {beam}" if beam else "greedy"
        print(f"{config.model.task} {args.split} ({len(pairs)} examples), {name}: exact match "
              f"{100 * acc:.2f}% ({time.perf_counter() - t0:.1f}s)")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m llm_jax.seq2seq",
                                     description="Use a trained encoder-decoder.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="the target of each source text")
    d.add_argument("source", nargs="+")
    e = sub.add_parser("eval", help="exact-match accuracy on the task's held-out split")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    for p in (d, e):
        p.add_argument("--out_dir", default="out/seq2seq")
        p.add_argument("--ckpt", default="latest", choices=("latest", "best"))
        p.add_argument("--beam", type=int, default=0, help="beam width (0: greedy only)")
        p.add_argument("--length_penalty", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.beam < 0:
        raise UserError("--beam must be >= 0")
    {"decode": decode_command, "eval": eval_command}[args.command](args)


if __name__ == "__main__":
    run_main(main)
