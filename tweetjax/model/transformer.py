"""Decoder-only transformer: embed -> N x (attention, SwiGLU MLP or mixture of experts) -> final norm -> LM head.

Dims: B batch, L length, D d_model, V vocab.
Layers are stacked with nn.scan (one compiled layer body, params with a leading "layers" axis) and wrapped in
nn.remat with the policy from the config.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tweetjax.model.attention import Attention
from tweetjax.model.config import ModelConfig
from tweetjax.model.layers import MLP, Embed, RMSNorm, constrain, kernel_init, logical_param
from tweetjax.model.moe import MOE_STATS, MoE

_REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Block(nn.Module):
  """One pre-norm (or grok-1 sandwich-norm) transformer layer. Signature fits nn.scan: (carry, *bcast) -> carry, _."""
  cfg: ModelConfig
  use_moe: bool = False  # mixture-of-experts MLP (param "moe") instead of the dense one ("mlp")

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array):
    cfg = self.cfg
    sandwich = cfg.norm_style == "sandwich"
    h = RMSNorm(cfg, name="attention_norm")(x_BxLxD)
    h = Attention(cfg, name="attention")(h, positions_BxL, segment_ids_BxL)
    if sandwich:
      h = RMSNorm(cfg, name="attention_post_norm")(h)
    x_BxLxD = x_BxLxD + h
    h = RMSNorm(cfg, name="mlp_norm")(x_BxLxD)
    h = MoE(cfg, name="moe")(h, segment_ids_BxL) if self.use_moe else MLP(cfg, name="mlp")(h)
    if sandwich:
      h = RMSNorm(cfg, name="mlp_post_norm")(h)
    x_BxLxD = constrain(x_BxLxD + h, ("act_batch", "act_length", "act_embed"))
    return x_BxLxD, None


def _block_class(cfg: ModelConfig):
  if cfg.remat_policy == "none":
    return Block
  # prevent_cse only matters outside scan; inside it would block useful optimisations.
  return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class BlockGroup(nn.Module):
  """moe_every consecutive layers (block_0 .. block_{k-1}), the last one MoE: the scanned unit when MoE layers are
  interleaved with dense ones, so the scan keeps one compiled body and every param one leading "layers" axis."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array):
    block, k = _block_class(self.cfg), self.cfg.moe_every
    for i in range(k):
      x_BxLxD, _ = block(self.cfg, use_moe=i == k - 1, name=f"block_{i}")(x_BxLxD, positions_BxL, segment_ids_BxL)
    return x_BxLxD, None


def _scan_unit(cfg: ModelConfig, block):
  """(module class, its constructor kwargs, scan length): one layer, or a BlockGroup of moe_every layers."""
  if cfg.num_experts and cfg.moe_every > 1:
    return BlockGroup, {}, cfg.num_layers // cfg.moe_every
  return block, {"use_moe": cfg.num_experts > 0}, cfg.num_layers


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, *, return_hidden: bool = False):
    """Returns logits_BxLxV (and the final-norm hidden states when `return_hidden`)."""
    cfg = self.cfg
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[1]), inputs_BxL.shape)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(inputs_BxL)

    embed = Embed(cfg, name="embed")
    x_BxLxD = embed(inputs_BxL)
    block = _block_class(cfg)
    if cfg.scan_layers:
      unit, unit_kwargs, length = _scan_unit(cfg, block)
      layers = nn.scan(unit, variable_axes={"params": 0, "cache": 0, MOE_STATS: 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=length,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxLxD, _ = layers(cfg, **unit_kwargs, name="layers")(x_BxLxD, positions_BxL, segment_ids_BxL)
    else:
      for i in range(cfg.num_layers):
        x_BxLxD, _ = block(cfg, use_moe=cfg.is_moe_layer(i), name=f"layers_{i}")(x_BxLxD, positions_BxL,
                                                                                  segment_ids_BxL)
    hidden_BxLxD = RMSNorm(cfg, name="final_norm")(x_BxLxD)

    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(hidden_BxLxD)
    else:
      head_DxV = logical_param(self, "lm_head", kernel_init(0, 1), (cfg.d_model, cfg.vocab_size),
                               ("embed", "vocab"), cfg)
      logits_BxLxV = jnp.einsum("bld,dv->blv", hidden_BxLxD, head_DxV.astype(cfg.compute_dtype))
    if cfg.final_logit_softcap:
      cap = cfg.final_logit_softcap
      logits_BxLxV = (cap * jnp.tanh(logits_BxLxV.astype(jnp.float32) / cap)).astype(logits_BxLxV.dtype)
    if 0 < cfg.valid_vocab_size < cfg.vocab_size:
      # The most negative finite value, not -inf: exp gives exactly 0 and p * log p stays 0 instead of NaN.
      real_V = jnp.arange(cfg.vocab_size) < cfg.valid_vocab_size
      logits_BxLxV = jnp.where(real_V, logits_BxLxV, jnp.finfo(logits_BxLxV.dtype).min)
    logits_BxLxV = constrain(logits_BxLxV, ("act_batch", "act_length", "act_vocab"))
    if return_hidden:
      return logits_BxLxV, hidden_BxLxD
    return logits_BxLxV
