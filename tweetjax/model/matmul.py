"""Matrix products in the form the backend's fastest kernels take: one switch (`model.matmul_impl`) for the model.

Dims: N rows (tokens), K contracted, M output features.

`xla`: `x @ w` in the compute dtype, as written; autodiff makes the backward. Right for GPUs (cuBLAS/cuDNN accumulate
bf16 in fp32 whatever the HLO says), for fp32 and for CPUs without bf16 dot units.

`cpu_bf16`: what XLA:CPU (jaxlib 0.10.2) needs to run a bf16 matmul on the CPU's bf16 dot units (AMX tiles or
AVX512-BF16, through its YNNPACK library calls) instead of rewriting it into an fp32 one. A dot reaches YNNPACK only
as bf16 x bf16 -> fp32 with both operands row-major and untransposed ([N, K] x [K, M]); a bf16 -> bf16 dot, a mixed
fp32 x bf16 one (what autodiff of a bf16 x bf16 -> fp32 dot produces: an fp32 cotangent) or one whose operand is a
transpose (JAX lowers `w.T` to a layout-changing bitcast, which XLA then folds into the dot) is upcast to fp32 and runs
on the fp32 kernels, at a third of the bf16 rate on a Sapphire Rapids core (benchmarks/RESULTS.md). So the
product is a custom VJP whose three dots (forward, input gradient, weight gradient) are all of that form; the
transposed operands of the two gradient dots are materialised as row-major copies (`row_major_transpose`), which
costs one pass over the smaller of the two [N, .] activations per matmul. The weight gradient comes out of the dot
in fp32 and is cast to the parameter's dtype once, so fp32 master weights get an fp32-accumulated gradient.

`auto` (default): `cpu_bf16` when the compute dtype is bfloat16, JAX's default backend is the CPU and the CPU has
bf16 dot units (tweetjax/perf/cpu.py), else `xla`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from tweetjax.model import quantize
from tweetjax.model.config import MATMUL_IMPLS
from tweetjax.perf import cpu


def bf16_on_cpu(compute_dtype) -> bool:
  """bf16 compute with the CPU as JAX's default backend: where XLA:CPU's bf16 rewrites apply."""
  return jnp.dtype(compute_dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"


def resolve(impl: str, compute_dtype) -> str:
  """The implementation `impl` stands for with this compute dtype on the current default backend."""
  if impl not in MATMUL_IMPLS:
    raise ValueError(f"config.model.matmul_impl={impl!r}: expected one of {MATMUL_IMPLS}")
  if impl != "auto":
    return impl
  return "cpu_bf16" if bf16_on_cpu(compute_dtype) and cpu.has_bf16_dot_units() else "xla"


def row_major_transpose(x_AxB: jax.Array) -> jax.Array:
  """x.T as a new row-major array. `x.T` itself lowers to a bitcast with a column-major layout (no data moves),
  which XLA:CPU then treats as a transposed dot operand; going through a rank-3 transpose forces a real copy."""
  A, B = x_AxB.shape
  x_BxA = jnp.transpose(x_AxB[:, :, None], (1, 0, 2)).reshape(B, A)
  # Without the barrier XLA's simplifier folds the copy back into the consuming dot's dimension numbers (after it
  # decided the dot's dtypes), leaving a transposed bf16 dot that no XLA:CPU kernel runs.
  return jax.lax.optimization_barrier(x_BxA)


def _dot_f32(a_NxK: jax.Array, b_KxM: jax.Array) -> jax.Array:
  return jnp.dot(a_NxK, b_KxM, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_bf16_matmul(x_NxK: jax.Array, w_KxM: jax.Array, w_dtype) -> jax.Array:
  return _dot_f32(x_NxK, w_KxM.astype(x_NxK.dtype)).astype(x_NxK.dtype)


def _cpu_bf16_fwd(x_NxK, w_KxM, w_dtype):
  w_KxM = w_KxM.astype(x_NxK.dtype)  # saved in the compute dtype: the copy the forward makes anyway
  return _dot_f32(x_NxK, w_KxM).astype(x_NxK.dtype), (x_NxK, w_KxM)


def _cpu_bf16_bwd(w_dtype, residuals, g_NxM):
  x_NxK, w_KxM = residuals
  g_NxM = g_NxM.astype(x_NxK.dtype)
  dx_NxK = _dot_f32(g_NxM, row_major_transpose(w_KxM)).astype(x_NxK.dtype)
  K, M = w_KxM.shape
  if K <= M:  # transpose the smaller activation: x^T [K, N] x g [N, M]
    dw_KxM = _dot_f32(row_major_transpose(x_NxK), g_NxM)
  else:  # (g^T [M, N] x x [N, K])^T, the fp32 transpose being weight-sized; the barrier keeps XLA from turning
    # transpose(dot(a, b)) into dot(b^T, a^T), a transposed dot again
    dw_MxK = jax.lax.optimization_barrier(_dot_f32(row_major_transpose(g_NxM), x_NxK))
    dw_KxM = row_major_transpose(dw_MxK)
  return dx_NxK, dw_KxM.astype(w_dtype)


_cpu_bf16_matmul.defvjp(_cpu_bf16_fwd, _cpu_bf16_bwd)


def matmul(x_NxK: jax.Array, w_KxM, impl: str, dtype) -> jax.Array:
  """x [N, K] @ w [K, M] in the compute `dtype` (the weight is cast here; its gradient keeps its own dtype). An
  int8 sampling kernel (tweetjax/model/quantize.py) runs as an int8 dot."""
  if isinstance(w_KxM, quantize.Int8Kernel):
    return quantize.int8_contract(x_NxK, w_KxM, dtype)
  if resolve(impl, dtype) == "cpu_bf16" and jnp.dtype(dtype) == jnp.bfloat16:
    return _cpu_bf16_matmul(x_NxK.astype(dtype), w_KxM, jnp.dtype(w_KxM.dtype))
  return x_NxK.astype(dtype) @ w_KxM.astype(dtype)


def contract_each(x: jax.Array, ws, num_contracted: int, impl: str, dtype) -> list[jax.Array]:
  """[contract(x, w, ...) for w in ws]; int8 sampling kernels that quantize.prepare_weights fused (the first
  holds them all) run as a single dot (quantize.int8_contract_fused)."""
  if isinstance(ws[0], quantize.Int8Kernel) and ws[0].fused_outs:
    return quantize.int8_contract_fused(x, ws, dtype)
  return [contract(x, w, num_contracted, impl, dtype) for w in ws]


def contract(x: jax.Array, w: jax.Array, num_contracted: int, impl: str, dtype) -> jax.Array:
  """Contracts the last `num_contracted` dims of x with the first of w (`jnp.tensordot(x, w, num_contracted)`),
  e.g. [B, L, D] x [D, H, Dh] -> [B, L, H, Dh] (1) or [B, L, H, Dh] x [H, Dh, D] -> [B, L, D] (2)."""
  if isinstance(w, quantize.Int8Kernel):
    return quantize.int8_contract(x, w, dtype)
  if resolve(impl, dtype) != "cpu_bf16":
    return jnp.tensordot(x.astype(dtype), w.astype(dtype), num_contracted)
  lead, contracted = x.shape[:x.ndim - num_contracted], x.shape[x.ndim - num_contracted:]
  K, out = math.prod(contracted), w.shape[num_contracted:]
  y_NxM = matmul(x.reshape(math.prod(lead), K), w.reshape(K, math.prod(out)), impl, dtype)
  return y_NxM.reshape(*lead, *out)
