"""Encoder-only Transformer (BERT-style): a masked language model and a sequence classifier,
with the fill-in-the-blank and classify commands.

Shapes: B batch, T time, D model width (n_embd), H heads, K head dim, V vocabulary, C classes,
L layers, N = B*T rows of the residual stream.

Design choices:
- The GPT's parts (llm_jax/model.py): its MLP, norms (`_norm`), GPT-2's initialisation (the
  residual projections scaled by 1/sqrt(2L)) and parameter names (wte, wpe, h, ln_1,
  attn.c_attn, attn.c_proj, ln_2, mlp, ln_f), the position options (learned, sinusoidal, rope),
  blocks stacked along a leading axis under `lax.scan` (rematerialised with `model.remat`), the
  residual stream as (B*T, D) rows, dropout with explicit keys, params float32 with the compute
  dtype from the config.
- The one change to the block is its mask: attention is bidirectional (causal=False) with a
  key mask hiding [PAD] (`llm_jax.attention.attention`), so each position sees every real token
  on both sides, and a sequence's outputs do not depend on the padding after it.
- Masked LM (BERT's recipe, `mask_tokens`): each ordinary token is chosen with probability
  `model.mask_prob` (0.15); a chosen token becomes [MASK] 80% of the time, a random ordinary
  token 10%, and stays itself 10%, so the model cannot learn that only [MASK] needs predicting.
  The loss (`loss.cross_entropy_sum` with a mask) counts the chosen positions only. The output
  head is the GPT's: the final norm, then the tied token embedding.
- Classifier: BERT's pooler (a tanh layer over the [CLS] position) and a linear head. Both
  models keep their encoder under "encoder", so fine-tuning copies that subtree from an MLM run.
- Fill in the blank: every blank is masked; the candidates of each come from one pass, and the
  filled text fills one blank at a time, most confident first, re-reading after each (so a
  multi-character blank of a char model is spelt one confident letter at a time).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax import attention as attn_lib
from llm_jax.attention import dropout
from llm_jax.cli import run_main
from llm_jax.errors import UserError
from llm_jax.loss import cross_entropy_sum
from llm_jax.model import (MLP, ModelConfig, _linear, _norm, apply_rope, rope_angles,
                           sinusoidal_table)
from llm_jax.tasks import SpecialVocab, pad_rows

# --- Parts shared with the encoder-decoder (llm_jax/seq2seq.py) ----------------------------


def attend(cfg: ModelConfig, q_BTHK, k_BSHK, v_BSHK, causal: bool, kv_mask_BS, key=None):
    """`llm_jax.attention.attention` with the config's kernel, dropout and tile size."""
    return attn_lib.attention(q_BTHK, k_BSHK, v_BSHK, causal=causal, kv_mask_BS=kv_mask_BS,
                              impl=cfg.attention, dropout_rate=cfg.dropout, dropout_key=key,
                              block_size=cfg.attention_block)


class SelfAttention(nnx.Module):
    """Multi-head self-attention over the real tokens: bidirectional, or causal (a decoder)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.c_attn = _linear(cfg, cfg.n_embd, 3 * cfg.n_embd, rngs)
        self.c_proj = _linear(cfg, cfg.n_embd, cfg.n_embd, rngs,
                              std=0.02 / math.sqrt(2 * cfg.n_layer))

    def qkv(self, x_ND, B: int, rope=None):
        cfg = self.cfg
        q, k, v = jnp.split(self.c_attn(x_ND), 3, axis=-1)
        q, k, v = (t.reshape(B, -1, cfg.n_head, cfg.head_dim) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def project(self, y_BTHK, key=None):
        B, T, H, K = y_BTHK.shape
        return dropout(self.c_proj(y_BTHK.reshape(B * T, H * K)), self.cfg.dropout, key)

    def __call__(self, x_ND, B: int, mask_BT, causal: bool = False, key=None, rope=None):
        k_att, k_out = jax.random.split(key) if key is not None else (None, None)
        q, k, v = self.qkv(x_ND, B, rope)
        return self.project(attend(self.cfg, q, k, v, causal, mask_BT, k_att), k_out)


class EncoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln_1 = _norm(cfg, rngs)
        self.attn = SelfAttention(cfg, rngs)
        self.ln_2 = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_ND, B: int, mask_BT, key=None, rope=None):
        k_attn, k_mlp = jax.random.split(key) if key is not None else (None, None)
        x_ND = x_ND + self.attn(self.ln_1(x_ND), B, mask_BT, False, k_attn, rope)
        x_ND = x_ND + self.mlp(self.ln_2(x_ND), k_mlp)
        return x_ND


def stack_blocks(block_cls, cfg: ModelConfig, n_layer: int, rngs: nnx.Rngs):
    """One block module whose params have a leading axis of n_layer (as model.GPT's `h`)."""

    @nnx.split_rngs(splits=n_layer)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return block_cls(cfg, rngs)

    return make(rngs)


def run_blocks(h, x_ND, cfg: ModelConfig, key, call):
    """x_ND through the stacked blocks `h` (cfg.n_layer of them) under lax.scan, each block
    recomputed in the backward pass when cfg.remat; call(block, x_ND, key) -> x_ND."""
    keys_L = jax.random.split(key, cfg.n_layer) if key is not None else None
    block_def, block_state = nnx.split(h)

    def layer(x_ND, xs):
        state, k = xs
        return call(nnx.merge(block_def, state), x_ND, k), None

    if cfg.remat:
        layer = jax.checkpoint(layer)
    x_ND, _ = jax.lax.scan(layer, x_ND, (block_state, keys_L), unroll=cfg.scan_unroll)
    return x_ND


def embed(cfg: ModelConfig, wte, wpe, idx_BT, pos_BT):
    """Token embeddings plus the configured positions, as the GPT's `embed` (zeros for rope;
    the tokens scaled by sqrt(D) under the fixed sinusoidal table)."""
    x_BTD = wte(idx_BT)
    if cfg.position == "learned":
        return x_BTD + wpe(pos_BT)
    if cfg.position == "sinusoidal":
        table = sinusoidal_table(cfg.block_size, cfg.n_embd)
        return x_BTD * math.sqrt(cfg.n_embd) + table[pos_BT].astype(cfg.dtype)
    return x_BTD


def rope_for(cfg: ModelConfig, pos_BT):
    return rope_angles(pos_BT, cfg.head_dim, cfg.rope_base) if cfg.position == "rope" else None


def tied_logits(wte, h_BTD, vocab_size: int):
    """The tied output head on normalised states: float32 logits over the real vocabulary."""
    return wte.attend(h_BTD)[..., :vocab_size].astype(jnp.float32)


# --- The encoder, the masked LM and the classifier -----------------------------------------


class Encoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=cfg.dtype,
                             embedding_init=init, rngs=rngs)
        if cfg.position == "learned":
            self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, dtype=cfg.dtype,
                                 embedding_init=init, rngs=rngs)
        self.h = stack_blocks(EncoderBlock, cfg, cfg.n_layer, rngs)
        self.ln_f = _norm(cfg, rngs)

    def __call__(self, idx_BT, mask_BT, key=None):
        """Token ids and their mask (True: real, False: [PAD]) -> normalised states (B, T, D)."""
        cfg = self.cfg
        B, T = idx_BT.shape
        k_embd, k_blocks = jax.random.split(key) if key is not None else (None, None)
        pos_BT = jnp.arange(T)[None]
        x_BTD = dropout(embed(cfg, self.wte, getattr(self, "wpe", None), idx_BT, pos_BT),
                        cfg.dropout, k_embd)
        rope = rope_for(cfg, pos_BT)
        x_ND = run_blocks(self.h, x_BTD.reshape(B * T, cfg.n_embd), cfg, k_blocks,
                          lambda blk, x_ND, k: blk(x_ND, B, mask_BT, k, rope))
        return self.ln_f(x_ND).reshape(B, T, cfg.n_embd)


class MaskedLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)

    def __call__(self, idx_BT, mask_BT, key=None):
        """-> float32 logits (B, T, V) at every position."""
        return tied_logits(self.encoder.wte, self.encoder(idx_BT, mask_BT, key),
                           self.cfg.vocab_size)


class Classifier(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.n_class < 2:
            raise ValueError("ModelConfig.n_class must be at least 2 for a classifier")
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.pooler = _linear(cfg, cfg.n_embd, cfg.n_embd, rngs)
        self.head = _linear(cfg, cfg.n_embd, cfg.n_class, rngs)

    def __call__(self, idx_BT, mask_BT, key=None):
        """-> float32 class logits (B, C), from the [CLS] position (index 0)."""
        k_enc, k_pool = jax.random.split(key) if key is not None else (None, None)
        cls_BD = self.encoder(idx_BT, mask_BT, k_enc)[:, 0]
        pooled_BD = dropout(jnp.tanh(self.pooler(cls_BD)), self.cfg.dropout, k_pool)
        return self.head(pooled_BD).astype(jnp.float32)


MODELS = {"mlm": MaskedLM, "classifier": Classifier}


def _build(cfg: ModelConfig, key):
    if cfg.family not in MODELS:
        raise ValueError(f"llm_jax.encoder builds families {tuple(MODELS)}, not {cfg.family!r}")
    return MODELS[cfg.family](cfg, nnx.Rngs(params=key))


def init_params(cfg: ModelConfig, key) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params) of the masked LM or classifier that cfg.family names."""
    graphdef, state = nnx.split(_build(cfg, key), nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _build(cfg, 0)), nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def forward(graphdef: nnx.GraphDef, params: dict, idx_BT, mask_BT, key=None):
    """Masked LM: logits (B, T, V); classifier: logits (B, C). Pure, like model.forward."""
    return nnx.merge(graphdef, nnx.State(params))(idx_BT, mask_BT, key)


# --- Data and losses -----------------------------------------------------------------------


def mask_tokens(idx_BT: np.ndarray, rng: np.random.Generator, vocab: SpecialVocab,
                prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """BERT's recipe -> (inputs (B, T) int32, chosen (B, T) bool).

    Each ordinary token (not special, not [PAD]) is chosen with probability `prob`; of the
    chosen, 80% become [MASK], 10% a random ordinary token, 10% stay unchanged."""
    chosen_BT = (idx_BT < vocab.n_base) & (rng.random(idx_BT.shape) < prob)
    action_BT = rng.random(idx_BT.shape)
    random_BT = rng.integers(0, vocab.n_base, idx_BT.shape)
    inputs_BT = np.where(chosen_BT & (action_BT < 0.8), vocab.mask_id, idx_BT)
    inputs_BT = np.where(chosen_BT & (action_BT >= 0.8) & (action_BT < 0.9), random_BT,
                         inputs_BT)
    return inputs_BT.astype(np.int32), chosen_BT


def mlm_batch(tokens: np.ndarray, vocab: SpecialVocab, rng: np.random.Generator,
              batch_size: int, block_size: int, prob: float = 0.15) -> dict:
    """Rows of [CLS] window [SEP] [PAD]..., masked by `mask_tokens`.

    Half the windows fill the block; the others have a random length (at least 8 tokens), so
    the model meets [SEP] and padding anywhere, as in a short fill-in-the-blank sentence."""
    n_max = block_size - 2
    if len(tokens) < n_max:
        raise UserError(f"the split has {len(tokens)} tokens, fewer than block_size - 2 = "
                        f"{n_max}: lower model.block_size or use more text")
    short_B = rng.integers(min(8, n_max), n_max + 1, batch_size)
    lengths_B = np.where(rng.random(batch_size) < 0.5, n_max, short_B)
    starts_B = rng.integers(0, len(tokens) - n_max + 1, batch_size)
    rows = [[vocab.cls_id, *np.asarray(tokens[s:s + n]).tolist(), vocab.sep_id]
            for s, n in zip(starts_B, lengths_B)]
    idx_BT, mask_BT = pad_rows(rows, block_size, vocab.pad_id)
    inputs_BT, chosen_BT = mask_tokens(idx_BT, rng, vocab, prob)
    return {"idx": inputs_BT, "mask": mask_BT, "targets": idx_BT, "chosen": chosen_BT}


def classifier_batch(examples: list[tuple[list[int], int]], vocab: SpecialVocab,
                     block_size: int) -> dict:
    """[CLS] text [SEP] [PAD]... rows and their labels."""
    rows = [[vocab.cls_id, *ids, vocab.sep_id] for ids, _ in examples]
    idx_BT, mask_BT = pad_rows(rows, block_size, vocab.pad_id)
    return {"idx": idx_BT, "mask": mask_BT,
            "labels": np.array([label for _, label in examples], np.int32)}


def mlm_loss(graphdef, params, batch: dict, key=None):
    """(summed loss over the chosen positions, their number, how many were predicted right)."""
    logits_BTV = forward(graphdef, params, batch["idx"], batch["mask"], key)
    loss_sum, count = cross_entropy_sum(logits_BTV, batch["targets"], batch["chosen"])
    right_BT = (jnp.argmax(logits_BTV, axis=-1) == batch["targets"]) & batch["chosen"]
    return loss_sum, count, right_BT.sum().astype(jnp.float32)


def classifier_loss(graphdef, params, batch: dict, key=None):
    """(summed loss over the examples, their number, how many were classified right)."""
    logits_BC = forward(graphdef, params, batch["idx"], batch["mask"], key)
    loss_sum, count = cross_entropy_sum(logits_BC[:, None], batch["labels"][:, None])
    right = (jnp.argmax(logits_BC, axis=-1) == batch["labels"]).sum().astype(jnp.float32)
    return loss_sum, count, right


# --- Fill in the blank ---------------------------------------------------------------------

BLANK = re.compile(r"\[MASK\]|_+")


def parse_blanks(text: str, vocab: SpecialVocab, block_size: int) -> tuple[list[int], list[int]]:
    """[CLS] text [SEP] with each blank as [MASK] -> (ids, positions of the blanks).

    A blank is "[MASK]" or a run of underscores: one token, except under a char tokenizer,
    where each underscore is one character. With a BPE tokenizer a space before a blank goes
    into the blank, as BPE words carry their leading space (" return")."""
    ids, blanks, last = [vocab.cls_id], [], 0
    for m in BLANK.finditer(text):
        before = text[last:m.start()]
        if vocab.base.kind != "char" and before.endswith(" "):
            before = before[:-1]
        ids += vocab.encode(before)
        n = len(m.group()) if vocab.base.kind == "char" and m.group() != "[MASK]" else 1
        blanks += range(len(ids), len(ids) + n)
        ids += [vocab.mask_id] * n
        last = m.end()
    ids += vocab.encode(text[last:]) + [vocab.sep_id]
    if not blanks:
        raise UserError(f"no blank in {text!r}: write [MASK] or _ where a token is missing")
    if len(ids) > block_size:
        raise UserError(f"{text!r} is {len(ids)} tokens with [CLS] and [SEP], more than the "
                        f"model's block_size ({block_size})")
    return ids, blanks


def _ordinary_probs(graphdef, params, idx_BT, mask_BT, n_base: int):
    logits_BTV = forward(graphdef, params, idx_BT, mask_BT)
    return jax.nn.softmax(logits_BTV[..., :n_base], axis=-1)  # specials are never an answer


_ordinary_probs_jit = jax.jit(_ordinary_probs, static_argnames=("graphdef", "n_base"))


def fill(graphdef, params, vocab: SpecialVocab, text: str, top: int = 5):
    """-> (candidates: per blank, the `top` (token text, probability) from one pass;
    the text with every blank filled, most confident blank first)."""
    block_size = nnx.merge(graphdef, nnx.State(params)).cfg.block_size
    ids, blanks = parse_blanks(text, vocab, block_size)

    def probs(ids):
        idx, mask = pad_rows([ids], block_size, vocab.pad_id)
        return np.asarray(_ordinary_probs_jit(graphdef, params, idx, mask, n_base=vocab.n_base))[0]

    p_TV = probs(ids)
    candidates = [[(vocab.token_text(int(i)), float(p_TV[t, i]))
                   for i in np.argsort(-p_TV[t])[:top]] for t in blanks]
    remaining = list(blanks)
    while remaining:
        best = max(remaining, key=lambda t: p_TV[t].max())
        ids[best] = int(p_TV[best].argmax())
        remaining.remove(best)
        if remaining:
            p_TV = probs(ids)
    return candidates, vocab.decode(ids[1:-1])


# --- Command line --------------------------------------------------------------------------


def fill_command(args) -> None:
    from llm_jax.family_training import load_run  # it imports this module

    graphdef, params, _, vocab = load_run(args.out_dir, args.ckpt, families=("mlm",))
    for text in args.text:
        candidates, filled = fill(graphdef, params, vocab, text, top=args.top)
        print(text)
        for n, cands in enumerate(candidates, 1):
            print(f"  blank {n}: " + "  ".join(f"{tok!r} {p:.2f}" for tok, p in cands))
        print(f"  filled: {filled}")


def classify_command(args) -> None:
    from llm_jax.family_training import load_run
    from llm_jax.tasks import CLASS_NAMES

    graphdef, params, config, vocab = load_run(args.out_dir, args.ckpt, families=("classifier",))
    names = CLASS_NAMES[config.model.task]
    batch = classifier_batch([(vocab.encode(" ".join(t.split())), 0) for t in args.text], vocab,
                             config.model.block_size)
    probs_BC = np.asarray(jax.nn.softmax(forward(graphdef, params, batch["idx"], batch["mask"])))
    for text, p_C in zip(args.text, probs_BC):
        print(f"{names[int(p_C.argmax())]:>9}  " + "  ".join(
            f"{name} {p:.2f}" for name, p in zip(names, p_C)) + f"  {text}")


def eval_command(args) -> None:
    from llm_jax.family_training import load_run, make_job

    graphdef, params, config, _ = load_run(args.out_dir, args.ckpt, families=("classifier",))
    # The trained weights are here: the task's data is all that is needed, not the MLM run.
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=""))
    report = make_job(config).report(graphdef, params)
    print(", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in report.items()))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m llm_jax.encoder",
                                     description="Use a trained masked LM or classifier.")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fill", help="top candidates for each blank ([MASK] or _) of a text")
    f.add_argument("--out_dir", default="out/mlm")
    f.add_argument("--top", type=int, default=5, help="candidates shown per blank")
    c = sub.add_parser("classify", help="class probabilities of each text")
    c.add_argument("--out_dir", default="out/classify")
    e = sub.add_parser("eval", help="a classifier's accuracy on its task's test split")
    e.add_argument("--out_dir", default="out/classify")
    for p in (f, c, e):
        p.add_argument("--ckpt", default="latest", choices=("latest", "best"))
    for p in (f, c):
        p.add_argument("text", nargs="+")
    args = parser.parse_args(argv)
    {"fill": fill_command, "classify": classify_command, "eval": eval_command}[args.command](args)


if __name__ == "__main__":
    run_main(main)
