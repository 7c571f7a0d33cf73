"""Grouped-query attention with RoPE and a segment-aware causal mask.

Dims: B batch, L query length, S key length, D d_model, H query heads, K kv heads, G = H // K query heads per kv
head, Dh head dim.

Packed rows hold several tweets: a token attends only to earlier tokens of its own segment (segment_ids equal), and
positions restart at 0 in every segment, so a packed tweet sees exactly what it would see alone.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tweetjax.model import lora
from tweetjax.model.blockwise import blockwise_attention
from tweetjax.model.config import ModelConfig
from tweetjax.model.layers import constrain, kernel_init, logical_param
from tweetjax.model.matmul import contract, contract_each
from tweetjax.parallel import context as context_lib


def rope_inv_freq(head_dim: int, theta: float, cfg: ModelConfig | None = None) -> jax.Array:
  """The head_dim // 2 RoPE inverse frequencies theta^(-2i/Dh), rescaled as `cfg.rope_scaling` says (None: plain)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim))
  if cfg is None or cfg.rope_scaling == "none":
    return inv_freq
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling == "linear":
    return inv_freq / factor
  # llama3: long wavelengths (beyond the pre-training context / low_freq_factor) are stretched by `factor`, short
  # ones (below context / high_freq_factor) kept, those in between interpolated linearly in context / wavelength.
  context, low, high = cfg.rope_original_max_position, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelength = 2 * math.pi / inv_freq
  stretched = jnp.where(wavelength > context / low, inv_freq / factor, inv_freq)
  smooth = (context / wavelength - low) / (high - low)
  interpolated = (1 - smooth) * stretched / factor + smooth * stretched
  medium = (wavelength >= context / high) & (wavelength <= context / low)
  return jnp.where(medium, interpolated, stretched)


def apply_rope(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, theta: float,
               cfg: ModelConfig | None = None) -> jax.Array:
  """Rotary embedding, rotate-half convention (first half of the head dim pairs with the second); `cfg` supplies
  the frequency scaling (rope_inv_freq)."""
  inv_freq = rope_inv_freq(x_BxLxHxDh.shape[-1], theta, cfg)
  angles_BxLx1xHalf = (positions_BxL.astype(jnp.float32)[:, :, None] * inv_freq)[:, :, None, :]
  sin, cos = jnp.sin(angles_BxLx1xHalf), jnp.cos(angles_BxLx1xHalf)
  x1, x2 = jnp.split(x_BxLxHxDh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxDh.dtype)


def attention_mask(q_segment_ids_BxL: jax.Array, kv_segment_ids_BxS: jax.Array,
                   q_positions_BxL: jax.Array | None = None, kv_positions_BxS: jax.Array | None = None) -> jax.Array:
  """Boolean [B, 1, L, S] mask: same segment and key not after the query.

  Causality is by index (query i sees keys j <= i + S - L), which is what a packed row and a KV cache both need.
  With explicit per-row slot indices (`q_positions_BxL`, `kv_positions_BxS`: where each token sits in the key
  sequence, e.g. KV-cache slots) a query sees the keys whose slot is not after its own.
  """
  L, S = q_segment_ids_BxL.shape[1], kv_segment_ids_BxS.shape[1]
  same_segment_BxLxS = q_segment_ids_BxL[:, :, None] == kv_segment_ids_BxS[:, None, :]
  if q_positions_BxL is not None and kv_positions_BxS is not None:
    return (same_segment_BxLxS & (kv_positions_BxS[:, None, :] <= q_positions_BxL[:, :, None]))[:, None]
  causal_LxS = jnp.arange(L)[:, None] + (S - L) >= jnp.arange(S)[None, :]
  return (same_segment_BxLxS & causal_LxS[None])[:, None]


def reference_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, *, softcap: float = 0.0):
  """Plain einsum attention in fp32 softmax; the spec the fused paths are tested against."""
  B, L, H, Dh = q_BxLxHxDh.shape
  K = k_BxSxKxDh.shape[2]
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(B, L, K, H // K, Dh)
  logits_BxKxGxLxS = jnp.einsum("blkgd,bskd->bkgls", q_BxLxKxGxDh, k_BxSxKxDh,
                                preferred_element_type=jnp.float32) * (Dh ** -0.5)
  if softcap:
    logits_BxKxGxLxS = softcap * jnp.tanh(logits_BxKxGxLxS / softcap)
  logits_BxKxGxLxS = jnp.where(mask_Bx1xLxS[:, :, None], logits_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v_BxSxKxDh.dtype)
  out_BxLxKxGxDh = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxSxKxDh)
  return out_BxLxKxGxDh.reshape(B, L, H, Dh)


def dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, *, impl: str, softcap: float = 0.0):
  """Dispatches to jax.nn.dot_product_attention ('xla', 'cudnn') or the reference einsum path."""
  if impl == "reference" or softcap:
    # jax.nn.dot_product_attention has no logit soft-cap; the einsum path is what XLA would fuse anyway.
    return reference_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, softcap=softcap)
  return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask_Bx1xLxS, implementation=impl)


def cached_attention(q_BxLxHxDh, kt_BxKxDhxS, v_BxKxSxDh, mask_Bx1xLxS, *, softcap: float = 0.0):
  """Attention of L new queries over a KV cache: keys [B, K, Dh, S], values [B, K, S, Dh] (the reference's math,
  fp32 softmax).

  The cache's layouts are the ones both products take untransposed: [B, K] batch dims first, then q [GL, Dh] x
  k^T [Dh, S] and p [GL, S] x v [S, Dh], so XLA reads the cache as it is instead of transposing all of it for every
  generated token (with a [B, S, K, Dh] cache those transposes were ~25% of a decode step on a CPU; with keys as
  [B, K, S, Dh], q k^T has a transposed operand, and XLA:CPU took 0.26 ms per layer for it at batch 16 against
  0.11 ms with keys as [B, K, Dh, S]). Only the L queries are regrouped: the G = H / K query heads of a kv head
  become rows, [B, K, G * L, Dh].
  """
  B, L, H, Dh = q_BxLxHxDh.shape
  K = kt_BxKxDhxS.shape[1]
  G = H // K
  q_BxKxGLxDh = q_BxLxHxDh.reshape(B, L, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * L, Dh)
  logits_BxKxGLxS = jnp.einsum("bkqd,bkds->bkqs", q_BxKxGLxDh.astype(kt_BxKxDhxS.dtype), kt_BxKxDhxS,
                               preferred_element_type=jnp.float32) * (Dh ** -0.5)
  if softcap:
    logits_BxKxGLxS = softcap * jnp.tanh(logits_BxKxGLxS / softcap)
  S = logits_BxKxGLxS.shape[-1]
  logits_BxKxGxLxS = logits_BxKxGLxS.reshape(B, K, G, L, S)
  logits_BxKxGxLxS = jnp.where(mask_Bx1xLxS[:, :, None], logits_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).reshape(B, K, G * L, S).astype(v_BxKxSxDh.dtype)
  out_BxKxGLxDh = jnp.einsum("bkqs,bksd->bkqd", probs_BxKxGLxS, v_BxKxSxDh, preferred_element_type=jnp.float32)
  out_BxLxHxDh = out_BxKxGLxDh.reshape(B, K, G, L, Dh).transpose(0, 3, 1, 2, 4).reshape(B, L, H, Dh)
  return out_BxLxHxDh.astype(q_BxLxHxDh.dtype)


# KV-cache layouts, keys [B, K, Dh, S] and values [B, K, S, Dh] (cached_attention says why), sharded like the
# attention heads. The length axis stays unsharded: decoding writes one slot at a time, and a length-sharded cache
# would send every write to one shard.
CACHE_KEY_AXES = ("act_batch", "act_kv_heads", "act_head_dim", None)
CACHE_VALUE_AXES = ("act_batch", "act_kv_heads", None, "act_head_dim")


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array,
               token_index_BxL: jax.Array | None = None) -> jax.Array:
    """token_index_BxL: each slot's index in the original row when the sequence was reordered (the load-balanced
    context split); causality follows it. None: the natural order."""
    cfg = self.cfg
    D, H, K, Dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = cfg.compute_dtype
    wq_DxHxDh = logical_param(self, "query", kernel_init(0, (1, 2)), (D, H, Dh), ("embed", "heads", "head_dim"), cfg)
    wk_DxKxDh = logical_param(self, "key", kernel_init(0, (1, 2)), (D, K, Dh), ("embed", "kv_heads", "head_dim"), cfg)
    wv_DxKxDh = logical_param(self, "value", kernel_init(0, (1, 2)), (D, K, Dh), ("embed", "kv_heads", "head_dim"),
                              cfg)
    wo_HxDhxD = logical_param(self, "out", kernel_init((0, 1), 2), (H, Dh, D), ("heads", "head_dim", "embed"), cfg)

    q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh = contract_each(x_BxLxD, (wq_DxHxDh, wk_DxKxDh, wv_DxKxDh), 1,
                                                       cfg.matmul_impl, dt)
    q_BxLxHxDh = lora.adapt(self, "query", x_BxLxD, q_BxLxHxDh, ("embed", "heads", "head_dim"))
    k_BxLxKxDh = lora.adapt(self, "key", x_BxLxD, k_BxLxKxDh, ("embed", "kv_heads", "head_dim"))
    v_BxLxKxDh = lora.adapt(self, "value", x_BxLxD, v_BxLxKxDh, ("embed", "kv_heads", "head_dim"))
    if cfg.qkv_bias:  # Qwen2: biases on the q/k/v projections, none on the output
      def bias(name, shape, axes):
        return logical_param(self, name, nn.initializers.zeros, shape, axes, cfg).astype(dt)
      q_BxLxHxDh = q_BxLxHxDh + bias("query_bias", (H, Dh), ("heads", "head_dim"))
      k_BxLxKxDh = k_BxLxKxDh + bias("key_bias", (K, Dh), ("kv_heads", "head_dim"))
      v_BxLxKxDh = v_BxLxKxDh + bias("value_bias", (K, Dh), ("kv_heads", "head_dim"))
    q_BxLxHxDh = constrain(apply_rope(q_BxLxHxDh, positions_BxL, cfg.rope_theta, cfg),
                           ("act_batch", "act_length", "act_heads", "act_head_dim"))
    k_BxLxKxDh = constrain(apply_rope(k_BxLxKxDh, positions_BxL, cfg.rope_theta, cfg),
                           ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
    v_BxLxKxDh = constrain(v_BxLxKxDh, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))

    if self.has_variable("cache", "key"):  # decoding: attend over the KV cache (tweetjax.model.decode)
      kt_BxKxDhxS, v_BxKxSxDh, mask_Bx1xLxS = self._update_cache(k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL)
      out_BxLxHxDh = cached_attention(q_BxLxHxDh, kt_BxKxDhxS, v_BxKxSxDh, mask_Bx1xLxS,
                                      softcap=cfg.attn_logit_softcap)
    elif context_lib.context_shards() > 1:  # the sequence is split over `context`
      if token_index_BxL is None:
        token_index_BxL = jnp.broadcast_to(jnp.arange(x_BxLxD.shape[1], dtype=jnp.int32), segment_ids_BxL.shape)
      if cfg.context_attention == "ring" and context_lib.ring_fits(*segment_ids_BxL.shape):
        out_BxLxHxDh = context_lib.ring_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL,
                                                  token_index_BxL, softcap=cfg.attn_logit_softcap)
      else:  # the partitioner gathers K/V over `context` (also the path of a batch that does not split)
        mask_Bx1xLxL = attention_mask(segment_ids_BxL, segment_ids_BxL, token_index_BxL, token_index_BxL)
        impl = "xla" if cfg.attention_impl in ("cudnn", "blockwise") else cfg.attention_impl
        out_BxLxHxDh = dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask_Bx1xLxL, impl=impl,
                                             softcap=cfg.attn_logit_softcap)
    elif cfg.attention_impl == "blockwise":
      out_BxLxHxDh = blockwise_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, segment_ids_BxL,
                                         softcap=cfg.attn_logit_softcap, block=cfg.attention_block_size)
    else:
      mask_Bx1xLxL = attention_mask(segment_ids_BxL, segment_ids_BxL)
      out_BxLxHxDh = dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask_Bx1xLxL,
                                           impl=cfg.attention_impl, softcap=cfg.attn_logit_softcap)
    out_BxLxHxDh = constrain(out_BxLxHxDh, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    out_BxLxD = contract(out_BxLxHxDh, wo_HxDhxD, 2, cfg.matmul_impl, dt)
    out_BxLxD = lora.adapt(self, "out", out_BxLxHxDh, out_BxLxD, ("heads", "head_dim", "embed"), in_ndim=2)
    return constrain(out_BxLxD, ("act_batch", "act_length", "act_embed"))

  def _update_cache(self, k_BxLxKxDh: jax.Array, v_BxLxKxDh: jax.Array, segment_ids_BxL: jax.Array):
    """Writes L new keys/values at the cache cursor; returns the whole cache and the mask of the L queries over it.

    The "cache" collection (laid out by tweetjax.model.decode.cache_spec) holds `key` [B, K, Dh, S], `value`
    [B, K, S, Dh], `segment_ids` [B, S] (0 = empty or padding slot, never attended) and `index` (next free slot,
    shared by the rows). Query i sits in slot index + i and sees the filled slots up to its own with its segment
    id, so left- or right-padded prompts and the tokens generated after them attend exactly as in one unpadded
    forward pass.
    """
    key, value = self.variable("cache", "key"), self.variable("cache", "value")
    segments, index = self.variable("cache", "segment_ids"), self.variable("cache", "index")
    B, L = segment_ids_BxL.shape
    S = key.value.shape[3]
    start = index.value
    kt_BxKxDhxL, v_BxKxLxDh = k_BxLxKxDh.transpose(0, 2, 3, 1), v_BxLxKxDh.transpose(0, 2, 1, 3)
    kt_BxKxDhxS = jax.lax.dynamic_update_slice(key.value, kt_BxKxDhxL.astype(key.value.dtype), (0, 0, 0, start))
    v_BxKxSxDh = jax.lax.dynamic_update_slice(value.value, v_BxKxLxDh.astype(value.value.dtype),
                                              (0, 0, start, 0))
    kv_segment_ids_BxS = jax.lax.dynamic_update_slice(segments.value, segment_ids_BxL.astype(jnp.int32), (0, start))
    key.value = constrain(kt_BxKxDhxS, CACHE_KEY_AXES)
    value.value = constrain(v_BxKxSxDh, CACHE_VALUE_AXES)
    segments.value = kv_segment_ids_BxS
    index.value = start + L
    q_slots_BxL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
    kv_slots_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    mask_Bx1xLxS = attention_mask(segment_ids_BxL, kv_segment_ids_BxS, q_slots_BxL, kv_slots_BxS)
    return key.value, value.value, mask_Bx1xLxS
