"""Logical axis rules: the one table that decides where every named dimension lives on the mesh.

Params and activations are annotated with the logical names below, never with mesh axes. Parameter names and
activation names are distinct ("embed" vs "act_embed") so that FSDP can shard weights on `fsdp` while activations
keep their batch dimension on it.
"""

from __future__ import annotations

import contextlib

from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tweetjax.parallel.mesh import MESH_AXES

Rules = tuple[tuple[str, Any], ...]

BATCH_AXES = ("data", "fsdp", "expert")

DEFAULT_RULES: Rules = (
    # Parameters.
    ("vocab", "tensor"),
    # Dense weights shard d_model over `expert` too: its devices split the batch like `fsdp`'s (BATCH_AXES), so
    # they are FSDP shards for everything but the experts, whose own axis already sits on `expert`. `context`
    # devices split the sequence, so for the weights they are data-parallel replicas too: FSDP shards as well.
    ("embed", ("fsdp", "expert", "context")),
    ("expert_embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    # Pipeline parallelism: the stacked layers' leading axis is split into contiguous blocks, one per stage
    # (tweetjax/parallel/pipeline.py); a size-1 `stage` axis leaves them replicated as before.
    ("layers", "stage"),
    ("norm", None),
    ("experts", "expert"),
    ("lora_rank", None),  # LoRA adapters: their other axes are the adapted kernel's (tweetjax/model/lora.py)
    # Activations.
    # Rows also split over `stage` outside the pipelined layers (embedding, LM head, loss: each stage group takes
    # its share instead of repeating the whole batch); inside, the pipeline gives `stage` to its stage dimension.
    ("act_batch", BATCH_AXES + ("stage",)),
    # Context parallelism: the sequence is split over `context` (ring attention, tweetjax/parallel/context.py).
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_experts", "expert"),
    ("act_stage", "stage"),  # the stage dimension of the pipeline's [stages, batch, length, embed] buffers
)


def normalize_rules(rules: Iterable[Sequence[Any]]) -> Rules:
  """Turns a rules table from a config (lists or tuples, axis lists) into the hashable form flax expects."""
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f"logical axis rule #{i} {rule!r}: expected (logical_name, mesh_axes)")
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      unknown = [a for a in axes if a not in MESH_AXES]
    else:
      unknown = [] if axes is None or axes in MESH_AXES else [axes]
    if unknown:
      raise ValueError(
          f"logical axis rule {name!r} -> {axes!r} names unknown mesh axes {unknown}; mesh axes are {list(MESH_AXES)}")
    out.append((str(name), axes))
  return tuple(out)


def mesh_axes_of(logical_name: str | None, rules: Rules) -> tuple[str, ...]:
  """The mesh axes one logical name maps to (first matching rule wins, as in flax)."""
  if logical_name is None:
    return ()
  for name, axes in rules:
    if name == logical_name:
      if axes is None:
        return ()
      return tuple(axes) if isinstance(axes, tuple) else (axes,)
  raise ValueError(f"logical axis {logical_name!r} has no rule in the logical axis rules table "
                   f"(known: {[name for name, _ in rules]})")


def logical_to_mesh_spec(logical: Sequence[str | None], rules: Rules) -> P:
  """Maps a tuple of logical names to a PartitionSpec, failing on names without a rule."""
  spec = []
  for name in logical:
    axes = mesh_axes_of(name, rules)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def logical_to_shardings(logical_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """PartitionSpec tree of logical names -> NamedSharding tree."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), rules)),
                      logical_tree, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a global batch: leading dimension over every data-parallel mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full (the same values everywhere).

  Each process places only its addressable shards. On multi-process meshes jit refuses numpy inputs with non-trivial
  shardings, so evaluation and sampling, which build their batches on every host alike, go through this.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def axis_size(mesh: Mesh, axes: Sequence[str]) -> int:
  size = 1
  for axis in axes:
    size *= mesh.shape[axis]
  return size


def rules_context(rules: Rules):
  """Context in which nn.with_logical_constraint resolves logical names with `rules`."""
  return nn.logical_axis_rules(rules)


def rules_from_config(config: Mapping[str, Any]) -> Rules:
  return normalize_rules(config.get("rules") or DEFAULT_RULES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules):
  """Mesh and logical rules in scope, so nn.with_logical_constraint resolves while a step is traced."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
