"""Analytic per-device memory of a train step, next to which the dry-run prints XLA's buffer assignment.

State (params, optimizer state, gradients) is exact: every leaf's shard shape under its NamedSharding (gradients of
the trained leaves only: with LoRA, the adapters). Activations
are a model, per device and per microbatch, with b rows per batch shard, L tokens, t = size of the mesh axes the
heads / mlp / vocab are split on, a = bytes of the compute dtype:

  saved per layer for the backward pass (what remat keeps):
    full            x                                   b L D a (the layer input; everything else recomputed)
    dots_no_batch   x + q, k, v + projections + gate/up b L (3 D + (H + 2K) Dh / t + 2 F / t) a
    dots            ... + attention weights             + b (H / t) L L a
    none            ... + fp32 norms, softmax, SwiGLU   + 2 b L D 4 + b (H / t) L L 4 + 2 b L F / t a
  transient (one layer's forward + backward):           3 b (H / t) L L 4 + 4 b L F / t 4 + 6 b L D 4
  logits and loss:                                      b L (V / t) (a + 4 + 4)  (logits, fp32 softmax, gradient)

Attention scores are counted as materialised (the 'xla' attention on CPU and what a non-fused kernel does); with
cuDNN flash attention on GPU the L x L terms mostly vanish. A MoE layer's MLP uses k * capacity_factor * expert
width in place of F.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np

from tweetjax.parallel.rules import axis_size, mesh_axes_of


def shard_bytes(abstract_tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs that carry shardings (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  params: int
  optimizer: int
  gradients: int  # gradients (param dtype) + the fp32 accumulator when microbatching
  activations_saved: int
  activations_transient: int
  logits: int
  attention_scores: int  # the L x L part of activations_saved + activations_transient (gone with flash attention)

  @property
  def total_flash_attention(self) -> int:
    """The GPU estimate with cuDNN flash attention: no materialised L x L scores."""
    return self.total - self.attention_scores

  @property
  def state(self) -> int:
    return self.params + self.optimizer

  @property
  def total(self) -> int:
    return (self.params + self.optimizer + self.gradients + self.activations_saved + self.activations_transient
            + self.logits)

  def as_dict(self) -> dict[str, int]:
    d = dataclasses.asdict(self)
    d["total"] = self.total
    d["total_flash_attention"] = self.total_flash_attention
    return d


@dataclasses.dataclass(frozen=True)
class Activations:
  saved: int  # all layers' saved activations of one microbatch
  transient: int  # the largest layer's forward + backward working set
  logits: int
  saved_scores: int  # the L x L part of `saved`
  transient_scores: int  # the L x L part of `transient`


def activations(cfg, b: int, L: int, t_heads: int, t_mlp: int, t_vocab: int, remat: str, dtype_bytes: int,
                layers: Sequence[int] | None = None) -> Activations:
  """The activation model of the module docstring for b rows of L tokens per device (layers: default all).

  `cfg` is a ModelConfig or anything with its shape fields, is_moe_layer() and moe_mlp_dim.
  """
  D, H, K, Dh, V = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
  a = dtype_bytes
  saved, transient, saved_scores, transient_scores = 0, 0, 0, 0
  for layer in range(cfg.num_layers) if layers is None else layers:
    F = cfg.mlp_dim
    if cfg.is_moe_layer(layer):
      F = int(cfg.experts_per_token * max(cfg.capacity_factor, 1.0) * cfg.moe_mlp_dim)
    x = b * L * D * a
    dots_no_batch = x + b * L * (3 * D + (H + 2 * K) * Dh // t_heads + 2 * F // t_mlp) * a
    scores = b * (H // t_heads) * L * L
    per_policy = {
        "full": x,
        "dots_no_batch": dots_no_batch,
        "dots": dots_no_batch + scores * a,
        "none": dots_no_batch + scores * a + 2 * b * L * D * 4 + scores * 4 + 2 * b * L * F // t_mlp * a,
    }
    saved += per_policy[remat]
    saved_scores += {"full": 0, "dots_no_batch": 0, "dots": scores * a, "none": scores * (a + 4)}[remat]
    transient = max(transient, 3 * scores * 4 + 4 * b * L * F // t_mlp * 4 + 6 * b * L * D * 4)
    transient_scores = 3 * scores * 4
  logits = b * L * (V // t_vocab) * (a + 8)
  return Activations(saved, transient, logits, saved_scores, transient_scores)


def estimate(experiment, global_batch: int, microbatches: int) -> MemoryEstimate:
  cfg = experiment.model_config
  mesh, rules, layout = experiment.mesh, experiment.rules, experiment.layout
  params = shard_bytes(layout.abstract_state.params)
  optimizer = shard_bytes(layout.abstract_state.opt_state)
  trained = layout.abstract_state.params
  if experiment.trainable is not None:  # LoRA: gradients of the adapters only
    trained = [x for x, t in zip(jax.tree.leaves(trained), jax.tree.leaves(experiment.trainable(trained))) if t]
  param_elems = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(trained))
  gradients = shard_bytes(trained) + (4 * param_elems if microbatches > 1 else 0)

  batch_shards = axis_size(mesh, mesh_axes_of("act_batch", rules))
  b = max(global_batch // microbatches // batch_shards, 1)
  act = activations(cfg, b, experiment.seq_len, axis_size(mesh, mesh_axes_of("act_heads", rules)),
                    axis_size(mesh, mesh_axes_of("act_mlp", rules)), axis_size(mesh, mesh_axes_of("act_vocab", rules)),
                    cfg.remat_policy, np.dtype(cfg.dtype).itemsize)
  return MemoryEstimate(params, optimizer, gradients, act.saved, act.transient, act.logits,
                        act.saved_scores + act.transient_scores)
