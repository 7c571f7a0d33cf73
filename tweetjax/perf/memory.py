"""Analytic per-device memory of a train step, next to which the dry-run prints XLA's buffer assignment.

State (params, optimizer state, gradients) is exact: every leaf's shard shape under its NamedSharding (gradients of
the trained leaves only: with LoRA, the adapters). Activations
are a model, per device and per microbatch, with b rows per batch shard, L tokens, t = size of the mesh axes the
heads / mlp / vocab are split on, a = bytes of the compute dtype:

  saved per layer for the backward pass (what remat keeps):
    full            x                                   b L D a / e (the layer input, split e ways when
                                                        act_embed is sharded; everything else recomputed)
    dots_no_batch   x + q, k, v + projections + gate/up b L (3 D + (H + 2K) Dh / t + 2 F / t) a
    dots            ... + attention weights             + b (H / t) L L a
    none            ... + fp32 norms, softmax, SwiGLU   + 2 b L D 4 + b (H / t) L L 4 + 2 b L F / t a
  transient (one layer's forward + backward):           3 b (H / t) L L 4 + 4 b L F / t 4 + 6 b L D 4
  logits and loss:                                      b L (V / t) (a + 4 + 4)  (logits, fp32 softmax, gradient)

Attention scores are counted as materialised (the 'xla' attention on CPU and what a non-fused kernel does); with
cuDNN flash attention on GPU the L x L terms mostly vanish. attention_impl='blockwise' keeps no scores for the
backward (its custom VJP saves the output and a log-sum-exp per row, b (H / t) L 4) and its transient scores are one
block pair's, L x L -> block x block. With model.logits_chunk = c > 0 the logits term becomes one chunk's,
c (V / t) 4 x 4 (logits, probabilities, their gradient, one more elementwise temporary), plus the fp32 head-weight
gradient D (V / t) 4 and the hidden-state gradient b L D 4 that the tiled loss forms in its forward pass.
A MoE layer's MLP uses k * capacity_factor * expert width in place of F.

With a pipeline (S stages, R repeats, M microbatches, T = R M + S - 1 iterations) a layer runs on b / M rows, and
each device saves its own N / (S R) units' residuals in every one of the T iterations (bubble iterations too):
T / (S R) x the per-layer terms at b / M, plus the microbatch buffer, (M + 2) (b / M) L D a. With the sequence
split c ways over `context`, L above is the device's L / c tokens; ring attention then holds one chunk pair's
scores at a time, b (H / t) (L / 2c)^2, in place of the L x L terms (blockwise attention does not apply there).
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
  attention_scores: int  # the score part of activations_saved + activations_transient (gone with flash attention)

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
  saved_scores: int  # the attention-score part of `saved`
  transient_scores: int  # the attention-score part of `transient`


def activations(cfg, b: int, L: int, t_heads: int, t_mlp: int, t_vocab: int, remat: str, dtype_bytes: int,
                layers: Sequence[int] | None = None, e_embed: int = 1,
                score_block: tuple[int, int] | None = None) -> Activations:
  """The activation model of the module docstring for b rows of L tokens per device (layers: default all).

  `cfg` is a ModelConfig or anything with its shape fields, is_moe_layer() and moe_mlp_dim. e_embed: the shards
  of the residual stream's d_model ("act_embed"). score_block: (queries, keys) of one materialised score block
  (default (L, L); ring attention: two chunks, (L / 2, L / 2); gathered K/V: (L, the whole sequence)).
  """
  score_q, score_k = (L, L) if score_block is None else score_block
  D, H, K, Dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  a = dtype_bytes
  saved, transient, saved_scores, transient_scores = 0, 0, 0, 0
  # A shape without these fields (the layout search's ModelShape) is the dense-logits, materialised-scores case.
  # A split sequence runs the context attention (score_block given), never the blockwise kernel.
  blockwise = getattr(cfg, "attention_impl", "xla") == "blockwise" and score_block is None
  block = min(getattr(cfg, "attention_block_size", L), L)
  for layer in range(cfg.num_layers) if layers is None else layers:
    F = cfg.mlp_dim
    if cfg.is_moe_layer(layer):
      F = int(cfg.experts_per_token * max(cfg.capacity_factor, 1.0) * cfg.moe_mlp_dim)
    x = b * L * D * a // e_embed
    dots_no_batch = x + b * L * (3 * D + (H + 2 * K) * Dh // t_heads + 2 * F // t_mlp) * a
    # Scores kept for the backward (none with blockwise: its custom VJP saves a log-sum-exp row instead) and the
    # transient ones of one layer (blockwise: one block pair at a time).
    scores = 0 if blockwise else b * (H // t_heads) * score_q * score_k
    scores_transient = b * (H // t_heads) * (block * block if blockwise else score_q * score_k)
    lse = b * (H // t_heads) * L * 4 if blockwise and remat != "full" else 0
    per_policy = {
        "full": x,
        "dots_no_batch": dots_no_batch + lse,
        "dots": dots_no_batch + scores * a + lse,
        "none": dots_no_batch + scores * a + 2 * b * L * D * 4 + scores * 4 + 2 * b * L * F // t_mlp * a + lse,
    }
    saved += per_policy[remat]
    saved_scores += {"full": 0, "dots_no_batch": 0, "dots": scores * a, "none": scores * (a + 4)}[remat]
    transient = max(transient, 3 * scores_transient * 4 + 4 * b * L * F // t_mlp * 4 + 6 * b * L * D * 4)
    transient_scores = 3 * scores_transient * 4
  return Activations(saved, transient, logits_bytes(cfg, b, L, t_vocab, a), saved_scores, transient_scores)


def logits_bytes(cfg, b: int, L: int, t_vocab: int, dtype_bytes: int) -> int:
  """The LM head + loss of b rows of L tokens on one vocab shard: dense logits, their fp32 softmax and gradient; or,
  with model.logits_chunk = c, one chunk's logits and temporaries plus the head's fp32 weight gradient and dh."""
  V, D, chunk = cfg.vocab_size, cfg.d_model, getattr(cfg, "logits_chunk", 0)
  if chunk:
    return min(chunk, b * L) * (V // t_vocab) * 16 + D * (V // t_vocab) * 4 + b * L * D * 4
  return b * L * (V // t_vocab) * (dtype_bytes + 8)


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

  size = lambda name: axis_size(mesh, mesh_axes_of(name, rules))
  b_step = max(global_batch // microbatches // size("act_batch"), 1)  # rows per device of the step's microbatch
  spec = getattr(experiment.model, "pipeline", None)
  pipelined = spec is not None and spec.stages > 1
  b = max(b_step * spec.stages // spec.microbatches, 1) if pipelined else b_step  # rows a layer runs on
  c = size("act_length")
  L = experiment.seq_len // c
  ring = c > 1 and cfg.context_attention == "ring"
  act = activations(cfg, b, L, size("act_heads"), size("act_mlp"), size("act_vocab"), cfg.remat_policy,
                    np.dtype(cfg.dtype).itemsize, e_embed=size("act_embed"),
                    score_block=None if c == 1 else (L // 2, L // 2) if ring else (L, experiment.seq_len))
  saved, saved_scores = act.saved, act.saved_scores
  if pipelined:
    saved = saved * spec.iterations // (spec.stages * spec.repeats) + (spec.microbatches + 2) * b * L * cfg.d_model * \
        np.dtype(cfg.dtype).itemsize
    saved_scores = saved_scores * spec.iterations // (spec.stages * spec.repeats)
  # The loss runs on the step's microbatch rows, after the pipeline.
  logits = logits_bytes(cfg, b_step, L, size("act_vocab"), np.dtype(cfg.dtype).itemsize)
  return MemoryEstimate(params, optimizer, gradients, saved, act.transient, logits, saved_scores + act.transient_scores)
