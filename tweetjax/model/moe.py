"""Sparse mixture-of-experts MLP with expert parallelism.

Dims: B batch, L length, D d_model, E experts, F expert mlp hidden, K experts per token, T tokens of one device's
capacity group (its share of the B * L tokens), C capacity (slots per expert per group), X expert-parallel shards
(mesh axes of "experts"), S = X * C rows one device's experts process.

Routing runs under plain jit on the global arrays (fp32 router logits, top-K, gates renormalised over the K choices,
Switch/GShard load-balancing loss, router z-loss), so routing and its losses are the same whatever the mesh. Dispatch,
expert FFN and combine run in one jax.shard_map: every device sorts its own tokens into a [E, C, D] buffer (the first
C assignments per expert, first choices before second choices, win; the rest are dropped and contribute zero, so
the residual stream carries them through the layer unchanged), an all-to-all over the expert axes sends each
expert's rows to the device holding it, the local experts run on [X * C, D] rows, and a second all-to-all brings
the results home. Expert weights are [E, D, F] sharded E on "experts", F on "mlp" (tensor): the down projection then
ends in a psum over the tensor axes; their d_model axis ("expert_embed": FSDP on `fsdp` only, as `expert` already
holds E) is gathered at the shard_map boundary like any FSDP weight. `dense_moe` (every expert on every token,
weighted by the gates) is the reference the tests compare with.

Per-layer statistics are sown into the MOE_STATS collection; `tweetjax.train.step.LossFn` applies the model with
that collection mutable and adds the weighted losses (see `loss_terms`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from tweetjax.model.config import ModelConfig
from tweetjax.model.layers import constrain, kernel_init, logical_param
from tweetjax.parallel.mesh import MeshError
from tweetjax.parallel.rules import DEFAULT_RULES, mesh_axes_of

MOE_STATS = "moe_stats"


def expert_kernel_init(in_axis: int, out_axis: int):
  """Fan-in scaling per expert: the leading expert axis is a batch axis, not part of the fan-in."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis,
                                          batch_axis=(0,))


# ----------------------------------------------------------------------------------------------------------------
# Routing and router losses (global arrays, plain jit).


def route(logits_BxLxE: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """fp32 softmax over experts, top-k; returns (expert_ids_BxLxK, gates_BxLxK summing to 1, probs_BxLxE)."""
  probs_BxLxE = jax.nn.softmax(logits_BxLxE.astype(jnp.float32), axis=-1)
  top_probs_BxLxK, expert_ids_BxLxK = lax.top_k(probs_BxLxE, k)
  gates_BxLxK = top_probs_BxLxK / jnp.sum(top_probs_BxLxK, axis=-1, keepdims=True)
  return expert_ids_BxLxK, gates_BxLxK, probs_BxLxE


def router_stats(logits_BxLxE: jax.Array, expert_ids_BxLxK: jax.Array, probs_BxLxE: jax.Array,
                 valid_BxL: jax.Array) -> dict[str, jax.Array]:
  """Load-balancing loss, z-loss and per-expert load over the valid (non-padding) tokens.

  load_e = share of the token->expert assignments that chose e (sums to 1); importance_e = mean router
  probability of e. aux_loss = E * sum_e load_e * importance_e (Switch/GShard; 1 when perfectly balanced, E when
  one expert takes everything; only importance carries a gradient). z_loss = mean over tokens of
  logsumexp(logits)^2 (ST-MoE), which keeps router logits small.
  """
  E = logits_BxLxE.shape[-1]
  valid_BxL = valid_BxL.astype(jnp.float32)
  tokens = jnp.maximum(jnp.sum(valid_BxL), 1.0)
  counts_E = jnp.sum(jax.nn.one_hot(expert_ids_BxLxK, E, dtype=jnp.float32) * valid_BxL[..., None, None],
                     axis=(0, 1, 2))
  load_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
  importance_E = jnp.sum(probs_BxLxE * valid_BxL[..., None], axis=(0, 1)) / tokens
  aux_loss = E * jnp.sum(load_E * importance_E)
  log_z_BxL = jax.nn.logsumexp(logits_BxLxE.astype(jnp.float32), axis=-1)
  z_loss = jnp.sum(jnp.square(log_z_BxL) * valid_BxL) / tokens
  return {"aux_loss": aux_loss, "z_loss": z_loss, "load": load_E}


# ----------------------------------------------------------------------------------------------------------------
# Expert computation: the dense reference and the expert-parallel shard_map.


def _swiglu(x_ExSxD, gate_ExDxF, up_ExDxF, down_ExFxD):
  h_ExSxF = nn.silu(jnp.einsum("esd,edf->esf", x_ExSxD, gate_ExDxF)) * jnp.einsum("esd,edf->esf", x_ExSxD, up_ExDxF)
  return jnp.einsum("esf,efd->esd", h_ExSxF, down_ExFxD)


def dense_moe(x_BxLxD, expert_ids_BxLxK, gates_BxLxK, valid_BxL, gate_ExDxF, up_ExDxF, down_ExFxD) -> jax.Array:
  """Reference: every expert on every token, combined with the gates of the chosen ones (no capacity limit)."""
  E = gate_ExDxF.shape[0]
  combine_BxLxE = jnp.sum(jax.nn.one_hot(expert_ids_BxLxK, E, dtype=jnp.float32) * gates_BxLxK[..., None], axis=2)
  combine_BxLxE = combine_BxLxE * valid_BxL[..., None]
  h_BxLxExF = (nn.silu(jnp.einsum("bld,edf->blef", x_BxLxD, gate_ExDxF))
               * jnp.einsum("bld,edf->blef", x_BxLxD, up_ExDxF))
  out_BxLxExD = jnp.einsum("blef,efd->bled", h_BxLxExF, down_ExFxD)
  return jnp.einsum("bled,ble->bld", out_BxLxExD, combine_BxLxE.astype(out_BxLxExD.dtype))


def capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert for a group of `tokens` tokens; capacity_factor <= 0 means dropless (every token fits)."""
  if capacity_factor <= 0:
    return tokens
  return max(1, min(tokens, math.ceil(capacity_factor * tokens * k / num_experts)))


def _local_moe(x_TxD, expert_ids_TxK, gates_TxK, valid_T, gate_ExDxF, up_ExDxF, down_ExFxD, *, num_experts: int,
               capacity_factor: float, expert_axes: tuple[str, ...], mlp_axes: tuple[str, ...]):
  """One device's part: dispatch its T tokens, all-to-all, local experts, all-to-all back, combine."""
  T, d = x_TxD.shape
  k, E = expert_ids_TxK.shape[-1], num_experts
  E_local = gate_ExDxF.shape[0]
  X = E // E_local
  C = capacity(T, k, E, capacity_factor)
  a2a_axes = expert_axes[0] if len(expert_axes) == 1 else expert_axes
  # Assignment order (k major): every token's first choice is served before any second choice.
  expert_KT = expert_ids_TxK.T.reshape(k * T)
  gates_KT = gates_TxK.T.reshape(k * T)
  valid_KT = jnp.tile(valid_T, k)
  token_KT = jnp.tile(jnp.arange(T), k)
  onehot_KTxE = jax.nn.one_hot(expert_KT, E, dtype=jnp.int32) * valid_KT[:, None].astype(jnp.int32)
  position_KT = jnp.sum((jnp.cumsum(onehot_KTxE, axis=0) - 1) * onehot_KTxE, axis=-1)
  kept_KT = valid_KT & (position_KT < C)
  slot_KT = jnp.where(kept_KT, expert_KT * C + position_KT, E * C)  # E * C is out of range: dropped

  buffer_ECxD = jnp.zeros((E * C, d), x_TxD.dtype).at[slot_KT].add(x_TxD[token_KT], mode="drop")
  send_XxElxCxD = buffer_ECxD.reshape(X, E_local, C, d)
  recv_XxElxCxD = lax.all_to_all(send_XxElxCxD, a2a_axes, 0, 0, tiled=True) if X > 1 else send_XxElxCxD
  rows_ElxSxD = recv_XxElxCxD.transpose(1, 0, 2, 3).reshape(E_local, X * C, d)
  out_ElxSxD = _swiglu(rows_ElxSxD, gate_ExDxF, up_ExDxF, down_ExFxD)
  if mlp_axes:
    out_ElxSxD = lax.psum(out_ElxSxD, mlp_axes)  # F is sharded: each tensor shard holds a partial down projection
  back_XxElxCxD = out_ElxSxD.reshape(E_local, X, C, d).transpose(1, 0, 2, 3)
  home_XxElxCxD = lax.all_to_all(back_XxElxCxD, a2a_axes, 0, 0, tiled=True) if X > 1 else back_XxElxCxD

  out_KTxD = home_XxElxCxD.reshape(E * C, d).at[slot_KT].get(mode="fill", fill_value=0)
  weights_KT = jnp.where(kept_KT, gates_KT, 0.0).astype(jnp.float32)  # combine in fp32, whatever the compute dtype
  y_TxD = jnp.sum((out_KTxD.astype(jnp.float32) * weights_KT[:, None]).reshape(k, T, d), axis=0)
  return y_TxD.astype(x_TxD.dtype), kept_KT.reshape(k, T).T


def _spec(*axes_per_dim: tuple[str, ...]) -> P:
  return P(*(None if not axes else axes[0] if len(axes) == 1 else tuple(axes) for axes in axes_per_dim))


def expert_parallel_moe(x_BxLxD, expert_ids_BxLxK, gates_BxLxK, valid_BxL, gate_ExDxF, up_ExDxF, down_ExFxD, *,
                        capacity_factor: float, mesh=None, rules=None) -> tuple[jax.Array, jax.Array]:
  """Expert-parallel MoE: returns (y_BxLxD, kept_BxLxK: which assignments found a slot).

  The B * L tokens are flattened and split evenly over the token-sharding mesh axes (act_batch, act_length); each
  shard is one capacity group. When B * L does not divide (a batch of 1 at init, a few rows when decoding), invalid
  padding tokens fill the gap: they take no capacity and come back as zeros.
  `mesh` defaults to the mesh in context (jax.set_mesh); `rules` to flax's logical axis rules in context. Without a
  mesh the same per-device code runs on all tokens as one group.
  """
  B, L, D = x_BxLxD.shape
  K, E = expert_ids_BxLxK.shape[-1], gate_ExDxF.shape[0]
  tokens = (x_BxLxD.reshape(B * L, D), expert_ids_BxLxK.reshape(B * L, K), gates_BxLxK.reshape(B * L, K),
            valid_BxL.reshape(B * L))
  weights = (gate_ExDxF, up_ExDxF, down_ExFxD)
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  local = dict(num_experts=E, capacity_factor=capacity_factor)
  if mesh.empty:
    y_TxD, kept_TxK = _local_moe(*tokens, *weights, expert_axes=(), mlp_axes=(), **local)
    return y_TxD.reshape(B, L, D), kept_TxK.reshape(B, L, K)
  rules = rules or nn.get_logical_axis_rules() or DEFAULT_RULES
  token_axes = mesh_axes_of("act_batch", rules) + mesh_axes_of("act_length", rules)
  expert_axes, mlp_axes = mesh_axes_of("experts", rules), mesh_axes_of("mlp", rules)
  if not set(expert_axes) <= set(token_axes):
    raise ValueError(
        f"MoE expert parallelism: the 'experts' mesh axes {list(expert_axes)} must also shard the tokens "
        f"('act_batch'/'act_length' -> {list(token_axes)}) so that each expert shard dispatches its own tokens; "
        "fix the logical axis rules")
  if set(mlp_axes) & set(token_axes):
    raise ValueError(f"MoE: the 'mlp' mesh axes {list(mlp_axes)} also shard the tokens; the expert FFN needs its "
                     "tokens replicated over the axes that split F; fix the logical axis rules")
  expert_shards = math.prod(mesh.shape[a] for a in expert_axes)
  if E % expert_shards:
    raise MeshError(f"model.num_experts={E} is not divisible by the {expert_shards} expert shards (mesh axes "
                    f"{list(expert_axes)} of mesh {dict(mesh.shape)}); change num_experts, the mesh, or the rule "
                    "for 'experts'")
  pad = -(B * L) % math.prod(mesh.shape[a] for a in token_axes)
  if pad:
    tokens = tuple(jnp.pad(t, [(0, pad)] + [(0, 0)] * (t.ndim - 1)) for t in tokens)  # valid pads with False
  fn = jax.shard_map(
      lambda *args: _local_moe(*args, expert_axes=expert_axes, mlp_axes=mlp_axes, **local),
      mesh=mesh,
      in_specs=(_spec(token_axes, ()),) * 3 + (_spec(token_axes),)
      + (_spec(expert_axes, (), mlp_axes),) * 2 + (_spec(expert_axes, mlp_axes, ()),),
      out_specs=(_spec(token_axes, ()), _spec(token_axes, ())))
  y_TxD, kept_TxK = fn(*tokens, *weights)
  return y_TxD[:B * L].reshape(B, L, D), kept_TxK[:B * L].reshape(B, L, K)


# ----------------------------------------------------------------------------------------------------------------
# The layer.


class MoE(nn.Module):
  """Router + E SwiGLU experts; drop-in for MLP (same input/output), plus the padding mask from segment ids."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    cfg = self.cfg
    D, E, F, K = cfg.d_model, cfg.num_experts, cfg.moe_mlp_dim, cfg.experts_per_token
    dt = cfg.compute_dtype
    # The router is small and every device needs all of it: no "experts" sharding.
    router_DxE = logical_param(self, "router", kernel_init(0, 1), (D, E), ("embed", None), cfg)
    in_axes, out_axes = ("experts", "expert_embed", "mlp"), ("experts", "mlp", "expert_embed")
    gate_ExDxF = logical_param(self, "gate", expert_kernel_init(1, 2), (E, D, F), in_axes, cfg)
    up_ExDxF = logical_param(self, "up", expert_kernel_init(1, 2), (E, D, F), in_axes, cfg)
    down_ExFxD = logical_param(self, "down", expert_kernel_init(1, 2), (E, F, D), out_axes, cfg)

    logits_BxLxE = jnp.einsum("bld,de->ble", x_BxLxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
    logits_BxLxE = constrain(logits_BxLxE, ("act_batch", "act_length", None))
    expert_ids_BxLxK, gates_BxLxK, probs_BxLxE = route(logits_BxLxE, K)
    valid_BxL = segment_ids_BxL != 0  # padding takes no capacity and does not count in the router losses
    stats = router_stats(logits_BxLxE, expert_ids_BxLxK, probs_BxLxE, valid_BxL)
    weights = (gate_ExDxF.astype(dt), up_ExDxF.astype(dt), down_ExFxD.astype(dt))
    if cfg.moe_impl == "dense":
      y_BxLxD = dense_moe(x_BxLxD, expert_ids_BxLxK, gates_BxLxK, valid_BxL, *weights)
      kept_BxLxK = jnp.broadcast_to(valid_BxL[..., None], expert_ids_BxLxK.shape)
    else:
      y_BxLxD, kept_BxLxK = expert_parallel_moe(x_BxLxD, expert_ids_BxLxK, gates_BxLxK, valid_BxL, *weights,
                                                capacity_factor=cfg.capacity_factor)
    assigned = jnp.sum(valid_BxL.astype(jnp.float32)) * K
    for name, value in (("aux_loss", stats["aux_loss"]), ("z_loss", stats["z_loss"]), ("load", stats["load"]),
                        ("dropped", assigned - jnp.sum(kept_BxLxK.astype(jnp.float32))), ("assigned", assigned)):
      self.sow(MOE_STATS, name, value)
    return constrain(y_BxLxD.astype(dt), ("act_batch", "act_length", "act_embed"))


# ----------------------------------------------------------------------------------------------------------------
# From sown statistics to loss terms and metrics.

_MEAN_STATS = ("aux_loss", "z_loss")


def summarize_stats(moe_stats: Any, num_experts: int) -> dict[str, jax.Array]:
  """Folds the per-layer sown values (stacked over scanned layers) into one value per statistic.

  aux_loss, z_loss and load are means over the MoE layers (so the loss weights do not scale with depth); dropped
  and assigned are totals over the layers.
  """
  values: dict[str, list[jax.Array]] = {}
  flat, _ = jax.tree_util.tree_flatten_with_path(moe_stats)
  for path, leaf in flat:
    name = next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    values.setdefault(name, []).append(leaf)
  if not values:
    raise ValueError("the model sowed no MoE statistics; is config.model.num_experts > 0?")
  out = {name: jnp.mean(jnp.concatenate([v.reshape(-1) for v in values[name]])) for name in _MEAN_STATS}
  out["load"] = jnp.mean(jnp.concatenate([v.reshape(-1, num_experts) for v in values["load"]]), axis=0)
  for name in ("dropped", "assigned"):
    out[name] = sum(jnp.sum(v) for v in values[name])
  return out


def loss_terms(moe_stats: Any, cfg: ModelConfig, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(weighted router losses scaled to a token sum, scalar sums for the step's aux dict).

  The router losses are batch means; multiplying by the (micro)batch's token count lets LossFn's token-sum
  convention (divide by the whole batch's tokens later) give loss = ce + w_aux * aux + w_z * z.
  """
  s = summarize_stats(moe_stats, cfg.num_experts)
  loss_sum = (cfg.router_aux_loss_weight * s["aux_loss"] + cfg.router_z_loss_weight * s["z_loss"]) * tokens
  sums = {"moe_aux_sum": s["aux_loss"] * tokens, "moe_z_sum": s["z_loss"] * tokens,
          "moe_dropped": s["dropped"], "moe_assigned": s["assigned"]}
  sums.update({f"moe_load_sum_{e}": s["load"][e] * tokens for e in range(cfg.num_experts)})
  return loss_sum, sums


def zero_sums(cfg: ModelConfig) -> dict[str, jax.Array]:
  """The aux-dict entries `loss_terms` adds, as zeros (microbatch accumulators)."""
  if not cfg.num_experts:
    return {}
  keys = ["moe_aux_sum", "moe_z_sum", "moe_dropped", "moe_assigned"]
  keys += [f"moe_load_sum_{e}" for e in range(cfg.num_experts)]
  return {key: jnp.zeros((), jnp.float32) for key in keys}


def step_metrics(aux: dict[str, jax.Array], tokens: jax.Array) -> dict[str, jax.Array]:
  """moe/* metrics from a step's summed aux dict (empty for dense models)."""
  if "moe_aux_sum" not in aux:
    return {}
  metrics = {"moe/aux_loss": aux["moe_aux_sum"] / tokens, "moe/router_z_loss": aux["moe_z_sum"] / tokens,
             "moe/dropped_fraction": aux["moe_dropped"] / jnp.maximum(aux["moe_assigned"], 1.0)}
  e = 0
  while f"moe_load_sum_{e}" in aux:
    metrics[f"moe/load_expert_{e}"] = aux[f"moe_load_sum_{e}"] / tokens
    e += 1
  return metrics
