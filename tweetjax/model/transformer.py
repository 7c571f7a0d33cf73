"""Decoder-only transformer: embed -> N x (attention, SwiGLU MLP or mixture of experts) -> final norm -> LM head.

Dims: B batch, L length, D d_model, V vocab.
Layers are stacked with nn.scan (one compiled layer body, params with a leading "layers" axis) and wrapped in
nn.remat with the policy from the config. With a `pipeline` spec of more than one stage, the scanned stack runs
through tweetjax/parallel/pipeline.py instead (same params, same result); the model sees stages nowhere else.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tweetjax.model.attention import Attention
from tweetjax.model.config import ModelConfig
from tweetjax.model.layers import MLP, Embed, LMHead, RMSNorm, constrain, kernel_init, logical_param
from tweetjax.model.moe import MOE_STATS, MoE
from tweetjax.parallel import pipeline as pipeline_lib

# Checkpoint name of every layer's input: what any remat keeps at the least (the pipeline's per-iteration remat
# saves it by this name).
LAYER_INPUT = "layer_input"

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
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array,
               token_index_BxL: jax.Array | None = None):
    cfg = self.cfg
    x_BxLxD = checkpoint_name(x_BxLxD, LAYER_INPUT)
    sandwich = cfg.norm_style == "sandwich"
    h = RMSNorm(cfg, name="attention_norm")(x_BxLxD)
    h = Attention(cfg, name="attention")(h, positions_BxL, segment_ids_BxL, token_index_BxL)
    if sandwich:
      h = RMSNorm(cfg, name="attention_post_norm")(h)
    x_BxLxD = x_BxLxD + h
    h = RMSNorm(cfg, name="mlp_norm")(x_BxLxD)
    h = MoE(cfg, name="moe")(h, segment_ids_BxL) if self.use_moe else MLP(cfg, name="mlp")(h)
    if sandwich:
      h = RMSNorm(cfg, name="mlp_post_norm")(h)
    x_BxLxD = constrain(x_BxLxD + h, ("act_batch", "act_length", "act_embed"))
    return x_BxLxD, None


def _remat_policy(cfg: ModelConfig, pipelined: bool):
  if pipelined and cfg.remat_policy == "dots_no_batch":
    return pipeline_lib.dots_without_batch_dims_but_the_stage  # inside the pipeline's vmap over stages
  return _REMAT_POLICIES.get(cfg.remat_policy)


def _block_class(cfg: ModelConfig, pipelined: bool = False):
  if cfg.remat_policy == "none":
    return Block
  # prevent_cse only matters outside scan; inside it would block useful optimisations.
  return nn.remat(Block, policy=_remat_policy(cfg, pipelined), prevent_cse=not cfg.scan_layers)


class BlockGroup(nn.Module):
  """moe_every consecutive layers (block_0 .. block_{k-1}), the last one MoE: the scanned unit when MoE layers are
  interleaved with dense ones, so the scan keeps one compiled body and every param one leading "layers" axis."""
  cfg: ModelConfig
  pipelined: bool = False  # inside the pipeline: the remat policy that keeps the stage dimension's dots

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array,
               token_index_BxL: jax.Array | None = None):
    block, k = _block_class(self.cfg, self.pipelined), self.cfg.moe_every
    for i in range(k):
      x_BxLxD, _ = block(self.cfg, use_moe=i == k - 1, name=f"block_{i}")(x_BxLxD, positions_BxL, segment_ids_BxL,
                                                                          token_index_BxL)
    return x_BxLxD, None


def _scan_unit(cfg: ModelConfig, block, pipelined: bool = False):
  """(module class, its constructor kwargs, scan length): one layer, or a BlockGroup of moe_every layers."""
  if cfg.num_experts and cfg.moe_every > 1:
    return BlockGroup, {"pipelined": pipelined}, cfg.num_layers // cfg.moe_every
  return block, {"use_moe": cfg.num_experts > 0}, cfg.num_layers


def _scanned(cfg: ModelConfig, unit, length: int):
  return nn.scan(unit, variable_axes={"params": 0, "cache": 0, MOE_STATS: 0},
                 split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                 length=length, metadata_params={nn.PARTITION_NAME: "layers"})


class Transformer(nn.Module):
  cfg: ModelConfig
  pipeline: pipeline_lib.PipelineSpec | None = None  # stages > 1: the layer scan runs as a pipeline

  @nn.compact
  def __call__(self, inputs_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, *, return_hidden: bool = False, logits: bool = True,
               token_index_BxL: jax.Array | None = None):
    """Returns logits_BxLxV (and the final-norm hidden states when `return_hidden`).

    logits=False returns (hidden_BxLxD, LMHead) instead, without computing any logits: for the tiled loss
    (config.model.logits_chunk) and for callers that need the logits of a few positions only.
    token_index_BxL: the original index of every slot when the rows were reordered for the load-balanced context
    split (tweetjax/parallel/context.py); attention's causality follows it. None: the natural order.
    """
    cfg = self.cfg
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[1]), inputs_BxL.shape)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(inputs_BxL)
    if token_index_BxL is None:
      token_index_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[1], dtype=jnp.int32), inputs_BxL.shape)

    embed = Embed(cfg, name="embed")
    x_BxLxD = embed(inputs_BxL)
    pipelined = cfg.scan_layers and self._pipelined(inputs_BxL.shape[0])
    block = _block_class(cfg, pipelined)
    if cfg.scan_layers:
      unit, unit_kwargs, length = _scan_unit(cfg, block, pipelined)
      per_token = (positions_BxL, segment_ids_BxL, token_index_BxL)
      if pipelined:
        x_BxLxD = self._pipeline_layers(unit, unit_kwargs, length, x_BxLxD, per_token)
      else:
        layers = _scanned(cfg, unit, length)
        x_BxLxD, _ = layers(cfg, **unit_kwargs, name="layers")(x_BxLxD, *per_token)
    else:
      for i in range(cfg.num_layers):
        x_BxLxD, _ = block(cfg, use_moe=cfg.is_moe_layer(i), name=f"layers_{i}")(x_BxLxD, positions_BxL,
                                                                                  segment_ids_BxL, token_index_BxL)
    hidden_BxLxD = RMSNorm(cfg, name="final_norm")(x_BxLxD)

    if cfg.tie_embeddings:
      head = LMHead(embed.embedding_VxD, cfg)
    else:
      head = LMHead(logical_param(self, "lm_head", kernel_init(0, 1), (cfg.d_model, cfg.vocab_size),
                                  ("embed", "vocab"), cfg), cfg)
    if not logits:
      return hidden_BxLxD, head
    logits_BxLxV = head(hidden_BxLxD)
    logits_BxLxV = constrain(logits_BxLxV, ("act_batch", "act_length", "act_vocab"))
    if return_hidden:
      return logits_BxLxV, hidden_BxLxD
    return logits_BxLxV

  def _pipelined(self, batch: int) -> bool:
    """Pipeline the layers unless there is one stage, params are being created, a KV cache is being filled
    (decoding), or the batch does not split into the microbatches (a short evaluation batch; the plain scan is
    then correct, only slower, as the stage-sharded weights are gathered)."""
    spec = self.pipeline
    return (spec is not None and spec.stages > 1 and not self.is_initializing()
            and not self.is_mutable_collection("cache") and batch % spec.microbatches == 0)

  def _pipeline_layers(self, unit, unit_kwargs, length, x_BxLxD, per_token):
    """The scanned stack through the pipeline: each stage applies its units of the same "layers" params."""
    cfg, spec = self.cfg, self.pipeline
    stage_stack = _scanned(cfg, unit, length // (spec.stages * spec.repeats))(cfg, **unit_kwargs, parent=None)
    moe = cfg.num_experts > 0

    def stage_fn(params, x, *per_token):
      if moe:
        (y, _), variables = stage_stack.apply({"params": params}, x, *per_token, mutable=[MOE_STATS])
        return y, variables[MOE_STATS]
      y, _ = stage_stack.apply({"params": params}, x, *per_token)
      return y, {}

    y_BxLxD, stats = pipeline_lib.run(stage_fn, self.variables["params"]["layers"], x_BxLxD, per_token, spec,
                                      remat_policy=_remat_policy(cfg, True), saved_names=(LAYER_INPUT,))
    if moe:  # same collection layout as the scan's: {"layers": {...: [units, microbatches]}}
      self.put_variable(MOE_STATS, "layers", stats)
    return constrain(y_BxLxD, ("act_batch", "act_length", "act_embed"))
