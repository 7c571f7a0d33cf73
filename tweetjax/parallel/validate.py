"""Layout checks that run on shapes only (eval_shape), before anything is compiled or allocated.

Every error names the config key, its size and the mesh axes that must divide it.
"""

from __future__ import annotations

from typing import Any, Iterable

import flax.linen as nn
import jax
from jax.sharding import Mesh

from tweetjax.parallel.mesh import MeshError
from tweetjax.parallel.rules import Rules, axis_size, mesh_axes_of

# Which config key a logical dimension comes from, for error messages.
LOGICAL_SOURCES = {
    "vocab": "model.vocab_size", "act_vocab": "model.vocab_size",
    "embed": "model.d_model", "act_embed": "model.d_model", "expert_embed": "model.d_model",
    "heads": "model.num_heads", "act_heads": "model.num_heads",
    "kv_heads": "model.num_kv_heads", "act_kv_heads": "model.num_kv_heads",
    "head_dim": "model.head_dim", "act_head_dim": "model.head_dim",
    "mlp": "model.mlp_dim or model.expert_mlp_dim", "act_mlp": "model.mlp_dim",
    "experts": "model.num_experts", "act_experts": "model.num_experts",
    "layers": "model.num_layers", "lora_rank": "lora.rank",
    "act_batch": "data.global_batch_size / train.microbatches",
    "act_length": "data.seq_len",
}


def _check_divisible(what: str, logical: str, size: int, mesh: Mesh, rules: Rules) -> None:
  axes = mesh_axes_of(logical, rules)
  shards = axis_size(mesh, axes)
  if size % shards:
    source = LOGICAL_SOURCES.get(logical, logical)
    raise MeshError(
        f"{what}: dimension '{logical}' ({source}) of size {size} is not divisible by mesh axes {list(axes)} "
        f"of total size {shards} (mesh {dict(mesh.shape)}); change the size, the mesh, or the rule for '{logical}'")


def boxed_leaves(abstract_boxed: Any) -> Iterable[tuple[str, nn.Partitioned]]:
  """(path, box) for every logically partitioned leaf of an eval_shape'd variable tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in flat:
    yield "/".join(_key_name(k) for k in path), leaf


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def validate_params(abstract_boxed_params: Any, mesh: Mesh, rules: Rules) -> None:
  for path, box in boxed_leaves(abstract_boxed_params):
    if not isinstance(box, nn.Partitioned):
      raise MeshError(f"param {path} has no logical axis names; annotate it with nn.with_logical_partitioning")
    shape = box.value.shape
    if len(box.names) != len(shape):
      raise MeshError(f"param {path}: {len(box.names)} logical names {box.names} for a rank-{len(shape)} array")
    for logical, size in zip(box.names, shape):
      if logical is None:
        continue
      try:
        _check_divisible(f"param {path} {tuple(shape)}", logical, size, mesh, rules)
      except ValueError as e:
        if isinstance(e, MeshError):
          raise
        raise MeshError(f"param {path}: {e}") from None


def validate_activations(sizes: dict[str, int], mesh: Mesh, rules: Rules) -> None:
  """`sizes` maps activation logical names (act_batch, act_heads, ...) to their sizes."""
  for logical, size in sizes.items():
    _check_divisible("activations", logical, size, mesh, rules)
