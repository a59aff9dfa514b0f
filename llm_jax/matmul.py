"""The linear layers' matrix products: bfloat16 operands with float32 accumulation
(`model.matmul_dtype`), and a float32 backward that reads x^T row-major (`model.linear_vjp`).

Shapes: N rows (B*T tokens), D inputs, F outputs.

CPUs with AVX-512 BF16 (and GPUs, TPUs) multiply bf16 matrices at about twice the float32 rate.
XLA:CPU in jax 0.10 does so only when the product *returns* float32
(`preferred_element_type=float32`): measured on a 2-core Zen 4, (2048, 384) x (384, 1536) ran at
~360 GFLOP/s with bf16 operands and a float32 result, ~185 in float32, and ~170 when the result
is bf16 too (a rounding pass after the product). So the linear layers round their two operands
to bf16, accumulate and return float32, and everything else (norms, softmax, residual stream,
loss, params, optimizer) stays float32: the numerics of mixed-precision training (bf16 products,
float32 master weights), without a bf16 residual stream.

`model.matmul_dtype=auto` and `model.attention_dtype=auto` (configs/tiny.toml, small.toml)
decide per machine when training starts: bf16 where the devices have fast bf16 products
(`resolve_matmul_dtype`), float32 elsewhere, and float32 products when decoding.

`bf16_matmul` has its own backward (`jax.custom_vjp`) so that the backward products are the
fast kind too: the incoming gradient is rounded to bf16 once, and
- dx = g @ w^T: bf16 operands, float32 result, as the forward;
- dw = x^T @ g: the product over the N rows. XLA:CPU's bf16 path is slow when it contracts the
  leading axis of both operands: it turns the product back into a float32 one (~140-170 GFLOP/s,
  no better than float32), and it is fast on a row-major (D, N) left operand (~260). The
  forward therefore keeps x^T, constrained to a row-major (D, N) layout, as the residual: one
  transposed copy of x per layer, half the size of float32 x.

`transposed_matmul` is the same backward for float32 operands (nothing rounded): there too
XLA's CPU kernels compute dw = x^T @ g faster from a row-major x^T.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

try:  # an experimental API: without it the transposed residual keeps XLA's choice of layout
    from jax.experimental.layout import Layout, with_layout_constraint
except ImportError:  # pragma: no cover
    Layout = with_layout_constraint = None

MATMUL_DTYPES = ("float32", "bfloat16", "auto")
LINEAR_VJPS = ("auto", "xla", "transposed")
_ROWS_BY_COLS = (((1,), (0,)), ((), ()))  # (N, D) x (D, F)
_ROWS_BY_ROWS = (((1,), (1,)), ((), ()))  # (N, F) x (D, F) -> (N, D): g @ w^T


def bf16_matmul(x_ND, w_DF):
    """x @ w with both rounded to bf16, accumulated and returned in float32."""
    return _matmul(x_ND, w_DF, jnp.dtype(x_ND.dtype), jnp.dtype(w_DF.dtype), jnp.bfloat16)


def transposed_matmul(x_ND, w_DF):
    """x @ w in float32, whose backward takes dw from a row-major copy of x^T
    (`model.linear_vjp=transposed`). XLA differentiates a float32 product into dw = x^T g
    contracting the N rows of both operands; its single-threaded CPU kernels ran that product
    at 30-35 GFLOP/s against 40-58 for the others (docs/benchmarks.md), and at the rate of the
    others on a row-major (D, N) left operand. On per-core CPU devices the train step measured
    about 4 % faster with it; on one device using both cores, no faster."""
    return _matmul(x_ND, w_DF, jnp.dtype(x_ND.dtype), jnp.dtype(w_DF.dtype), jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(x_ND, w_DF, x_dtype, w_dtype, operand_dtype):
    del x_dtype, w_dtype
    return lax.dot_general(x_ND.astype(operand_dtype), w_DF.astype(operand_dtype),
                           _ROWS_BY_COLS, preferred_element_type=jnp.float32)


def _matmul_fwd(x_ND, w_DF, x_dtype, w_dtype, operand_dtype):
    del x_dtype, w_dtype
    x_op_ND, w_op_DF = x_ND.astype(operand_dtype), w_DF.astype(operand_dtype)
    y_NF = lax.dot_general(x_op_ND, w_op_DF, _ROWS_BY_COLS, preferred_element_type=jnp.float32)
    # Row-major (D, N) in memory: without the constraint XLA makes the transpose a change of
    # layout, and then runs the backward's product as the slow kind (for bf16 operands, a
    # float32 one: it upcasts both).
    x_op_DN = x_op_ND.T
    if with_layout_constraint is not None:
        x_op_DN = with_layout_constraint(x_op_DN, Layout((0, 1)))
    return y_NF, (x_op_DN, w_op_DF)


def _matmul_bwd(x_dtype, w_dtype, operand_dtype, residuals, g_NF):
    x_op_DN, w_op_DF = residuals
    g_op_NF = g_NF.astype(operand_dtype)
    dx_ND = lax.dot_general(g_op_NF, w_op_DF, _ROWS_BY_ROWS, preferred_element_type=jnp.float32)
    dw_DF = lax.dot_general(x_op_DN, g_op_NF, _ROWS_BY_COLS, preferred_element_type=jnp.float32)
    return dx_ND.astype(x_dtype), dw_DF.astype(w_dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _linear_dot_general(matmul, float32_only: bool = False):
    """A `lax.dot_general` for `nnx.Linear(dot_general=...)`: its (..., D) x (D, F) products go
    through `matmul` (leading axes flattened into rows; with float32_only, float32 ones only);
    any other product is XLA's."""
    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                    **kwargs):
        (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
        if (tuple(contract_l) == (lhs.ndim - 1,) and tuple(contract_r) == (0,) and rhs.ndim == 2
                and not batch_l and not batch_r
                and (not float32_only or lhs.dtype == rhs.dtype == jnp.float32)):
            y_NF = matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
            return y_NF.reshape(*lhs.shape[:-1], rhs.shape[1])
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)

    return dot_general


bf16_dot_general = _linear_dot_general(bf16_matmul)
transposed_dot_general = _linear_dot_general(transposed_matmul, float32_only=True)


def resolve_linear_vjp(linear_vjp: str, per_device: bool) -> str:
    """`model.linear_vjp` with "auto" decided: the transposed backward where the train step runs
    per device on per-core CPU devices (measured faster there only), XLA's elsewhere."""
    if linear_vjp != "auto":
        return linear_vjp
    return "transposed" if per_device else "xla"


def fast_bf16_products(platform: str, cpu_flags: set[str] | None = None) -> bool:
    """Whether devices of this platform multiply bf16 matrices faster than float32 ones: GPUs
    and TPUs do, and CPUs with AVX-512 BF16 or AMX-BF16 instructions. cpu_flags: the flags of
    /proc/cpuinfo (read when None; none off Linux)."""
    if platform in ("gpu", "cuda", "rocm", "tpu"):
        return True
    if platform != "cpu":
        return False
    if cpu_flags is None:
        cpu_flags = _cpu_flags()
    return bool(cpu_flags & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def resolve_matmul_dtype(matmul_dtype: str, platform: str, otherwise: str = "float32") -> str:
    """A dtype option (`model.matmul_dtype`, `model.attention_dtype`) with "auto" decided for
    training on `platform`: bf16 where the devices have fast bf16 products
    (`fast_bf16_products`), `otherwise` elsewhere (without bf16 units XLA:CPU's bf16 products
    are slower than float32 ones: measured 834 against 954 tokens/s on an AVX2 Zen 3,
    docs/benchmarks.md). Any other value is kept as it is."""
    if matmul_dtype != "auto":
        return matmul_dtype
    return "bfloat16" if fast_bf16_products(platform) else otherwise


def resolve_auto_dtypes(model_cfg, platform: str):
    """A ModelConfig with `matmul_dtype` and `attention_dtype` "auto" decided for training on
    `platform` (attention's "otherwise" is "": the compute dtype)."""
    return dataclasses.replace(
        model_cfg, matmul_dtype=resolve_matmul_dtype(model_cfg.matmul_dtype, platform),
        attention_dtype=resolve_matmul_dtype(model_cfg.attention_dtype, platform, otherwise=""))


def dot_general_for(matmul_dtype: str, linear_vjp: str = "xla"):
    """The dot_general the linear layers use for `model.matmul_dtype` and `model.linear_vjp`.
    "auto" is float32 and "xla" here: training resolves both (llm_jax/training.py); decoding
    keeps float32 products, which read each weight once a token (bf16 ones ran slower there on
    the CPU: 150 against 177-217 tokens/s for the "small" shape)."""
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"model.matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
    if linear_vjp not in LINEAR_VJPS:
        raise ValueError(f"model.linear_vjp must be one of {LINEAR_VJPS}, got {linear_vjp!r}")
    if matmul_dtype == "bfloat16":
        return bf16_dot_general
    return transposed_dot_general if linear_vjp == "transposed" else lax.dot_general
