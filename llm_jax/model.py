"""GPT-2, as Flax NNX modules used as pure functions over a params pytree.

Shapes: B batch, T time, D width (n_embd), H heads, K head dim (D // H), V vocabulary, L layers.

Design choices:
- GPT-2 exactly, so that OpenAI's weights map onto it one to one: token + learned position
  embeddings, pre-LayerNorm blocks (eps 1e-5), causal self-attention with one fused qkv
  projection, a 4x MLP with tanh-approximated GELU, a final LayerNorm and an output head tied
  to the token embedding. Parameter names are GPT-2's (wte, wpe, h, ln_1, attn.c_attn, ...).
- The modules only describe structure and initialisation. Training and sampling use
  `init_params` / `forward`: a graphdef plus a plain nested dict of arrays, merged back into
  modules inside the traced function.
- The L blocks are one module with stacked parameters (leading axis L) and run under
  `jax.lax.scan`, so compile time does not grow with depth.
- Dropout takes an explicit key per call (`key=None` means evaluation: no dropout).
- Inside the blocks the residual stream is a 2-D (B*T, D) array of rows: XLA's CPU backend
  computes the weight gradient of a 2-D matmul about twice as fast as that of a (B, T, D) one.
  Only attention looks at the sequence axis.
- `forward_cached` is the generation path: it runs new tokens against a preallocated key/value
  cache of S = block_size slots, with explicit position ids and a (B, S) mask of valid cache
  slots, so prompts of different lengths share one batch (left padding). It reuses the same
  params; `forward` is untouched.
- Packing (`segment_ids_BT`, for fine-tuning on short examples): several examples share a row;
  attention is causal within each example's segment only, through the reference formula with a
  (B, T, T) mask (`segment_mask`), and positions restart at 0 at each example's first token.
- Params are float32; `dtype` sets the compute dtype; softmax and logits are float32.
  `matmul_dtype=bfloat16` rounds only the linear layers' operands to bf16, with float32 sums
  and results (llm_jax/matmul.py): about twice the float32 matmul rate on CPUs with AVX-512
  BF16, while the residual stream, norms and softmax stay float32. `linear_vjp=transposed`: the
  same backward in float32 (dw from a row-major x^T; `auto` picks it on per-core CPU devices).
- The embedding table may be padded (50257 -> 50304 rows) for faster matmuls; the logits are cut
  back to `vocab_size`, so padding never changes results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax import attention as attn_lib
from llm_jax.matmul import LINEAR_VJPS, MATMUL_DTYPES, dot_general_for  # noqa: F401
from llm_jax.attention import dropout, masked_attention as attention  # noqa: F401 (re-exported)


POSITIONS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # tokens in the vocabulary (0: take it from the tokenizer)
    vocab_multiple: int = 64  # embedding rows are padded up to a multiple of this
    block_size: int = 1024  # context length in tokens
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # model width D
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16 (params stay float32)
    matmul_dtype: str = "float32"  # linear operands: float32 | bfloat16 (float32 sums) | auto
    linear_vjp: str = "auto"  # float32 linear backward: xla | transposed | auto (matmul.py)
    attention_dtype: str = ""  # q, k, v for attention's products ("": the compute dtype) | auto
    scan_unroll: int = 1  # layers per scan iteration (n_layer: fully unrolled, often faster on CPU)
    position: str = "learned"  # learned (GPT-2's table) | sinusoidal (fixed) | rope (rotary)
    rope_base: float = 10000.0  # rope: frequencies base**(-2i/K)
    norm: str = "layernorm"  # layernorm (GPT-2) | rmsnorm
    attention: str = "reference"  # reference (the formula) | xla (jax.nn) | flash (tiled)
    attention_block: int = 512  # flash: tile length; blocked: query rows per causal block
    remat: bool = False  # recompute each block in the backward pass: less memory, ~1/3 more compute
    family: str = "gpt"  # gpt | mlm (BERT-style masked LM) | classifier | seq2seq (enc-dec)
    n_dec_layer: int = 0  # seq2seq: decoder blocks (0: as many as n_layer, the encoder's)
    task: str = ""  # classifier: shuffled; seq2seq: dates | reverse ("": the family's default)
    n_class: int = 0  # classifier: classes (0: from the task)
    mask_prob: float = 0.15  # mlm: share of (non-special, non-pad) tokens chosen for the loss

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _linear(cfg: ModelConfig, d_in: int, d_out: int, rngs: nnx.Rngs, std: float = 0.02):
    return nnx.Linear(d_in, d_out, use_bias=cfg.bias, dtype=cfg.dtype, rngs=rngs,
                      kernel_init=nnx.initializers.normal(std),
                      dot_general=dot_general_for(cfg.matmul_dtype, cfg.linear_vjp))


def _norm(cfg: ModelConfig, rngs: nnx.Rngs):
    """LayerNorm (x - mean) / sqrt(var + eps) * scale (+ bias), or RMSNorm x / sqrt(mean(x^2) + eps)
    * scale; eps 1e-5 as GPT-2."""
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.n_embd, epsilon=1e-5, dtype=cfg.dtype, rngs=rngs)
    return nnx.LayerNorm(cfg.n_embd, epsilon=1e-5, use_bias=cfg.bias, dtype=cfg.dtype, rngs=rngs)


def sinusoidal_table(n_pos: int, d: int):
    """Fixed positions ("Attention Is All You Need"): row p has sin(p * w_i) at column 2i and
    cos(p * w_i) at column 2i + 1, with w_i = 10000**(-2i / d). -> float32 (n_pos, d)."""
    w_I = 10000.0 ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle_PI = jnp.arange(n_pos, dtype=jnp.float32)[:, None] * w_I[None, :]
    table_PI2 = jnp.stack([jnp.sin(angle_PI), jnp.cos(angle_PI)], axis=-1)
    return table_PI2.reshape(n_pos, -1)[:, :d]


def rope_angles(pos_BT, head_dim: int, base: float = 10000.0):
    """Rotary angles: (cos, sin), each (B, T, 1, K // 2), of pos * base**(-2i / K)."""
    w_I = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_BTI = pos_BT.astype(jnp.float32)[..., None] * w_I
    return jnp.cos(angle_BTI)[:, :, None, :], jnp.sin(angle_BTI)[:, :, None, :]


def apply_rope(x_BTHK, rope):
    """Rotate the pairs (x[i], x[i + K/2]) of each head by its position's angles: then the score
    q_m . k_n depends on the positions only through m - n."""
    cos, sin = rope
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_BTHK.dtype)


def causal_attention(q_BTHK, k_BTHK, v_BTHK, key=None, rate: float = 0.0):
    """Self-attention where position t sees positions 0..t (the reference implementation)."""
    return attn_lib.attention(q_BTHK, k_BTHK, v_BTHK, causal=True, dropout_rate=rate,
                              dropout_key=key)


def segment_positions(segment_ids_BT):
    """Position ids that restart at 0 where the segment id changes (packed examples)."""
    T = segment_ids_BT.shape[1]
    starts_BT = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], dtype=bool),
                                 segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    t_BT = jnp.broadcast_to(jnp.arange(T), segment_ids_BT.shape)
    return t_BT - jax.lax.cummax(jnp.where(starts_BT, t_BT, 0), axis=1)


def segment_mask(segment_ids_BT):
    """(B, T, T): causal, and within the query's own segment: packed examples never see each
    other."""
    same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return same_BTT & attn_lib.causal_mask(segment_ids_BT.shape[1])[None]


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.c_attn = _linear(cfg, cfg.n_embd, 3 * cfg.n_embd, rngs)
        self.c_proj = _linear(cfg, cfg.n_embd, cfg.n_embd, rngs,
                              std=0.02 / math.sqrt(2 * cfg.n_layer))  # GPT-2's residual scaling

    def __call__(self, x_ND, T: int, key=None, rope=None, segment_ids_BT=None):
        cfg = self.cfg
        N, D = x_ND.shape
        k_att, k_out = jax.random.split(key) if key is not None else (None, None)
        qkv_N3D = self.c_attn(x_ND)
        q, k, v = jnp.split(qkv_N3D, 3, axis=-1)  # GPT-2 order: query, key, value
        q, k, v = (t.reshape(N // T, T, cfg.n_head, cfg.head_dim) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cfg.attention_dtype not in ("", "auto"):  # bf16 q.k, p.v; unresolved auto: dtype
            q, k, v = (t.astype(cfg.attention_dtype) for t in (q, k, v))
        if segment_ids_BT is not None:  # packed rows: the formula with a per-row mask
            y_BTHK = attn_lib.masked_attention(q, k, v, segment_mask(segment_ids_BT), k_att,
                                               cfg.dropout)
        else:
            y_BTHK = attn_lib.attention(q, k, v, causal=True, impl=cfg.attention,
                                        dropout_rate=cfg.dropout, dropout_key=k_att,
                                        block_size=cfg.attention_block)
        y_ND = y_BTHK.reshape(N, D).astype(x_ND.dtype)
        return dropout(self.c_proj(y_ND), cfg.dropout, k_out)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.c_fc = _linear(cfg, cfg.n_embd, 4 * cfg.n_embd, rngs)
        self.c_proj = _linear(cfg, 4 * cfg.n_embd, cfg.n_embd, rngs,
                              std=0.02 / math.sqrt(2 * cfg.n_layer))

    def __call__(self, x_ND, key=None):
        h_NF = jax.nn.gelu(self.c_fc(x_ND), approximate=True)
        return dropout(self.c_proj(h_NF), self.cfg.dropout, key)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln_1 = _norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.ln_2 = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_ND, T: int, key=None, rope=None, segment_ids_BT=None):
        k_attn, k_mlp = jax.random.split(key) if key is not None else (None, None)
        x_ND = x_ND + self.attn(self.ln_1(x_ND), T, k_attn, rope, segment_ids_BT)
        x_ND = x_ND + self.mlp(self.ln_2(x_ND), k_mlp)
        return x_ND


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        embed_init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=cfg.dtype,
                             embedding_init=embed_init, rngs=rngs)
        if cfg.position not in POSITIONS:
            raise ValueError(f"ModelConfig.position must be one of {POSITIONS}")
        if cfg.position == "rope" and cfg.head_dim % 2:
            raise ValueError("rotary positions need an even head dimension")
        if cfg.position == "learned":
            self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, dtype=cfg.dtype,
                                 embedding_init=embed_init, rngs=rngs)

        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.h = make_blocks(rngs)  # one Block whose params have a leading axis of size L
        self.ln_f = _norm(cfg, rngs)

    def positions(self, pos_BT):
        """What is added to the token embeddings at these positions (zeros for rope)."""
        if self.cfg.position == "learned":
            return self.wpe(pos_BT)
        if self.cfg.position == "sinusoidal":
            table = sinusoidal_table(self.cfg.block_size, self.cfg.n_embd)
            return table[pos_BT].astype(self.cfg.dtype)
        return jnp.zeros((), self.cfg.dtype)

    def rope(self, pos_BT):
        """Rotary angles for these positions, or None when positions are added instead."""
        if self.cfg.position != "rope":
            return None
        return rope_angles(pos_BT, self.cfg.head_dim, self.cfg.rope_base)

    def tokens(self, idx_BT):
        """Token embeddings; times sqrt(D) with the sinusoidal table, as the Transformer paper
        does, so that the fixed table (values in [-1, 1]) does not drown them."""
        x_BTD = self.wte(idx_BT)
        if self.cfg.position == "sinusoidal":
            x_BTD = x_BTD * math.sqrt(self.cfg.n_embd)
        return x_BTD

    def embed(self, idx_BT, key=None, pos_BT=None):
        pos_BT = jnp.arange(idx_BT.shape[1])[None] if pos_BT is None else pos_BT
        x_BTD = self.tokens(idx_BT) + self.positions(pos_BT)
        return dropout(x_BTD, self.cfg.dropout, key)

    def forward_embeddings(self, x_BTD, key=None, segment_ids_BT=None):
        """Blocks, final norm and tied head: embeddings (B, T, D) -> float32 logits (B, T, V).

        The embeddings already hold the added positions (`embed`); rotary positions 0..T-1 are
        applied inside attention. segment_ids_BT (optional): packed examples; a token attends
        only to earlier tokens of its own segment, and positions restart at each segment."""
        B, T, D = x_BTD.shape
        keys_L = jax.random.split(key, self.cfg.n_layer) if key is not None else None
        block_def, block_state = nnx.split(self.h)
        rope = self.rope(jnp.arange(T)[None] if segment_ids_BT is None
                         else segment_positions(segment_ids_BT))

        def layer(x_ND, xs):
            state, k = xs
            return nnx.merge(block_def, state)(x_ND, T, k, rope, segment_ids_BT), None

        if self.cfg.remat:  # keep only each block's input for the backward; recompute the rest
            layer = jax.checkpoint(layer)
        x_ND, _ = jax.lax.scan(layer, x_BTD.reshape(B * T, D), (block_state, keys_L),
                               unroll=self.cfg.scan_unroll)
        return self.head(x_ND).reshape(B, T, -1)

    def head(self, x_ND):
        """Final LayerNorm and the tied output head: (N, D) -> float32 logits (N, V)."""
        logits_NV = self.wte.attend(self.ln_f(x_ND))
        return logits_NV[:, : self.cfg.vocab_size].astype(jnp.float32)

    def __call__(self, idx_BT, key=None, segment_ids_BT=None):
        k_embd, k_blocks = jax.random.split(key) if key is not None else (None, None)
        pos_BT = None if segment_ids_BT is None else segment_positions(segment_ids_BT)
        return self.forward_embeddings(self.embed(idx_BT, k_embd, pos_BT), k_blocks,
                                       segment_ids_BT)


def split_layers(params: dict) -> list[dict]:
    """The stacked block params (leading axis L) as a list of L per-layer dicts.

    A decode loop slices them once, outside the loop: XLA on CPU copies a slice of the stacked
    weights wherever it is taken, so slicing inside every decode step would read the weights
    twice per token.
    """
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], params["h"]) for i in range(n_layer)]


def forward_cached(graphdef: nnx.GraphDef, params: dict, idx_BT, pos_BT, start, cache: dict,
                   valid_BS, layers: list[dict] | None = None, window: int | None = None):
    """Run T new tokens written at cache slots [start, start + T) -> (logits (B, T, V), cache).

    cache: {"k": (L, B, H, K, S), "v": (L, B, H, S, K)} (`init_cache`). pos_BT: each token's
    position id. valid_BS: which slots hold real tokens (after this call's writes). A query at
    slot start + t sees the slots s <= start + t that are valid: causal over the cache plus the
    padding mask. layers: `split_layers(params)`, when the caller has sliced them already.
    window (static): attend to the first `window` slots only, when the caller knows that no
    later slot is visible (start + T <= window): the same result, fewer bytes read.

    The layers run as a Python loop (not a scan) over one stacked cache updated in place, and
    keys are cached transposed, (K, S) per head: the layout the CPU's matrix-vector product
    wants for q . k, so no step copies the cache (measured: the (S, H, K) layout of `forward`
    made XLA transpose every layer's cache at every step, most of a step's time at batch 64).
    """
    model = merge(graphdef, params)
    cfg = model.cfg
    layers = split_layers(params) if layers is None else layers
    B, T = idx_BT.shape
    H, K, D = cfg.n_head, cfg.head_dim, cfg.n_embd
    S = cache["v"].shape[3] if window is None else window
    x_ND = (model.tokens(idx_BT) + model.positions(pos_BT)).reshape(B * T, D)
    rope = model.rope(pos_BT)
    slots_TS = (start + jnp.arange(T))[:, None] >= jnp.arange(S)[None, :]
    visible_B1TS = (slots_TS[None] & valid_BS[:, None, :S])[:, None]
    block_def, _ = nnx.split(model.h)
    k_cache, v_cache = cache["k"], cache["v"]
    for layer, state in enumerate(layers):
        blk = nnx.merge(block_def, nnx.State(state))
        q, k, v = jnp.split(blk.attn.c_attn(blk.ln_1(x_ND)), 3, axis=-1)
        q, k, v = (t.reshape(B, T, H, K) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q_BHTK, k_BHTK, v_BHTK = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        k_cache = jax.lax.dynamic_update_slice(
            k_cache, k_BHTK.transpose(0, 1, 3, 2)[None].astype(k_cache.dtype),
            (layer, 0, 0, 0, start))
        v_cache = jax.lax.dynamic_update_slice(
            v_cache, v_BHTK[None].astype(v_cache.dtype), (layer, 0, 0, start, 0))
        scores_BHTS = jnp.einsum("bhtk,bhks->bhts", q_BHTK,
                                 k_cache[layer, ..., :S].astype(q.dtype))
        scores_BHTS = scores_BHTS.astype(jnp.float32) / math.sqrt(K)
        scores_BHTS = jnp.where(visible_B1TS, scores_BHTS, jnp.finfo(jnp.float32).min)
        weights_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(q.dtype)
        y_BHTK = jnp.einsum("bhts,bhsk->bhtk", weights_BHTS,
                            v_cache[layer, :, :, :S].astype(q.dtype))
        x_ND = x_ND + blk.attn.c_proj(y_BHTK.transpose(0, 2, 1, 3).reshape(B * T, D))
        x_ND = x_ND + blk.mlp(blk.ln_2(x_ND))
    return model.head(x_ND).reshape(B, T, -1), {"k": k_cache, "v": v_cache}


def init_cache(cfg: ModelConfig, batch: int) -> dict:
    """An empty key/value cache in the compute dtype.

    Keys (L, B, H, K, S), values (L, B, H, S, K)."""
    L, H, K, S = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.block_size
    return {"k": jnp.zeros((L, batch, H, K, S), cfg.dtype),
            "v": jnp.zeros((L, batch, H, S, K), cfg.dtype)}


def init_params(cfg: ModelConfig, key) -> tuple[nnx.GraphDef, dict]:
    """Build the model and split it into (graphdef, params) with params a nested dict of arrays."""
    model = GPT(cfg, nnx.Rngs(params=key))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    """Like init_params, but the params are jax.ShapeDtypeStructs: nothing is allocated."""
    model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(params=0)))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def merge(graphdef: nnx.GraphDef, params: dict) -> GPT:
    return nnx.merge(graphdef, nnx.State(params))


def forward(graphdef: nnx.GraphDef, params: dict, idx_BT, key=None, segment_ids_BT=None):
    """Token ids (B, T) -> float32 logits (B, T, V). Pure: safe under jit, grad and vmap.

    segment_ids_BT (optional, ints): several examples packed in a row, one id each; attention
    stays within an example and positions restart at its first token."""
    return merge(graphdef, params)(idx_BT, key, segment_ids_BT)


def count_params(cfg: ModelConfig, params: dict, non_embedding: bool = True) -> int:
    """Parameters, without the position table and the vocabulary padding (nanoGPT's count)."""
    n = sum(x.size for x in jax.tree.leaves(params))
    n -= (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    if non_embedding and cfg.position == "learned":
        n -= cfg.block_size * cfg.n_embd
    return n


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token: 6N for the weights + 12*L*H*K*T for attention (PaLM, app. B)."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size
