"""Train state and its sharded initialisation.

eval_shape(init) gives shapes and logical axis names without allocating; the rules turn the names into
NamedShardings; jit(init, out_shardings=...) then creates every parameter directly in its shards, so no device ever
holds a full copy of the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tweetjax.parallel.rules import Rules, logical_to_shardings, mesh_context, replicated


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: batches consumed (skipped non-finite updates included)
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array  # int32 scalar: updates skipped because loss or grad norm was non-finite


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Shapes, logical names and shardings of a TrainState for one mesh."""
  abstract_boxed_params: Any  # eval_shape'd params with nn.Partitioned boxes (logical names)
  param_shardings: Any
  state_shardings: TrainState
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings: what AOT lowering and restore need


def init_boxed_params(model: nn.Module, rng: jax.Array, seq_len: int) -> Any:
  dummy_BxL = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(rng, dummy_BxL)["params"]


def state_layout(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules,
                 seq_len: int) -> StateLayout:
  with mesh_context(mesh, rules):
    boxed = jax.eval_shape(lambda rng: init_boxed_params(model, rng, seq_len), jax.random.key(0))
  param_shardings = logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
  abstract_params = nn.meta.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Frozen params (LoRA's base weights) have no state: optax.MaskedNode stands in for them and stays as it is.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_shardings = optax.tree_utils.tree_map_params(
      tx, lambda state, sharding: state if masked(state) else sharding, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated(mesh), is_leaf=masked)
  state_shardings = TrainState(step=replicated(mesh), params=param_shardings, opt_state=opt_shardings,
                               nonfinite_steps=replicated(mesh))
  abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                              opt_state=abstract_opt, nonfinite_steps=jax.ShapeDtypeStruct((), jnp.int32))
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_shardings)
  return StateLayout(boxed, param_shardings, state_shardings, abstract_state)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, layout: StateLayout, mesh: Mesh,
                     rules: Rules, rng: jax.Array, seq_len: int) -> TrainState:
  def init(rng):
    params = nn.meta.unbox(init_boxed_params(model, rng, seq_len))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite_steps=jnp.zeros((), jnp.int32))

  with mesh_context(mesh, rules):
    return jax.jit(init, out_shardings=layout.state_shardings)(rng)


def state_from_params(params: Any, tx: optax.GradientTransformation, layout: StateLayout, mesh: Mesh,
                      rules: Rules) -> TrainState:
  """A fresh TrainState around given params (placed on this mesh's layout)."""
  params = jax.device_put(params, layout.param_shardings)

  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite_steps=jnp.zeros((), jnp.int32))

  with mesh_context(mesh, rules):
    return jax.jit(init, out_shardings=layout.state_shardings)(params)
