"""Matrix products with bfloat16 operands and float32 accumulation (`model.matmul_dtype`).

Shapes: N rows (B*T tokens), D inputs, F outputs.

CPUs with AVX-512 BF16 (and GPUs, TPUs) multiply bf16 matrices at about twice the float32 rate.
XLA:CPU in jax 0.10 does so only when the product *returns* float32
(`preferred_element_type=float32`): measured on a 2-core Zen 4, (2048, 384) x (384, 1536) ran at
~360 GFLOP/s with bf16 operands and a float32 result, ~185 in float32, and ~170 when the result
is bf16 too (a rounding pass after the product). So the linear layers round their two operands
to bf16, accumulate and return float32, and everything else (norms, softmax, residual stream,
loss, params, optimizer) stays float32: the numerics of mixed-precision training (bf16 products,
float32 master weights), without a bf16 residual stream.

`bf16_matmul` has its own backward (`jax.custom_vjp`) so that the backward products are the
fast kind too: the incoming gradient is rounded to bf16 once, and
- dx = g @ w^T: bf16 operands, float32 result, as the forward;
- dw = x^T @ g: the product over the N rows. XLA:CPU's bf16 path is slow when it contracts the
  leading axis of both operands: it turns the product back into a float32 one (~140-170 GFLOP/s,
  no better than float32), and it is fast on a row-major (D, N) left operand (~260). The
  forward therefore keeps x^T, constrained to a row-major (D, N) layout, as the residual: one
  transposed copy of x per layer, half the size of float32 x.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

try:  # an experimental API: without it the transposed residual keeps XLA's choice of layout
    from jax.experimental.layout import Layout, with_layout_constraint
except ImportError:  # pragma: no cover
    Layout = with_layout_constraint = None

MATMUL_DTYPES = ("float32", "bfloat16")
_ROWS_BY_COLS = (((1,), (0,)), ((), ()))  # (N, D) x (D, F)
_ROWS_BY_ROWS = (((1,), (1,)), ((), ()))  # (N, F) x (D, F) -> (N, D): g @ w^T


def bf16_matmul(x_ND, w_DF):
    """x @ w with both rounded to bf16, accumulated and returned in float32."""
    return _bf16_matmul(x_ND, w_DF, jnp.dtype(x_ND.dtype), jnp.dtype(w_DF.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bf16_matmul(x_ND, w_DF, x_dtype, w_dtype):
    del x_dtype, w_dtype
    return lax.dot_general(x_ND.astype(jnp.bfloat16), w_DF.astype(jnp.bfloat16), _ROWS_BY_COLS,
                           preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(x_ND, w_DF, x_dtype, w_dtype):
    del x_dtype, w_dtype
    x_bf_ND, w_bf_DF = x_ND.astype(jnp.bfloat16), w_DF.astype(jnp.bfloat16)
    y_NF = lax.dot_general(x_bf_ND, w_bf_DF, _ROWS_BY_COLS, preferred_element_type=jnp.float32)
    # Row-major (D, N) in memory: without the constraint XLA makes the transpose a change of
    # layout, and then runs the backward's product as a float32 one (it upcasts both operands).
    x_bf_DN = x_bf_ND.T
    if with_layout_constraint is not None:
        x_bf_DN = with_layout_constraint(x_bf_DN, Layout((0, 1)))
    return y_NF, (x_bf_DN, w_bf_DF)


def _bf16_matmul_bwd(x_dtype, w_dtype, residuals, g_NF):
    x_bf_DN, w_bf_DF = residuals
    g_bf_NF = g_NF.astype(jnp.bfloat16)
    dx_ND = lax.dot_general(g_bf_NF, w_bf_DF, _ROWS_BY_ROWS, preferred_element_type=jnp.float32)
    dw_DF = lax.dot_general(x_bf_DN, g_bf_NF, _ROWS_BY_COLS, preferred_element_type=jnp.float32)
    return dx_ND.astype(x_dtype), dw_DF.astype(w_dtype)


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                     **kwargs):
    """A `lax.dot_general` for `nnx.Linear(dot_general=...)`: its (..., D) x (D, F) products go
    through `bf16_matmul` (leading axes flattened into rows); any other product is float32."""
    del precision, preferred_element_type
    (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
    if (tuple(contract_l) == (lhs.ndim - 1,) and tuple(contract_r) == (0,) and rhs.ndim == 2
            and not batch_l and not batch_r):
        y_NF = bf16_matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
        return y_NF.reshape(*lhs.shape[:-1], rhs.shape[1])
    return lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)


def dot_general_for(matmul_dtype: str):
    """The dot_general the linear layers use for `model.matmul_dtype`."""
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"model.matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
    return bf16_dot_general if matmul_dtype == "bfloat16" else lax.dot_general
