"""Loss and the jitted train/eval steps.

The batch follows the data contract: inputs, targets, segment_ids, positions (int32 [B, L]) and weights (float32
[B, L], 0 on padding). The loss is a token mean over non-pad targets; with microbatches the per-microbatch sums are
divided by the whole batch's token count, so k microbatches give the same update as one big batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tweetjax.model import moe
from tweetjax.model.layers import finalize_logits
from tweetjax.parallel.context import context_shards, load_balance
from tweetjax.parallel.losses import tiled_cross_entropy
from tweetjax.parallel.rules import Rules, batch_sharding, mesh_context, replicated
from tweetjax.parallel.shard_map_ops import vocab_parallel_cross_entropy
from tweetjax.train.state import StateLayout, TrainState

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


@dataclasses.dataclass(frozen=True)
class LossFn:
  """Sum of per-token losses (and metrics) of one (micro)batch; divide by the token count outside."""
  model: nn.Module
  mesh: Mesh
  rules: Rules
  z_loss_weight: float = 0.0
  # Stochastic layers (LoRA dropout) draw from key(dropout_seed) folded with the step: nothing to checkpoint.
  dropout_seed: int | None = None

  def __call__(self, params: Any, batch: Batch, rng: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """rng: the dropout key of this (micro)batch in training; None (evaluation) is deterministic."""
    cfg = self.model.cfg
    shards = context_shards(self.mesh, self.rules)
    if shards > 1:  # the sequence is split over `context`: every shard gets an early and a late chunk
      batch = load_balance(batch, shards)
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    variables = {"params": params}
    mutable = [moe.MOE_STATS] if cfg.num_experts else []  # MoE layers sow router losses and load statistics
    kwargs = {"token_index_BxL": batch["token_index"]} if "token_index" in batch else {}
    kwargs["rngs"] = {} if rng is None else {"dropout": rng}
    weights_BxL = batch["weights"].astype(jnp.float32)
    if cfg.logits_chunk:  # tiled LM head + loss: hidden states in, no [B, L, V] logits
      (hidden_BxLxD, head), stats = self.model.apply(variables, *inputs, logits=False, mutable=mutable, **kwargs)
      total, ce_sum, z_sum = tiled_cross_entropy(
          hidden_BxLxD, head.weight, batch["targets"], weights_BxL, vocab_axis=head.vocab_axis,
          finalize=functools.partial(finalize_logits, cfg), chunk=cfg.logits_chunk,
          z_loss_weight=self.z_loss_weight, mesh=self.mesh, rules=self.rules, compute_dtype=cfg.compute_dtype)
    else:
      logits_BxLxV, stats = self.model.apply(variables, *inputs, mutable=mutable, **kwargs)
      loss_BxL, log_z_BxL = vocab_parallel_cross_entropy(logits_BxLxV, batch["targets"], self.mesh, self.rules)
      ce_sum = jnp.sum(loss_BxL * weights_BxL)
      z_sum = jnp.sum(jnp.square(log_z_BxL) * weights_BxL)
      total = ce_sum + self.z_loss_weight * z_sum
    aux = {"ce_sum": ce_sum, "z_sum": z_sum, "tokens": jnp.sum(weights_BxL)}
    if cfg.num_experts:
      moe_loss_sum, moe_sums = moe.loss_terms(stats[moe.MOE_STATS], cfg, aux["tokens"])
      total = total + moe_loss_sum
      aux.update(moe_sums)
    return total, aux


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  """[B, L] -> [M, B/M, L], microbatch m taking rows m, m+M, ... so every device keeps its own rows."""
  def split(x_BxL):
    B = x_BxL.shape[0]
    x_MxBmxL = x_BxL.reshape(B // num_microbatches, num_microbatches, *x_BxL.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x_MxBmxL, (None, "act_batch") + (None,) * (x_BxL.ndim - 1))
  return jax.tree.map(split, batch)


def _trainable_part(params: Any, trainable: Callable[[Any], Any] | None):
  """(the leaves to differentiate, a function rebuilding the full params from them, the full grads from theirs).

  Frozen leaves enter the loss as constants, so no weight gradient is computed for them; their gradient is zeros,
  which the optimizer's frozen branch (set_to_zero) never reads, so XLA drops it.
  """
  if trainable is None:
    return params, lambda p: p, lambda g: g
  leaves, treedef = jax.tree.flatten(params)
  flags = treedef.flatten_up_to(trainable(params))
  wrt = [x for x, f in zip(leaves, flags) if f]

  def fill(values, frozen):
    it = iter(values)
    return treedef.unflatten([next(it) if f else frozen(x) for x, f in zip(leaves, flags)])
  return wrt, lambda w: fill(w, lambda x: x), lambda g: fill(g, jnp.zeros_like)


def loss_and_grads(loss_fn: LossFn, params: Any, batch: Batch, num_microbatches: int,
                   trainable: Callable[[Any], Any] | None = None, rng: jax.Array | None = None):
  """Gradient of the token-mean loss, accumulated over microbatches in fp32; only the `trainable` leaves are
  differentiated when given (the others get zero gradients). rng: dropout key (microbatch m uses fold_in(rng, m)).
  Returns (grads, metrics with grad_norm)."""
  tokens = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
  wrt, rebuild, full_grads = _trainable_part(params, trainable)
  grad_fn = jax.value_and_grad(lambda w, b, key: loss_fn(rebuild(w), b, key), has_aux=True)
  params = wrt
  key_of = lambda m: None if rng is None else jax.random.fold_in(rng, m)
  if num_microbatches == 1:
    (total, aux), grads = grad_fn(params, batch, key_of(0))
  else:
    def accumulate(carry, microbatch):
      grads_acc, total_acc, aux_acc = carry
      m, microbatch = microbatch
      (total_m, aux_m), grads_m = grad_fn(params, microbatch, key_of(m))
      grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads_m)
      return (grads_acc, total_acc + total_m, jax.tree.map(jnp.add, aux_acc, aux_m)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    aux0 = {"ce_sum": 0.0, "z_sum": 0.0, "tokens": 0.0}
    aux0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), aux0) | moe.zero_sums(loss_fn.model.cfg)
    (grads, total, aux), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32), aux0),
                                          (jnp.arange(num_microbatches), split_microbatches(batch, num_microbatches)))
  grads = jax.tree.map(lambda g, p: (g / tokens).astype(p.dtype), grads, params)
  metrics = {"loss": total / tokens, "ce_loss": aux["ce_sum"] / tokens, "z_loss": aux["z_sum"] / tokens,
             "tokens": aux["tokens"], "grad_norm": optax.tree.norm(grads)}
  metrics.update(moe.step_metrics(aux, tokens))  # moe/aux_loss, moe/load_expert_<e>, ... (MoE models only)
  return full_grads(grads), metrics


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn, tx: optax.GradientTransformation,
               schedule: optax.Schedule, num_microbatches: int = 1,
               trainable: Callable[[Any], Any] | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  rng = None if loss_fn.dropout_seed is None else jax.random.fold_in(jax.random.key(loss_fn.dropout_seed), state.step)
  grads, metrics = loss_and_grads(loss_fn, state.params, batch, num_microbatches, trainable, rng)
  grad_norm = metrics["grad_norm"]
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # One non-finite loss or gradient would poison the params and the Adam moments for good: keep the old ones and
  # count the skip (the step still advances: the batch was consumed). The optimizer's own count does not advance,
  # so the schedule runs at step - nonfinite_steps.
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                   (state.params, state.opt_state))
  skipped = 1 - finite.astype(jnp.int32)
  metrics["learning_rate"] = schedule(state.step - state.nonfinite_steps)
  metrics["nonfinite"] = skipped
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            nonfinite_steps=state.nonfinite_steps + skipped)
  return new_state, metrics


def eval_step(params: Any, batch: Batch, *, loss_fn: LossFn) -> dict[str, jax.Array]:
  """Sums, so that an evaluator can add them over batches before dividing."""
  _, aux = loss_fn(params, batch)
  return aux


def jit_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   layout: StateLayout, num_microbatches: int = 1,
                   trainable: Callable[[Any], Any] | None = None) -> Callable:
  """The train step jitted with explicit shardings; the incoming state is donated."""
  mesh = loss_fn.mesh
  step = jax.jit(
      lambda state, batch: train_step(state, batch, loss_fn=loss_fn, tx=tx, schedule=schedule,
                                      num_microbatches=num_microbatches, trainable=trainable),
      in_shardings=(layout.state_shardings, batch_sharding(mesh)),
      out_shardings=(layout.state_shardings, replicated(mesh)),
      donate_argnums=(0,))

  def run(state: TrainState, batch: Batch):
    with mesh_context(mesh, loss_fn.rules):
      return step(state, batch)

  run.jitted = step  # For AOT lowering (.lower(...).compile()) and cost analysis.
  return run


def jit_eval_step(loss_fn: LossFn, layout: StateLayout) -> Callable:
  mesh = loss_fn.mesh
  step = jax.jit(lambda params, batch: eval_step(params, batch, loss_fn=loss_fn),
                 in_shardings=(layout.param_shardings, batch_sharding(mesh)), out_shardings=replicated(mesh))

  def run(params: Any, batch: Batch):
    with mesh_context(mesh, loss_fn.rules):
      return step(params, batch)

  return run
