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


def shard_log_z_and_target(logits_xV: jax.Array, targets_x: jax.Array, vocab_start: int | jax.Array,
                           vocab_axes: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
  """Inside shard_map, on fp32 logits holding the vocab ids [vocab_start, vocab_start + V_local): every token's
  log-partition over the whole vocab and its target's logit (summed over the `vocab_axes` shards)."""
  # The max only stabilises the exponentials; the result does not depend on it, so no gradient flows through it.
  max_x = lax.stop_gradient(jnp.max(logits_xV, axis=-1))
  if vocab_axes:
    max_x = lax.pmax(max_x, vocab_axes)
  sum_exp_x = jnp.sum(jnp.exp(logits_xV - max_x[..., None]), axis=-1)
  local_target_x = targets_x - vocab_start
  in_shard_x = (local_target_x >= 0) & (local_target_x < logits_xV.shape[-1])
  picked_x = jnp.take_along_axis(logits_xV, jnp.clip(local_target_x, 0, logits_xV.shape[-1] - 1)[..., None],
                                 axis=-1)[..., 0]
  target_logit_x = jnp.where(in_shard_x, picked_x, 0.0)  # zero on the shards that do not hold the target
  if vocab_axes:
    sum_exp_x = lax.psum(sum_exp_x, vocab_axes)
    target_logit_x = lax.psum(target_logit_x, vocab_axes)
  return jnp.log(sum_exp_x) + max_x, target_logit_x


def vocab_parallel_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mesh: Mesh,
                                 rules: Rules) -> tuple[jax.Array, jax.Array]:
  """Per-token (loss, log-partition) with logits sharded as ("act_batch", "act_length", "act_vocab")."""
  vocab_axes = mesh_axes_of("act_vocab", rules)
  logits_spec = logical_to_mesh_spec(("act_batch", "act_length", "act_vocab"), rules)
  tokens_spec = logical_to_mesh_spec(("act_batch", "act_length"), rules)

  def local(logits_bxlxv, targets_bxl):
    logits = logits_bxlxv.astype(jnp.float32)
    vocab_start = lax.axis_index(vocab_axes) * logits.shape[-1] if vocab_axes else 0
    log_z_bxl, target_logit_bxl = shard_log_z_and_target(logits, targets_bxl, vocab_start, vocab_axes)
    return log_z_bxl - target_logit_bxl, log_z_bxl

  return jax.shard_map(local, mesh=mesh, in_specs=(logits_spec, tokens_spec),
                       out_specs=(tokens_spec, tokens_spec))(logits_BxLxV, targets_BxL)
