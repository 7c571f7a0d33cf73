"""Collectives written by hand with jax.shard_map where the SPMD partitioner would do worse.

Vocab-parallel cross-entropy: logits stay sharded on their vocab axis; each device reduces its vocab slice and only
[B, L]-sized partial results cross devices (max, sum of exponentials, the target's logit), so the full [B, L, V]
logits are never gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from tweetjax.parallel.rules import Rules, logical_to_mesh_spec, mesh_axes_of


def dense_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Reference per-token (loss, log-partition) in fp32."""
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return log_z_BxL - target_logit_BxL, log_z_BxL


def vocab_parallel_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mesh: Mesh,
                                 rules: Rules) -> tuple[jax.Array, jax.Array]:
  """Per-token (loss, log-partition) with logits sharded as ("act_batch", "act_length", "act_vocab")."""
  vocab_axes = mesh_axes_of("act_vocab", rules)
  logits_spec = logical_to_mesh_spec(("act_batch", "act_length", "act_vocab"), rules)
  tokens_spec = logical_to_mesh_spec(("act_batch", "act_length"), rules)

  def local(logits_bxlxv, targets_bxl):
    logits = logits_bxlxv.astype(jnp.float32)
    v_local = logits.shape[-1]
    if vocab_axes:
      vocab_start = lax.axis_index(vocab_axes) * v_local
    else:
      vocab_start = 0
    # The max only stabilises the exponentials; the result does not depend on it, so no gradient flows through it.
    max_bxl = lax.stop_gradient(jnp.max(logits, axis=-1))
    if vocab_axes:
      max_bxl = lax.pmax(max_bxl, vocab_axes)
    sum_exp_bxl = jnp.sum(jnp.exp(logits - max_bxl[..., None]), axis=-1)
    local_target_bxl = targets_bxl - vocab_start
    in_slice_bxl = (local_target_bxl >= 0) & (local_target_bxl < v_local)
    picked_bxl = jnp.take_along_axis(logits, jnp.clip(local_target_bxl, 0, v_local - 1)[..., None], axis=-1)[..., 0]
    target_logit_bxl = jnp.where(in_slice_bxl, picked_bxl, 0.0)
    if vocab_axes:
      sum_exp_bxl = lax.psum(sum_exp_bxl, vocab_axes)
      target_logit_bxl = lax.psum(target_logit_bxl, vocab_axes)
    log_z_bxl = jnp.log(sum_exp_bxl) + max_bxl
    return log_z_bxl - target_logit_bxl, log_z_bxl

  return jax.shard_map(local, mesh=mesh, in_specs=(logits_spec, tokens_spec),
                       out_specs=(tokens_spec, tokens_spec))(logits_BxLxV, targets_BxL)
