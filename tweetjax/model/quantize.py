"""Weight formats for sampling: the model's own, bf16 copies, or int8 matmul kernels.

Dims: N rows (tokens), K contracted, M output features, V vocab, D d_model.

Decoding reads every weight once per generated token, so its speed is the weights' bytes (tools/bench.py
--sections=decode). `prepare_weights` converts a params tree once, before generation:

  model     the params as they are (the model's compute dtype);
  bfloat16  every float param in bf16 (computed in bf16); an untied embedding table as its bf16 bits (BitsTable);
  int8      the dense matmul kernels (attention q/k/v/out, MLP gate/up/down, LM head; tied: the embedding) as int8
            with one fp32 scale per output feature (symmetric, max-abs); the rest as in bfloat16. The kernels of
            one input (q/k/v, gate/up) are concatenated into one (`fuse_kernels`): one dot each in the decode loop,
            and no concatenation per generate call. The product quantises
            its input rows to int8 too (one max-abs scale per row, at run time) and runs an int8 x int8 -> int32
            dot: XLA keeps a weight-only int8 kernel's dequantisation out of the decode loop (loop-invariant code
            motion), so only an int8 dot reads int8 weights on every token. XLA:CPU hands those dots to its AMX-INT8 /
            AVX512-VNNI kernels (YNNPACK), with the same canonical-layout rule as bf16 (tweetjax/model/matmul.py).

Which params are kernels, and which of their axes are contracted, is fixed by the model (names below); a leading
"layers" axis (scanned layers) is kept as is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

WEIGHT_FORMATS = ("model", "bfloat16", "int8")

# param path suffix -> (leading contracted axes, rank of one layer's kernel); more axes = a leading "layers" axis
_KERNELS = {("attention", "query"): (1, 3), ("attention", "key"): (1, 3), ("attention", "value"): (1, 3),
            ("attention", "out"): (2, 3), ("mlp", "gate"): (1, 2), ("mlp", "up"): (1, 2), ("mlp", "down"): (1, 2),
            ("lm_head",): (1, 2)}


@flax.struct.dataclass
class Int8Kernel:
  """An int8 kernel [(layers,) *contracted, *out] and its fp32 scale per output feature [(layers,) *out]."""
  q: jax.Array
  scale: jax.Array
  num_contracted: int = flax.struct.field(pytree_node=False, default=1)
  # Set on a kernel that `fuse_kernels` concatenated with the others of its input: each member's output shape,
  # in order; q and scale then hold all of them along one flat output axis.
  fused_outs: tuple = flax.struct.field(pytree_node=False, default=())

  @property
  def shape(self):
    return self.q.shape

  @property
  def ndim(self):
    return self.q.ndim


@flax.struct.dataclass
class Int8FusedMember:
  """The place of a kernel that `fuse_kernels` moved into its group's first member: its output `index` there."""
  index: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class Int8Table:
  """The (tied) embedding table [V, D] as int8 rows with an fp32 scale per row, plus its transpose [D, V] for the
  LM-head product (row-major, as the int8 dot wants it)."""
  q_VxD: jax.Array
  q_DxV: jax.Array
  scale_V: jax.Array


@flax.struct.dataclass
class BitsTable:
  """An untied bf16 embedding table [V, D] as its uint16 bit patterns. XLA:CPU gathers from a bf16 array by
  converting all of it to fp32 first, and hoists that convert out of the decode loop: a 2x-sized copy of the table
  on every generate call (~10 ms for small.py's 32k x 512). A uint16 gather moves only the rows it takes."""
  bits_VxD: jax.Array

  @property
  def shape(self):
    return self.bits_VxD.shape

  def take(self, ids: jax.Array) -> jax.Array:
    """The bf16 rows of `ids` ([..., D])."""
    return jax.lax.bitcast_convert_type(jnp.take(self.bits_VxD, ids, axis=0), jnp.bfloat16)


def symmetric_int8(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(q int8, scale fp32) with x ~ q * scale: scale = max|x| over `axes` / 127 (1 where that is 0), kept as size-1
  axes so that it broadcasts against x."""
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def quantize_kernel(w: jax.Array, num_contracted: int, rank: int) -> Int8Kernel:
  """Symmetric per-output-feature int8 (the scale from the contracted axes). `rank` is one layer's kernel rank; an
  extra leading axis (stacked layers) is kept."""
  first = w.ndim - rank
  axes = tuple(range(first, first + num_contracted))
  q, scale = symmetric_int8(w, axes)
  return Int8Kernel(q=q, scale=jnp.squeeze(scale, axes), num_contracted=num_contracted)


def quantize_table(table_VxD: jax.Array) -> Int8Table:
  q, scale_Vx1 = symmetric_int8(table_VxD, (1,))
  return Int8Table(q_VxD=q, q_DxV=q.T, scale_V=scale_Vx1[:, 0])


# Fewer rows than this are zero-padded up to it: XLA:CPU runs an int8 dot of fewer than 16 rows on a far slower
# kernel (small's batch-1 decode matmuls: ~3x the time of the same dot with 16 rows).
INT8_MIN_ROWS = 16


def int8_matmul(x_NxK: jax.Array, q_KxM: jax.Array, scale_M: jax.Array, dtype) -> jax.Array:
  """x @ (q * scale) with x quantised per row to int8: an int8 x int8 -> int32 dot, rescaled in fp32."""
  N = x_NxK.shape[0]
  if N < INT8_MIN_ROWS and jax.default_backend() == "cpu":
    padded = jnp.pad(x_NxK, ((0, INT8_MIN_ROWS - N), (0, 0)))
    return int8_matmul(padded, q_KxM, scale_M, dtype)[:N]
  xq_NxK, x_scale_Nx1 = symmetric_int8(x_NxK, (1,))
  acc_NxM = jnp.dot(xq_NxK, q_KxM, preferred_element_type=jnp.int32)
  return (acc_NxM.astype(jnp.float32) * x_scale_Nx1 * scale_M[None, :].astype(jnp.float32)).astype(dtype)


def int8_contract(x: jax.Array, w: Int8Kernel, dtype) -> jax.Array:
  """`contract(x, w, w.num_contracted)` for an int8 kernel (unstacked: the layer scan has sliced it)."""
  n = w.num_contracted
  lead, contracted = x.shape[:x.ndim - n], x.shape[x.ndim - n:]
  K, out = math.prod(contracted), w.q.shape[n:]
  y_NxM = int8_matmul(x.reshape(math.prod(lead), K), w.q.reshape(K, math.prod(out)), w.scale.reshape(-1), dtype)
  return y_NxM.reshape(*lead, *out)


def int8_contract_fused(x: jax.Array, kernels, dtype) -> list[jax.Array]:
  """`int8_contract(x, w)` for the kernels of one input (q/k/v, gate/up): one quantisation of x and one dot over
  the kernels' output features, split afterwards; each dot is a kernel launch that costs about as much as a small
  dot's arithmetic at decode sizes. The kernels come fused by `prepare_weights` (the first one holds them all):
  concatenating them here would redo it on every call (~10 ms of small.py's batch-1 prefill)."""
  fused = kernels[0]
  if not fused.fused_outs or len(fused.fused_outs) != len(kernels):
    raise ValueError(f"int8_contract_fused takes the kernels fuse_kernels grouped; got {len(kernels)} with "
                     f"fused_outs={fused.fused_outs}")
  y = int8_contract(x, fused, dtype)
  lead = y.shape[:-1]
  sizes = [math.prod(o) for o in fused.fused_outs]
  pieces = jnp.split(y, [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)], axis=-1)
  return [p.reshape(*lead, *o) for p, o in zip(pieces, fused.fused_outs)]


# Kernels of one input, fused into one dot by `prepare_weights` (int8): the module's param names, in the order
# the module passes them to matmul.contract_each.
FUSED_GROUPS = (("query", "key", "value"), ("gate", "up"))


def fuse_kernels(kernels: list[Int8Kernel], out_ranks: list[int]) -> Int8Kernel:
  """The kernels (same input, same contracted axes, maybe a leading layers axis) as one Int8Kernel with their
  output features concatenated; `out_ranks`: each kernel's number of output axes."""
  n = kernels[0].num_contracted
  flat_q = [w.q.reshape(w.q.shape[:w.q.ndim - r] + (-1,)) for w, r in zip(kernels, out_ranks)]
  flat_scale = [w.scale.reshape(w.scale.shape[:w.scale.ndim - r] + (-1,)) for w, r in zip(kernels, out_ranks)]
  outs = tuple(w.q.shape[w.q.ndim - r:] for w, r in zip(kernels, out_ranks))
  return Int8Kernel(q=jnp.concatenate(flat_q, axis=-1), scale=jnp.concatenate(flat_scale, axis=-1),
                    num_contracted=n, fused_outs=outs)


def _fuse_groups(tree):
  """Every module's q/k/v and gate/up int8 kernels fused (FUSED_GROUPS), the later members left as markers."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: _fuse_groups(v) for k, v in tree.items()}
  for group in FUSED_GROUPS:
    if all(isinstance(out.get(name), Int8Kernel) for name in group):
      kernels = [out[name] for name in group]
      module = "attention" if group[0] == "query" else "mlp"
      out_ranks = [_KERNELS[(module, name)][1] - _KERNELS[(module, name)][0] for name in group]
      out[group[0]] = fuse_kernels(kernels, out_ranks)
      for i, name in enumerate(group[1:], 1):
        out[name] = Int8FusedMember(index=i)
  return out


def prepare_weights(params, weights: str, tied_embeddings: bool):
  """`params` in the sampling weight format `weights` (see the module docstring)."""
  if weights not in WEIGHT_FORMATS:
    raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_FORMATS}")
  params = nn.meta.unbox(params)
  if weights == "model":
    return params

  def convert(path, leaf):
    names = tuple(getattr(p, "key", str(p)) for p in path)
    if weights == "int8":
      kernel = _KERNELS.get(names[-2:]) or _KERNELS.get(names[-1:])
      if kernel:
        return quantize_kernel(leaf, *kernel)
      if tied_embeddings and names[-2:] == ("embed", "embedding"):
        return quantize_table(leaf)
    if not tied_embeddings and names[-2:] == ("embed", "embedding"):
      return BitsTable(jax.lax.bitcast_convert_type(leaf.astype(jnp.bfloat16), jnp.uint16))
    return leaf.astype(jnp.bfloat16) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

  params = jax.tree_util.tree_map_with_path(convert, params)
  return _fuse_groups(params) if weights == "int8" else params
