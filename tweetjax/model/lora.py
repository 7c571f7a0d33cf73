"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention and MLP projections, and merging them back.

A targeted projection y = x W (W with input axes I and output axes O, e.g. query [D, H, Dh]: I = (D,), O = (H, Dh))
becomes
    y = x W + (alpha / r) * (dropout(x) A) B        A [I..., r], B [r, O...]
A starts fan-in scaled (like the kernels), B at zero, so an adapted model computes exactly its base model at step 0.
Dims: r the rank (logical axis "lora_rank", unsharded by the default rules); the other axes of A and B carry the
base kernel's logical names (A: W's input axes, B: W's output axes), so adapters shard by the same rules table as
the weight they adapt.

The adapters live next to their kernel (`layers/attention/query_lora_a`, `..._lora_b`; scanned layers keep their
leading "layers" axis), so every param tree walk (checkpoints, sharding report, decode cache spec) sees them as
ordinary params. `is_adapter` names them for the optimizer (which freezes everything else, tweetjax/train/
optimizer.py) and `merge` folds them into the kernels for export. Mixture-of-experts weights are not adapted.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# The module, not its names: layers.MLP calls `adapt`, so layers imports this module while it is itself importing.
from tweetjax.model import layers

A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
RANK_AXIS = "lora_rank"


def adapt(module: nn.Module, name: str, x: jax.Array, y: jax.Array, axes: Sequence[str | None],
          in_ndim: int = 1) -> jax.Array:
  """y (= x contracted with kernel `name` over x's last `in_ndim` axes) plus the adapter's output, when `name` is a
  target of `module.cfg.lora`; y unchanged otherwise. `axes`: the kernel's logical axes, inputs first."""
  cfg = module.cfg
  lora = cfg.lora
  if not lora.adapts(name):
    return y
  batch_ndim = x.ndim - in_ndim
  in_shape, out_shape = x.shape[batch_ndim:], y.shape[batch_ndim:]
  in_axes, out_axes = tuple(axes[:in_ndim]), tuple(axes[in_ndim:])
  r = lora.rank
  a = layers.logical_param(module, name + A_SUFFIX, layers.kernel_init(tuple(range(in_ndim)), in_ndim),
                           in_shape + (r,), in_axes + (RANK_AXIS,), cfg)
  b = layers.logical_param(module, name + B_SUFFIX, nn.initializers.zeros, (r,) + out_shape, (RANK_AXIS,) + out_axes, cfg)
  if lora.dropout and module.has_rng("dropout"):  # training: the loss passes a dropout rng; evaluation does not
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
  dt = cfg.compute_dtype
  h = jnp.tensordot(x, a.astype(dt), axes=in_ndim)  # [..., r]: rank-r, cheap next to the base projection
  # h B as a matmul with a unit batch dimension: a remat policy that keeps matmul outputs without batch dims
  # (dots_no_batch) then recomputes it (rank r: cheap) instead of storing an array as large as the projection's
  # output for every adapted kernel (Llama 7B, 4k tokens per device, fsdp=8: 48.2 -> 29.4 GiB of XLA temporaries).
  h_1xNxR = h.reshape(1, -1, r)
  b_1xRxO = b.astype(dt).reshape(1, r, -1)
  delta = jnp.einsum("inr,iro->ino", h_1xNxR, b_1xRxO).reshape(y.shape)
  return y + (lora.scale * delta).astype(y.dtype)


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def is_adapter_name(name: str) -> bool:
  return name.endswith((A_SUFFIX, B_SUFFIX))


def adapter_mask(params: Any) -> Any:
  """Pytree of bools like `params`: True on adapter leaves (trainable under LoRA), False on base weights."""
  return jax.tree_util.tree_map_with_path(lambda path, _: is_adapter_name(_leaf_name(path)), params)


def split(params: Any) -> tuple[dict, dict]:
  """(base params, adapter params) as two nested dicts with disjoint leaves (missing subtrees dropped)."""
  def walk(tree, keep):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for k, v in tree.items():
      if isinstance(v, dict):
        sub = walk(v, keep)
        if sub:
          out[k] = sub
      elif keep(k):
        out[k] = v
    return out
  return walk(params, lambda k: not is_adapter_name(k)), walk(params, is_adapter_name)


def combine(base: dict, adapters: dict) -> dict:
  """The inverse of `split`: one tree with the leaves of both."""
  out = dict(base)
  for k, v in adapters.items():
    out[k] = combine(out.get(k, {}), v) if isinstance(v, dict) else v
  return out


def has_adapters(params: Any) -> bool:
  return any(jax.tree.leaves(adapter_mask(params)))


def _delta(a: jax.Array, b: jax.Array, kernel: jax.Array) -> jax.Array:
  """A B reshaped to the kernel's shape. A [lead..., I..., r], B [lead..., r, O...] (lead: a scanned layer axis)."""
  lead = a.ndim - 1 + b.ndim - 1 - kernel.ndim
  lead_shape, in_shape, out_shape = a.shape[:lead], a.shape[lead:-1], b.shape[lead + 1:]
  a_2d = a.reshape(lead_shape + (-1, a.shape[-1])).astype(jnp.float32)
  b_2d = b.reshape(lead_shape + (b.shape[lead], -1)).astype(jnp.float32)
  return jnp.matmul(a_2d, b_2d).reshape(lead_shape + in_shape + out_shape)


def merge(params: Any, scale: float) -> dict:
  """Base params with every adapter folded into its kernel: W + scale * A B (in fp32, cast to W's dtype).

  The result is the params tree of the same model without adapters and computes the adapted model's function
  (dropout aside). Works on sharded arrays under jit (the result keeps the kernels' shardings when asked to).
  """
  def walk(tree):
    out = {}
    for k, v in tree.items():
      if isinstance(v, dict):
        out[k] = walk(v)
      elif not is_adapter_name(k):
        a, b = tree.get(k + A_SUFFIX), tree.get(k + B_SUFFIX)
        out[k] = v if a is None else (v.astype(jnp.float32) + scale * _delta(a, b, v)).astype(v.dtype)
    return out
  return walk(params)


def zero_adapters(params: Any) -> Any:
  """The same params with every B set to zero: the adapted model then computes exactly its base model."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if _leaf_name(path).endswith(B_SUFFIX) else x, params)
