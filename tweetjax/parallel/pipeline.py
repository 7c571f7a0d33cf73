"""Pipeline parallelism over the `stage` mesh axis: a circular schedule written with jit + sharding constraints.

Dims: S stages, R repeats (circular passes), M microbatches, N scanned layer units (N = R * S * C), C units per
stage and repeat, B rows of one microbatch, L length, D d_model.

Layout. The layer stack keeps the leading [N] axis of a non-pipelined model (logical name "layers" -> `stage`), so
a checkpoint means the same thing on every mesh: device group s holds the contiguous units [s N/S, (s+1) N/S).
Unit n runs in repeat r = n // (S C) on stage s = (n // C) % S. With R = 1 each stage's units are its own block
and `stage_major` is a local reshape; with R > 1 the units of stage s are every S-th chunk of C, so the step moves
each block's chunks to their stages once (an all-to-all over `stage` of params / S per device, and the reverse for
the gradients), which is small next to the FSDP gathers every microbatch repeats.

Schedule. Work item k = r M + m (microbatch m in repeat r) runs on stage s at iteration t = k + s, so there are
T = R M + S - 1 iterations, each running every stage once (a vmap over the stage axis with spmd_axis_name, which
the partitioner turns into one stage per device group). After an iteration the stage outputs rotate by one
(stage s -> s + 1, the last -> the first: a collective-permute). Stage 0 takes microbatch m fresh in repeat 0 and,
in later repeats, from a per-microbatch buffer where the last stage's output waited M - S iterations (M >= S).
Final outputs collect in the same buffer. Iterations where a stage holds no work item compute on a placeholder and
are masked out: the bubble, (S - 1) / (R M + S - 1) of the stage time (GPipe's (S - 1) / (M + S - 1) for R = 1).

Statistics a layer sows (MoE router losses) come back per unit and microbatch, [N, M, ...], in layer order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from tweetjax.parallel.mesh import MeshError
from tweetjax.parallel.rules import DEFAULT_RULES, mesh_axes_of

# Logical names of the [S, B, L, D] stage buffers (the "act_stage" rule maps the stage dimension).
STAGE_ACTIVATION_AXES = ("act_stage", "act_batch", "act_length", "act_embed")


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """Idle fraction of each stage's time: (S - 1) / (R M + S - 1); 0 without a pipeline."""
  if stages <= 1:
    return 0.0
  return (stages - 1) / (repeats * microbatches + stages - 1)


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  stages: int
  microbatches: int
  repeats: int = 1

  @property
  def iterations(self) -> int:
    return self.repeats * self.microbatches + self.stages - 1

  @property
  def bubble(self) -> float:
    return bubble_fraction(self.stages, self.microbatches, self.repeats)


def validate(spec: PipelineSpec, num_units: int, rows: int, batch_shards: int, *, units_name: str,
             scan_layers: bool = True) -> None:
  """Checks before compiling; every message names the config keys. `rows`: rows per gradient-accumulation
  microbatch; `units_name` says how the scanned units come from model.num_layers."""
  S, M, R = spec.stages, spec.microbatches, spec.repeats
  if R < 1:
    raise MeshError(f"train.pipeline_repeats={R}: expected >= 1")
  if M < 1:
    raise MeshError(f"train.pipeline_microbatches={M}: expected >= 1")
  if S <= 1:
    return
  if not scan_layers:
    raise MeshError(f"mesh.stage={S} needs model.scan_layers=True (the pipeline splits the scanned layer stack)")
  if num_units % (S * R):
    raise MeshError(
        f"{units_name}={num_units} is not divisible by mesh.stage={S} x train.pipeline_repeats={R} = {S * R}: "
        "every stage runs the same number of layers in every repeat; change model.num_layers, mesh.stage or "
        "train.pipeline_repeats")
  if M < S:
    raise MeshError(
        f"train.pipeline_microbatches={M} is smaller than mesh.stage={S}: with fewer microbatches than stages some "
        f"stage is always idle (and a circular schedule has nothing to run while a microbatch travels); use >= {S}")
  if rows % M or (rows // M) % batch_shards:
    raise MeshError(
        f"{rows} rows per step (data.global_batch_size / train.microbatches) split into "
        f"train.pipeline_microbatches={M} do not give a multiple of the {batch_shards} batch shards per pipeline "
        "microbatch; change data.global_batch_size, train.microbatches or train.pipeline_microbatches")


def dots_without_batch_dims_but_the_stage(prim, *_, **params) -> bool:
  """checkpoint_dots_with_no_batch_dims for layers under the vmap over stages, which gives every matmul the stage
  as a batch dimension: keep the matmul outputs with no other batch dimension (projections, MLP; not attention)."""
  if str(prim) != "dot_general":
    return False
  (_, _), (lhs_batch, rhs_batch) = params["dimension_numbers"]
  return len(lhs_batch) <= 1 and len(rhs_batch) <= 1


def _rules():
  return nn.get_logical_axis_rules() or DEFAULT_RULES


def _stage_axes() -> tuple[str, ...]:
  return mesh_axes_of("layers", _rules())


def _constrain_stage_dim(x: jax.Array) -> jax.Array:
  """Leading dimension on the stage axes, the rest left to the partitioner (params keep their own sharding)."""
  axes = _stage_axes()
  if jax.sharding.get_abstract_mesh().empty:
    return x
  lead = None if not axes else axes[0] if len(axes) == 1 else axes
  return lax.with_sharding_constraint(x, P(lead, *([P.UNCONSTRAINED] * (x.ndim - 1))))


def stage_major(x_N: jax.Array, spec: PipelineSpec) -> jax.Array:
  """[N, ...] in layer order -> [S, R, C, ...]: entry [s, r, c] is unit (r S + s) C + c.

  R = 1: a local reshape. R > 1: each stage group sends every chunk of C units it holds to the stage that runs it
  (`_move_chunks`); the partitioner's own answer to the reshape would gather the whole stack on every device.
  """
  S, R = spec.stages, spec.repeats
  C = x_N.shape[0] // (S * R)
  axes = _stage_axes()
  if R == 1 or len(axes) != 1 or jax.sharding.get_abstract_mesh().empty:
    x_RxSxC = x_N.reshape(R, S, C, *x_N.shape[1:])
    return _constrain_stage_dim(jnp.swapaxes(x_RxSxC, 0, 1))
  move = jax.shard_map(functools.partial(_move_chunks, stages=S, repeats=R, axis=axes[0]),
                       in_specs=P(axes[0]), out_specs=P(axes[0]), axis_names={axes[0]}, check_vma=False)
  return move(x_N.reshape(S * R, C, *x_N.shape[1:])).reshape(S, R, C, *x_N.shape[1:])


def chunk_moves(stages: int, repeats: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """Static plan of `_move_chunks`: for each ring offset d, per source stage the local chunks it sends to stage
  (source + d) % S, and per destination stage the repeat slot each received chunk fills (R: padding, dropped).

  Stage group s holds chunks s R .. s R + R - 1 in layer order; chunk c runs on stage c % S in repeat c // S.
  """
  S, R = stages, repeats
  plan = []
  for d in range(S):
    sent = [[r for r in range(R) if (src * R + r) % S == (src + d) % S] for src in range(S)]
    width = max(len(chunks) for chunks in sent)
    if not width:
      continue
    send = np.zeros((S, width), np.int32)
    slot = np.full((S, width), R, np.int32)
    for src, chunks in enumerate(sent):
      dst = (src + d) % S
      send[src, :len(chunks)] = chunks
      slot[dst, :len(chunks)] = [(src * R + r) // S for r in chunks]
    plan.append((d, send, slot))
  return plan


def _move_chunks(local_RxC: jax.Array, *, stages: int, repeats: int, axis: str) -> jax.Array:
  """One stage group's part of `stage_major`: its R chunks in layer order in, the R chunks it runs out."""
  me = lax.axis_index(axis)
  out_RxC = jnp.zeros_like(local_RxC)
  for d, send, slot in chunk_moves(stages, repeats):
    chunks = local_RxC[jnp.asarray(send)[me]]
    if d:
      chunks = lax.ppermute(chunks, axis, [(s, (s + d) % stages) for s in range(stages)])
    out_RxC = out_RxC.at[jnp.asarray(slot)[me]].set(chunks, mode="drop")
  return out_RxC


def layer_major(x_SxR: jax.Array) -> jax.Array:
  """[S, R, C, ...] -> [N, ...] in layer order (inverse of `stage_major`)."""
  S, R, C = x_SxR.shape[:3]
  return jnp.swapaxes(x_SxR, 0, 1).reshape(R * S * C, *x_SxR.shape[3:])


def split_microbatches(x_BxF: jax.Array, microbatches: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...], microbatch m taking rows m, m+M, ...: every device keeps its own rows."""
  B = x_BxF.shape[0]
  return jnp.swapaxes(x_BxF.reshape(B // microbatches, microbatches, *x_BxF.shape[1:]), 0, 1)


def merge_microbatches(x_MxBxF: jax.Array) -> jax.Array:
  """Inverse of `split_microbatches`."""
  M, B = x_MxBxF.shape[:2]
  return jnp.swapaxes(x_MxBxF, 0, 1).reshape(M * B, *x_MxBxF.shape[2:])


def _index(tree: Any, i: jax.Array) -> Any:
  return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def inner_rules(rules, stage_axes: Sequence[str]):
  """The rules inside the pipeline: the stage axes belong to the stage dimension of every buffer, so no activation
  name may use them (outside, "act_batch" splits the embedding, LM head and loss rows over the stages too)."""
  out = []
  for name, axes in rules:
    if name.startswith("act_") and name != "act_stage" and axes is not None:
      kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a not in stage_axes)
      axes = None if not kept else kept[0] if len(kept) == 1 else kept
    out.append((name, axes))
  return tuple(out)


def run(stage_fn: Callable[..., tuple[jax.Array, Any]], layer_params: Any, x_BxLxD: jax.Array,
        per_row: Sequence[jax.Array], spec: PipelineSpec, *, remat_policy: Callable | None = None,
        saved_names: Sequence[str] = ()) -> tuple[jax.Array, Any]:
  """Runs the N units over the batch in M microbatches on S stages; returns (y_BxLxD, stats [N, M, ...]).

  stage_fn(params with leading [C], x_BxLxD, *per_row slices) -> (y_BxLxD, stats with leading [C]): one stage's
  C units on one microbatch. `layer_params` leaves are [N, ...] in layer order; `per_row` arrays ([B, ...]:
  positions, segment ids) are split into microbatches with the activations. remat_policy: the layers' own
  checkpoint policy (None: no remat) and saved_names the checkpoint names of their inputs, which every
  iteration keeps for the backward pass.
  """
  outer = _rules()
  with nn.logical_axis_rules(inner_rules(outer, _stage_axes())):
    x_MxBxLxD = nn.with_logical_constraint(split_microbatches(x_BxLxD, spec.microbatches),
                                           (None, "act_batch", "act_length", "act_embed"))
    per_microbatch = [split_microbatches(a, spec.microbatches) for a in per_row]
    y_MxBxLxD, stats = _run_microbatches(stage_fn, layer_params, x_MxBxLxD, per_microbatch, spec, remat_policy,
                                         saved_names)
    y_BxLxD = merge_microbatches(y_MxBxLxD)
  return y_BxLxD, stats


def _run_microbatches(stage_fn, layer_params, x_MxBxLxD, per_microbatch, spec, remat_policy, saved_names):
  S, M, R = spec.stages, spec.microbatches, spec.repeats
  w_SxR = jax.tree.map(lambda p: stage_major(p, spec), layer_params)
  stage_ids_S = jnp.arange(S)
  x_shape = x_MxBxLxD.shape[1:]
  stage_axes = _stage_axes()
  spmd_axis = stage_axes[0] if len(stage_axes) == 1 else stage_axes

  stats_shape = jax.eval_shape(lambda w, x, *e: stage_fn(_index(_index(w, 0), 0), x, *_index(e, 0))[1],
                               w_SxR, x_MxBxLxD[0], *per_microbatch)
  acc0 = jax.tree.map(lambda s: jnp.zeros((S, R, s.shape[0], M, *s.shape[1:]), s.dtype), stats_shape)

  def apply_stage(w_RxC, repeat, x_BxLxD, *extras):
    return stage_fn(_index(w_RxC, repeat), x_BxLxD, *extras)

  # Without this the scan over iterations would keep every iteration's slice of the stage weights for the backward
  # pass (T x a stage's share of a repeat): the slice is cheap to redo from the loop-invariant stack. Everything the
  # layers' own remat policy keeps (and their inputs, by name) is still kept, so nothing is recomputed twice.
  # Without remat ("none") every matmul output is kept and elementwise work is redone: keeping everything would
  # keep the weights' per-iteration transposes too.
  policy = jax.checkpoint_policies.save_from_both_policies(
      remat_policy or jax.checkpoint_policies.checkpoint_dots,
      jax.checkpoint_policies.save_only_these_names(*saved_names))
  apply_stage = jax.checkpoint(apply_stage, policy=policy)

  def one_stage(w_RxC, repeat, microbatch, valid, x_BxLxD, acc_RxCxM):
    y_BxLxD, stats_C = apply_stage(w_RxC, repeat, x_BxLxD, *_index(per_microbatch, microbatch))

    def record(acc, value):
      old = acc[repeat, :, microbatch]
      return acc.at[repeat, :, microbatch].set(jnp.where(valid, value, old))

    return y_BxLxD, jax.tree.map(record, acc_RxCxM, stats_C)

  run_stages = jax.vmap(one_stage, spmd_axis_name=spmd_axis)

  def constrain(x_SxBxLxD):
    return nn.with_logical_constraint(x_SxBxLxD, STAGE_ACTIVATION_AXES)

  def store_arrival(buffer_SxM, arrived_S, t):
    """The last stage's output of iteration t - 1 (work item t - S) has just reached stage 0: keep it by microbatch.
    Every stage writes its own slot; only stage 0's is ever read."""
    item = t - S
    slot = jnp.maximum(item, 0) % M
    old = buffer_SxM[:, slot]
    return buffer_SxM.at[:, slot].set(jnp.where(item >= 0, arrived_S, old))

  def iteration(carry, t):
    arrived_S, buffer_SxM, acc = carry
    buffer_SxM = store_arrival(buffer_SxM, arrived_S, t)
    fresh_BxLxD = lax.dynamic_index_in_dim(x_MxBxLxD, t % M, 0, keepdims=False)
    first_S = jnp.where(t < M, fresh_BxLxD[None], buffer_SxM[:, t % M])
    inputs_S = constrain(jnp.where((stage_ids_S == 0)[:, None, None, None], first_S, arrived_S))
    item_S = t - stage_ids_S
    valid_S = (item_S >= 0) & (item_S < R * M)
    item_S = jnp.clip(item_S, 0, R * M - 1)
    y_S, acc = run_stages(w_SxR, item_S // M, item_S % M, valid_S, inputs_S, acc)
    return (constrain(jnp.roll(y_S, 1, axis=0)), buffer_SxM, acc), None

  arrived0 = constrain(jnp.zeros((S, *x_shape), x_MxBxLxD.dtype))
  buffer0 = jnp.zeros((S, M, *x_shape), x_MxBxLxD.dtype)
  (arrived_S, buffer_SxM, acc), _ = lax.scan(iteration, (arrived0, buffer0, acc0), jnp.arange(spec.iterations))
  buffer_SxM = store_arrival(buffer_SxM, arrived_S, spec.iterations)  # the last item's output
  stats = jax.tree.map(layer_major, acc)
  return buffer_SxM[0], stats


def num_units_of(num_layers: int, moe_every: int, num_experts: int) -> int:
  """Scanned units of the layer stack (MoE groups of moe_every layers scan as one unit)."""
  return num_layers // moe_every if num_experts and moe_every > 1 else num_layers


def stage_of_units(spec: PipelineSpec, num_units: int) -> list[tuple[int, int]]:
  """(stage, repeat) of every unit in layer order: which device group runs it and in which pass."""
  C = num_units // (spec.stages * spec.repeats)
  return [((n // C) % spec.stages, n // (spec.stages * C)) for n in range(num_units)]


def describe(spec: PipelineSpec, num_units: int) -> str:
  C = num_units // max(spec.stages * spec.repeats, 1)
  return (f"pipeline: {spec.stages} stages x {spec.repeats} repeat(s) x {C} layer unit(s), {spec.microbatches} "
          f"microbatches, {spec.iterations} iterations, bubble {100 * spec.bubble:.1f}% "
          f"(without repeats: {100 * bubble_fraction(spec.stages, spec.microbatches):.1f}%)")
