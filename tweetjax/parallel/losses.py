"""Tiled LM head + cross-entropy: final hidden states -> loss without ever holding the [tokens, V] logits.

Dims: B batch, L length, D d_model, V vocab (Vl: one vocab shard), N tokens on one device, C chunks of c tokens.

`config.model.logits_chunk = c > 0` selects it (tweetjax/train/step.py). In one `jax.shard_map` over the mesh, every
device runs through its N tokens c at a time: the chunk's logits on its vocab shard, finalize(h_cxD W_DxVl) (soft-cap,
vocab-padding mask: the model's own LM head function), the log-partition and target logit reduced over the vocab
shards ([c]-sized pmax/psum, as in vocab_parallel_cross_entropy) and the chunk's share of the loss. One chunk's logits
exist at a time: c x Vl x 4 bytes plus a few same-sized elementwise temporaries, where the dense path holds N x Vl
logits, their softmax and their gradient.

Gradient. The result is a scalar, total = sum_t w_t (ce_t + z_loss_weight * log_z_t^2), so its cotangent is one number
g, and d total / d logits_t = w_t ((1 + 2 z_loss_weight log_z_t) softmax_t - onehot(target_t)) does not depend on g.
The custom VJP's forward rule therefore also forms the gradients while each chunk's logits are at hand,
dh_cxD = dlogits W^T and dW += h_c^T dlogits, and the backward rule only scales them by g. That is the dense head's
three matmuls, where recomputing every chunk's logits in the backward would take four, and it holds no more memory: the
residuals ([N, D] and the [D, Vl] weight gradient) are what a backward would allocate, and the loss is the last op of
the forward, its backward the first of the backward. Evaluation (no differentiation) runs the forward alone.

Sharding: tokens (hidden states, targets, weights) as ("act_batch", "act_length"), the weight's vocab axis as
"act_vocab"; the weight's d_model axis is gathered (its FSDP shards) at the shard_map boundary like any FSDP weight,
and its gradient leaves through a reduce-scatter over the mesh axes of "embed" (an all-reduce over the other token
axes), so it comes out already in the param's shards.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from tweetjax.parallel.rules import Rules, logical_to_mesh_spec, mesh_axes_of
from tweetjax.parallel.shard_map_ops import shard_log_z_and_target

# finalize(z_cxVl, vocab_start) -> logits: the elementwise end of the LM head (tweetjax.model.layers.finalize_logits).
Finalize = Callable[[jax.Array, jax.Array | int], jax.Array]


def tiled_cross_entropy(hidden_BxLxD: jax.Array, weight: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array,
                        *, vocab_axis: int, finalize: Finalize, chunk: int, z_loss_weight: float, mesh: Mesh,
                        rules: Rules, compute_dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(total, ce_sum, z_sum): sums over tokens of w_t (ce_t + z_loss_weight log_z_t^2), w_t ce_t and w_t log_z_t^2.

  `weight` is [D, V] (vocab_axis=1) or [V, D] (vocab_axis=0, a tied embedding). Only `total` carries a gradient;
  ce_sum and z_sum are metrics.
  """
  if mesh_axes_of("act_embed", rules):
    raise ValueError("config.model.logits_chunk > 0 needs the hidden states' d_model unsharded (logical axis "
                     f"'act_embed' -> {mesh_axes_of('act_embed', rules)} in config.logical_axis_rules)")
  token_axes = mesh_axes_of("act_batch", rules) + mesh_axes_of("act_length", rules)
  vocab_axes = mesh_axes_of("act_vocab", rules)
  embed_axes = mesh_axes_of("embed", rules)
  # The weight gradient is reduce-scattered straight into the param's d_model shards when those axes split the
  # tokens (FSDP); an axis that does not is left to XLA's resharding after an all-reduce.
  scatter_axes = embed_axes if set(embed_axes) <= set(token_axes) else ()
  hidden_spec = logical_to_mesh_spec(("act_batch", "act_length", None), rules)
  tokens_spec = logical_to_mesh_spec(("act_batch", "act_length"), rules)
  vocab_part = vocab_axes if len(vocab_axes) != 1 else vocab_axes[0]
  weight_spec = P(vocab_part or None, None) if vocab_axis == 0 else P(None, vocab_part or None)
  scatter_part = (scatter_axes if len(scatter_axes) != 1 else scatter_axes[0]) or None
  grad_spec = P(vocab_part or None, scatter_part) if vocab_axis == 0 else P(scatter_part, vocab_part or None)

  local = functools.partial(_local_loss, vocab_axis=vocab_axis, finalize=finalize, chunk=chunk,
                            z_loss_weight=z_loss_weight, compute_dtype=compute_dtype, token_axes=token_axes,
                            vocab_axes=vocab_axes, scatter_axes=scatter_axes)
  in_specs = (hidden_spec, weight_spec, tokens_spec, tokens_spec)
  forward = jax.shard_map(functools.partial(local, with_grad=False), mesh=mesh, in_specs=in_specs,
                          out_specs=(P(), P()))
  forward_and_grads = jax.shard_map(functools.partial(local, with_grad=True), mesh=mesh, in_specs=in_specs,
                                    out_specs=(P(), P(), hidden_spec, grad_spec))

  # The weight enters the shard_map in the compute dtype: its FSDP all-gather then moves bf16, not fp32 params.
  @jax.custom_vjp
  def loss(h, w, targets, weights):
    ce_sum, z_sum = forward(h, w.astype(compute_dtype), targets, weights)
    return ce_sum + z_loss_weight * z_sum, ce_sum, z_sum

  def loss_fwd(h, w, targets, weights):
    ce_sum, z_sum, dh, dw = forward_and_grads(h, w.astype(compute_dtype), targets, weights)
    return (ce_sum + z_loss_weight * z_sum, ce_sum, z_sum), (dh, dw)

  def loss_bwd(residuals, cotangents):
    dh, dw = residuals
    g = cotangents[0]  # ce_sum and z_sum leave through stop_gradient: their cotangents are zero
    return (g * dh).astype(hidden_BxLxD.dtype), (g * dw).astype(weight.dtype), None, None

  loss.defvjp(loss_fwd, loss_bwd)
  total, ce_sum, z_sum = loss(hidden_BxLxD.astype(compute_dtype), weight, targets_BxL, weights_BxL)
  return total, lax.stop_gradient(ce_sum), lax.stop_gradient(z_sum)


def _local_loss(h_bxlxD, w, targets_bxl, weights_bxl, *, with_grad: bool, vocab_axis: int, finalize: Finalize,
                chunk: int, z_loss_weight: float, compute_dtype, token_axes, vocab_axes, scatter_axes):
  """One device's tokens against its vocab shard, c tokens at a time (inside shard_map)."""
  b, l, D = h_bxlxD.shape
  n = b * l
  c = min(chunk, n)
  num_chunks = -(-n // c)
  pad = num_chunks * c - n  # padded tokens have weight 0: no loss, no gradient

  def chunks(x, fill=0):
    x = x.reshape(n, *x.shape[2:])
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(num_chunks, c, *x.shape[1:])

  h_CxcxD = chunks(h_bxlxD)
  targets_Cxc, weights_Cxc = chunks(targets_bxl), chunks(weights_bxl.astype(jnp.float32))
  v_local = w.shape[vocab_axis]
  vocab_start = lax.axis_index(vocab_axes) * v_local if vocab_axes else 0
  ids_Vl = vocab_start + jnp.arange(v_local)
  matmul = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

  def chunk_stats(h_cxD, targets_c, weights_c):
    z_cxVl = matmul("cd,vd->cv" if vocab_axis == 0 else "cd,dv->cv", h_cxD, w)
    logits_cxVl, finalize_vjp = jax.vjp(lambda z: finalize(z, vocab_start), z_cxVl)
    log_z_c, target_logit_c = shard_log_z_and_target(logits_cxVl, targets_c, vocab_start, vocab_axes)
    sums = (jnp.sum(weights_c * (log_z_c - target_logit_c)), jnp.sum(weights_c * jnp.square(log_z_c)))
    return sums, logits_cxVl, log_z_c, finalize_vjp

  def forward_body(carry, xs):
    (ce, zs), _, _, _ = chunk_stats(*xs)
    return (carry[0] + ce, carry[1] + zs), None

  def grad_body(carry, xs):
    ce_acc, z_acc, dw_DxVl = carry
    h_cxD, hT_Dxc, targets_c, weights_c = xs
    (ce, zs), logits_cxVl, log_z_c, finalize_vjp = chunk_stats(h_cxD, targets_c, weights_c)
    probs_cxVl = jnp.exp(logits_cxVl - log_z_c[:, None])
    is_target_cxVl = ids_Vl[None, :] == targets_c[:, None]
    coef_c = weights_c * (1.0 + 2.0 * z_loss_weight * log_z_c)
    dlogits_cxVl = coef_c[:, None] * probs_cxVl - jnp.where(is_target_cxVl, weights_c[:, None], 0.0)
    (dz_cxVl,) = finalize_vjp(dlogits_cxVl)
    dz_cxVl = dz_cxVl.astype(compute_dtype)
    dh_cxD = matmul("cv,vd->cd" if vocab_axis == 0 else "cv,dv->cd", dz_cxVl, w)
    # h^T from a copy made before the loop: XLA:CPU runs a dot whose left operand contracts its leading axis on a
    # slower path (Eigen instead of YNNPACK) than the same dot of a transposed-in-memory operand.
    dw_DxVl = dw_DxVl + matmul("dc,cv->dv", hT_Dxc, dz_cxVl)
    return (ce_acc + ce, z_acc + zs, dw_DxVl), dh_cxD

  # Loop carries start as zeros that vary over the axes their updates vary over (shard_map's manual-axis types).
  zero = _varying(jnp.zeros((), jnp.float32), token_axes)
  if not with_grad:
    (ce_sum, z_sum), _ = lax.scan(forward_body, (zero, zero), (h_CxcxD, targets_Cxc, weights_Cxc))
    return _token_psum(ce_sum, token_axes), _token_psum(z_sum, token_axes)

  dw0 = _varying(jnp.zeros((D, v_local), jnp.float32), token_axes + vocab_axes)
  hT_CxDxc = jnp.swapaxes(h_CxcxD, 1, 2)
  (ce_sum, z_sum, dw), dh_CxcxD = lax.scan(grad_body, (zero, zero, dw0), (h_CxcxD, hT_CxDxc, targets_Cxc, weights_Cxc))
  dh_nxD = dh_CxcxD.reshape(num_chunks * c, D)[:n]
  if vocab_axes:
    dh_nxD = lax.psum(dh_nxD, vocab_axes)  # each vocab shard holds part of every token's gradient
  if vocab_axis == 0:
    dw = dw.T
  embed_dim = 1 if vocab_axis == 0 else 0
  dw = _token_psum(dw, tuple(a for a in token_axes if a not in scatter_axes))
  if scatter_axes:
    dw = lax.psum_scatter(dw, scatter_axes, scatter_dimension=embed_dim, tiled=True)
  return (_token_psum(ce_sum, token_axes), _token_psum(z_sum, token_axes),
          dh_nxD.reshape(b, l, D).astype(h_bxlxD.dtype), dw)


def _varying(x, axes):
  return lax.pcast(x, tuple(axes), to="varying") if axes else x


def _token_psum(x, axes):
  return lax.psum(x, axes) if axes else x
