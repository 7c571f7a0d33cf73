"""Building blocks: RMSNorm, token embedding, the LM head, SwiGLU MLP.

Dims: B batch, L length, D d_model, F mlp hidden, V vocab.
Parameters are created in `param_dtype` with logical axis names; compute runs in `dtype`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tweetjax.model import quantize
from tweetjax.model import lora
from tweetjax.model.config import ModelConfig
from tweetjax.model.matmul import contract, contract_each, matmul, resolve, row_major_transpose

Axes = Sequence[str | None]


def kernel_init(in_axis, out_axis):
  """Fan-in scaled truncated normal over possibly multi-dimensional fan-in/fan-out axes."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def logical_param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: Axes, cfg: ModelConfig):
  if module.has_variable("params", name):
    value = module.get_variable("params", name)
    if isinstance(value, (quantize.Int8Kernel, quantize.Int8FusedMember)):
      return value  # int8 sampling weights (quantize.prepare_weights): shapes of their own, e.g. fused q/k/v
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, cfg.weight_dtype)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    scale_D = logical_param(self, "scale", nn.initializers.ones, (x_BxLxD.shape[-1],), ("norm",), self.cfg)
    # Statistics in fp32 whatever the compute dtype: bf16 mean-of-squares loses too many bits.
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (x * scale_D.astype(jnp.float32)).astype(self.cfg.compute_dtype)


class Embed(nn.Module):
  """Token embedding; with tied embeddings the table is also the LM head's weight (LMHead)."""
  cfg: ModelConfig

  def setup(self):
    self.embedding_VxD = logical_param(self, "embedding", nn.initializers.normal(self.cfg.init_std),
                                       (self.cfg.vocab_size, self.cfg.d_model), ("vocab", "embed"), self.cfg)

  def __call__(self, ids_BxL: jax.Array) -> jax.Array:
    # Gather the table over its `embed` shards first (as FSDP does for every weight) but keep it split over vocab:
    # the lookup is then a masked local gather plus a reduction over the vocab shards, and its output comes out in
    # the batch sharding of the ids instead of one that XLA can only reach by rematerialising the whole gather.
    if isinstance(self.embedding_VxD, quantize.Int8Table):  # int8 sampling weights: dequantise the rows taken
      table = self.embedding_VxD
      x_BxLxD = (jnp.take(table.q_VxD, ids_BxL, axis=0).astype(jnp.float32)
                 * jnp.take(table.scale_V, ids_BxL, axis=0)[..., None]).astype(self.cfg.compute_dtype)
      return constrain(x_BxLxD, ("act_batch", "act_length", "act_embed"))
    if isinstance(self.embedding_VxD, quantize.BitsTable):  # bf16 sampling weights, untied: a uint16 gather
      table = quantize.BitsTable(constrain(self.embedding_VxD.bits_VxD, ("vocab", None)))
      x_BxLxD = table.take(ids_BxL).astype(self.cfg.compute_dtype)
      return constrain(x_BxLxD, ("act_batch", "act_length", "act_embed"))
    table_VxD = constrain(self.embedding_VxD.astype(self.cfg.compute_dtype), ("vocab", None))
    x_BxLxD = jnp.take(table_VxD, ids_BxL, axis=0)
    return constrain(x_BxLxD, ("act_batch", "act_length", "act_embed"))


@flax.struct.dataclass
class LMHead:
  """The output layer: final hidden states -> logits. One definition serves the dense logits of the model (training,
  evaluation, decoding) and the tiled loss (tweetjax/parallel/losses.py), which applies `finalize` to one
  [tokens, vocab-shard] block at a time.

  `weight` is the untied `lm_head` [D, V] or, with tied embeddings, the embedding table [V, D] (param dtype).
  """
  weight: jax.Array
  cfg: ModelConfig = flax.struct.field(pytree_node=False)

  @property
  def vocab_axis(self) -> int:
    """Which axis of `weight` is the vocab: 0 for the tied [V, D] table, 1 for the untied [D, V] head."""
    return 0 if self.cfg.tie_embeddings else 1

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg, w = self.cfg, self.weight
    if isinstance(w, quantize.Int8Table):  # tied int8 sampling weights: the table's int8 [D, V] copy
      B, L, D = x_BxLxD.shape
      z_BxLxV = quantize.int8_matmul(x_BxLxD.reshape(B * L, D), w.q_DxV, w.scale_V, cfg.compute_dtype)
      return self.finalize(z_BxLxV.reshape(B, L, -1))
    if self.vocab_axis == 1:  # [D, V] (or an int8 sampling kernel)
      return self.finalize(contract(x_BxLxD, w, 1, cfg.matmul_impl, cfg.compute_dtype))
    if resolve(cfg.matmul_impl, cfg.compute_dtype) == "cpu_bf16":  # the table as a row-major [D, V] operand
      table_DxV = row_major_transpose(w.astype(cfg.compute_dtype))
      return self.finalize(contract(x_BxLxD, table_DxV, 1, cfg.matmul_impl, cfg.compute_dtype))
    return self.finalize(jnp.einsum("bld,vd->blv", x_BxLxD, w.astype(cfg.compute_dtype)))

  def finalize(self, z_xV: jax.Array, vocab_start: int | jax.Array = 0) -> jax.Array:
    return finalize_logits(self.cfg, z_xV, vocab_start)


def finalize_logits(cfg: ModelConfig, z_xV: jax.Array, vocab_start: int | jax.Array = 0) -> jax.Array:
  """Elementwise end of the LM head: the final-logit soft-cap and the mask of vocab padding, on logits whose last
  axis holds the vocab ids [vocab_start, vocab_start + z_xV.shape[-1])."""
  if cfg.final_logit_softcap:
    cap = cfg.final_logit_softcap
    z_xV = (cap * jnp.tanh(z_xV.astype(jnp.float32) / cap)).astype(z_xV.dtype)
  if 0 < cfg.valid_vocab_size < cfg.vocab_size:
    # The most negative finite value, not -inf: exp gives exactly 0 and p * log p stays 0 instead of NaN.
    real_V = vocab_start + jnp.arange(z_xV.shape[-1]) < cfg.valid_vocab_size
    z_xV = jnp.where(real_V, z_xV, jnp.finfo(z_xV.dtype).min)
  return z_xV


class MLP(nn.Module):
  """SwiGLU feed-forward: (silu(x W_gate) * x W_up) W_down."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    D, F = cfg.d_model, cfg.mlp_dim
    dt = cfg.compute_dtype
    gate_DxF = logical_param(self, "gate", kernel_init(0, 1), (D, F), ("embed", "mlp"), cfg)
    up_DxF = logical_param(self, "up", kernel_init(0, 1), (D, F), ("embed", "mlp"), cfg)
    down_FxD = logical_param(self, "down", kernel_init(0, 1), (F, D), ("mlp", "embed"), cfg)
    # 2-D matmuls over the flattened tokens (N = B*L): from 3-D einsums XLA:CPU stores the backward's SwiGLU
    # products transposed for the weight-gradient dots, ~18% of a small.py fp32 step (benchmarks/RESULTS.md).
    B, L, _ = x_BxLxD.shape
    x_NxD = x_BxLxD.reshape(B * L, D)
    gate_NxF, up_NxF = contract_each(x_NxD, (gate_DxF, up_DxF), 1, cfg.matmul_impl, dt)
    gate_NxF = lora.adapt(self, "gate", x_NxD, gate_NxF, ("embed", "mlp"))
    up_NxF = lora.adapt(self, "up", x_NxD, up_NxF, ("embed", "mlp"))
    h_BxLxF = constrain((nn.silu(gate_NxF) * up_NxF).reshape(B, L, F), ("act_batch", "act_length", "act_mlp"))
    h_NxF = h_BxLxF.reshape(B * L, F)
    out_NxD = lora.adapt(self, "down", h_NxF, matmul(h_NxF, down_FxD, cfg.matmul_impl, dt), ("mlp", "embed"))
    return constrain(out_NxD.reshape(B, L, D), ("act_batch", "act_length", "act_embed"))
