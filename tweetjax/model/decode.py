"""Autoregressive sampling with a KV cache: one prefill pass over the prompts, then a jitted token-by-token loop.

Dims: B batch (prompts), P padded prompt length, T new tokens, S = P + T cache slots, V vocab, N layers, K kv heads,
Dh head dim.

Prompts of different lengths share one batch, left- or right-padded to P. Every token carries its own RoPE position
(0.. within its prompt, continuing after it) and a segment id (1 = real, 0 = padding or finished row); attention
only sees filled slots of its own row up to its own slot (`Attention._update_cache`), so each row decodes exactly
as it would alone. The cache is a flax "cache" collection with the same tree layout as the attention params
(`layers/attention/{key,value,segment_ids,index}`, with a leading layer axis when the layers are scanned), sharded
like the attention heads. Prefill, the while_loop over steps and sampling compile once per (B, P, T, sampling
config): P and B are bucketed so a new prompt batch rarely recompiles.

`use_cache=False` runs the same loop without a cache (the whole S-token buffer through the model every step); it is
the reference the cache is tested against and the baseline of tools/bench_decode.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from tweetjax.model import quantize
from tweetjax.model.attention import CACHE_KEY_AXES, CACHE_VALUE_AXES
from tweetjax.model.matmul import bf16_on_cpu
from tweetjax.model.transformer import unstack_layers
from tweetjax.parallel.rules import (Rules, axis_size, batch_sharding, host_to_global, mesh_axes_of, mesh_context,
                                     replicated)

PADDINGS = ("left", "right")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen; hashable, so it is a static argument of the compiled loop."""
  max_new_tokens: int = 32
  temperature: float = 1.0  # 0 = greedy (argmax)
  top_k: int = 0  # keep the k most likely tokens; 0 = all
  top_p: float = 1.0  # nucleus: smallest set of tokens with probability >= top_p; 1 = all
  eos_id: int = 2  # a row stops after emitting it; -1 = never stop early
  vocab_size: int = 0  # sample only ids < vocab_size (a tokenizer smaller than the model's vocab); 0 = all ids

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens}: must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature}: must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k}: must be >= 0 (0 = no top-k)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p={self.top_p}: must be in (0, 1]")


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Next token ids [B] from logits: greedy, or temperature / top-k / top-p filtered categorical sampling."""
  if sampling.temperature != 0.0:
    logits_BxV = logits_BxV.astype(jnp.float32)
  # Greedy: the argmax in the logits' own dtype (exact: bf16 -> fp32 is exact and keeps the order), without an fp32
  # copy of the [B, V] logits.
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  if sampling.vocab_size and sampling.vocab_size < logits_BxV.shape[-1]:
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < sampling.vocab_size, logits_BxV, neg_inf)
  if sampling.temperature == 0.0:
    return first_argmax(logits_BxV)
  logits_BxV = logits_BxV / sampling.temperature
  if sampling.top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, min(sampling.top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg_inf, logits_BxV)
  if sampling.top_p < 1.0:
    logits_BxV = jnp.where(nucleus_mask(logits_BxV, sampling.top_p), logits_BxV, neg_inf)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def first_argmax(x_BxV: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first index of the maximum) as two plain reductions, max and min: XLA:CPU
  runs argmax's (value, index) variadic reduction unvectorised, ~2.5 ms per [16, 32k] logits here. A row whose
  maximum is NaN gives its first NaN, as jnp.argmax does."""
  V = x_BxV.shape[-1]
  max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
  hit_BxV = (x_BxV == max_Bx1) | jnp.isnan(x_BxV)
  return jnp.min(jnp.where(hit_BxV, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


NUCLEUS_BISECTION_STEPS = 32


def nucleus_mask(logits_BxV: jax.Array, top_p: float) -> jax.Array:
  """Boolean [B, V]: the nucleus, i.e. the most likely tokens whose probabilities first reach `top_p` in total.

  Found without sorting the vocabulary (a full sort per token is most of a CPU decode step at 32k vocab): the
  nucleus is {p >= t} for the largest threshold t whose mass still reaches top_p, and t is bisected on [0, max p]
  in NUCLEUS_BISECTION_STEPS masked sums. Tokens tied at the threshold are all kept (a sort would keep some of them
  in index order), and so are tokens within max_p / 2**32 below it; the most likely token is always kept.
  """
  probs_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
  hi_Bx1 = jnp.max(probs_BxV, axis=-1, keepdims=True)

  def bisect(_, bounds):
    lo_Bx1, hi_Bx1 = bounds
    mid_Bx1 = 0.5 * (lo_Bx1 + hi_Bx1)
    mass_Bx1 = jnp.sum(jnp.where(probs_BxV >= mid_Bx1, probs_BxV, 0.0), axis=-1, keepdims=True)
    reaches = mass_Bx1 >= top_p
    return jnp.where(reaches, mid_Bx1, lo_Bx1), jnp.where(reaches, hi_Bx1, mid_Bx1)

  lo_Bx1, _ = jax.lax.fori_loop(0, NUCLEUS_BISECTION_STEPS, bisect, (jnp.zeros_like(hi_Bx1), hi_Bx1))
  return (probs_BxV >= lo_Bx1) | (probs_BxV >= hi_Bx1)


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, padding: str, pad_id: int = 0):
  """Host-side layout of a prompt batch: tokens, positions, segment ids [B, length] and each row's last index [B]."""
  if padding not in PADDINGS:
    raise ValueError(f"padding={padding!r}: expected one of {PADDINGS}")
  B = len(prompts)
  tokens = np.full((B, length), pad_id, np.int32)
  positions = np.zeros((B, length), np.int32)
  segment_ids = np.zeros((B, length), np.int32)
  last_index = np.zeros((B,), np.int32)
  for b, prompt in enumerate(prompts):
    n = len(prompt)
    if not 0 < n <= length:
      raise ValueError(f"prompt {b} has {n} tokens; expected 1..{length}")
    start = 0 if padding == "right" else length - n
    tokens[b, start:start + n] = prompt
    positions[b, start:start + n] = np.arange(n)
    segment_ids[b, start:start + n] = 1
    last_index[b] = start + n - 1
  return tokens, positions, segment_ids, last_index


def cache_spec(params: Any, batch: int, length: int, dtype) -> Any:
  """ShapeDtypeStruct tree of the "cache" collection, mirroring every attention module found in `params`."""
  def walk(tree):
    if isinstance(tree, dict) and {"query", "key", "value", "out"} <= set(tree):
      lead = tuple(tree["out"].shape[:-3])  # [(N,) H, Dh, D]
      key = tree["key"]  # [(N,) D, K, Dh], or its place in the fused int8 q/k/v kernel
      K, Dh = (tree["query"].fused_outs[key.index] if isinstance(key, quantize.Int8FusedMember)
               else key.shape[-2:])
      return {"key": jax.ShapeDtypeStruct(lead + (batch, K, Dh, length), dtype),
              "value": jax.ShapeDtypeStruct(lead + (batch, K, length, Dh), dtype),
              "segment_ids": jax.ShapeDtypeStruct(lead + (batch, length), jnp.int32),
              "index": jax.ShapeDtypeStruct(lead, jnp.int32)}
    if isinstance(tree, dict):
      out = {k: walk(v) for k, v in tree.items()}
      return {k: v for k, v in out.items() if v is not None} or None
    return None

  spec = walk(nn.meta.unbox(params))
  if spec is None:
    raise ValueError("no attention module (query/key/value/out params) found in the params tree")
  return spec


def cache_logical_axes(spec: Any) -> Any:
  """Logical axis names of each cache leaf (leading layer axis, when present, is unsharded)."""
  def axes(path, leaf):
    name = path[-1].key
    base = {"key": CACHE_KEY_AXES, "value": CACHE_VALUE_AXES, "segment_ids": ("act_batch", None), "index": ()}[name]
    return P(*((None,) * (leaf.ndim - len(base)) + tuple(base)))
  return jax.tree_util.tree_map_with_path(axes, spec)


def _constrain_tree(tree: Any, logical: Any) -> Any:
  return jax.tree.map(lambda x, spec: nn.with_logical_constraint(x, tuple(spec)), tree, logical,
                      is_leaf=lambda x: isinstance(x, P))


@dataclasses.dataclass(frozen=True)
class DecodeOutput:
  tokens: list[list[int]]  # generated ids per prompt, up to and including EOS when it came
  logits: np.ndarray | None  # [B, T, V] logits each token was sampled from (return_logits=True), else None


def _generate(model, params, tokens_BxP, positions_BxP, segment_ids_BxP, last_index_B, rng, *,
              sampling: SamplingConfig, use_cache: bool, return_logits: bool, pad_id: int, cache_dtype):
  B, Pl = tokens_BxP.shape
  T = sampling.max_new_tokens
  S = Pl + T
  rows_B = jnp.arange(B)
  if use_cache:
    spec = cache_spec(params, B, S, cache_dtype)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
    cache = _constrain_tree(cache, cache_logical_axes(spec))
    # The prefill needs the logits of each row's last prompt token only: [B, V], not [B, P, V] (at batch 16 and
    # 32-token prompts the whole-prompt LM head was ~15% of a 64-token generation's FLOPs).
    (hidden_BxPxD, head), variables = model.apply({"params": params, "cache": cache}, tokens_BxP, positions_BxP,
                                                  segment_ids_BxP, logits=False, mutable=["cache"])
    carry_model = variables["cache"]
    logits_BxV = head(hidden_BxPxD[rows_B, last_index_B][:, None])[:, 0]
  else:
    pad_BxT = jnp.zeros((B, T), jnp.int32)
    carry_model = (jnp.concatenate([tokens_BxP, pad_BxT + pad_id], 1), jnp.concatenate([positions_BxP, pad_BxT], 1),
                   jnp.concatenate([segment_ids_BxP, pad_BxT], 1))
    logits_BxV = model.apply({"params": params}, *carry_model)[rows_B, last_index_B]
  position_B = positions_BxP[rows_B, last_index_B] + 1
  out_BxT = jnp.full((B, T), pad_id, jnp.int32)
  all_logits = jnp.zeros((B, T, logits_BxV.shape[-1]), jnp.float32) if return_logits else None
  done_B = jnp.zeros((B,), bool)

  def cond(state):
    step, done_B = state[0], state[4]
    return (step < T) & ~jnp.all(done_B)

  def body(state):
    step, carry_model, logits_BxV, position_B, done_B, out_BxT, rng, all_logits = state
    rng, sub = jax.random.split(rng)
    token_B = jnp.where(done_B, pad_id, sample_logits(logits_BxV, sub, sampling))
    out_BxT = out_BxT.at[:, step].set(token_B)
    if return_logits:
      all_logits = all_logits.at[:, step].set(jnp.where(done_B[:, None], 0.0, logits_BxV.astype(jnp.float32)))
    segment_B = jnp.where(done_B, 0, 1).astype(jnp.int32)
    done_B = done_B | (token_B == sampling.eos_id)
    if use_cache:
      logits_Bx1xV, variables = model.apply({"params": params, "cache": carry_model}, token_B[:, None],
                                            position_B[:, None], segment_B[:, None], mutable=["cache"])
      carry_model, logits_BxV = variables["cache"], logits_Bx1xV[:, 0]
    else:
      slot = Pl + step
      tokens_BxS, positions_BxS, segments_BxS = carry_model
      carry_model = (tokens_BxS.at[:, slot].set(token_B), positions_BxS.at[:, slot].set(position_B),
                     segments_BxS.at[:, slot].set(segment_B))
      logits_BxV = jax.lax.dynamic_index_in_dim(model.apply({"params": params}, *carry_model), slot, 1, False)
    return step + 1, carry_model, logits_BxV, position_B + 1, done_B, out_BxT, rng, all_logits

  state = (jnp.zeros((), jnp.int32), carry_model, logits_BxV, position_B, done_B, out_BxT, rng, all_logits)
  state = jax.lax.while_loop(cond, body, state)
  return state[5], state[7]


@dataclasses.dataclass(frozen=True)
class PreparedWeights:
  """Params converted once to a sampler's weight format (Sampler.prepare); `generate` takes them as they are."""
  params: Any
  weights: str


def default_cache_dtype(compute_dtype) -> jnp.dtype:
  """The KV cache's dtype: the compute dtype, except fp32 for bf16 compute on a CPU. XLA:CPU writes a token's slot
  of a bf16 buffer at ~0.25 ms per [16, 4, 96, 64] layer cache (it converts more than the slot), an fp32 slot in
  place in microseconds; the cached attention then runs in fp32, and its FLOPs are few next to the weights'."""
  return jnp.dtype(jnp.float32) if bf16_on_cpu(compute_dtype) else jnp.dtype(compute_dtype)


def _prepare(params: Any, *, weights: str, cfg, unstack: bool) -> Any:
  params = quantize.prepare_weights(params, weights, tied_embeddings=cfg.tie_embeddings)
  return unstack_layers(params, cfg) if unstack else params


class Sampler:
  """Compiles and runs generation for one model on one mesh. Reuse it: compiled loops are cached per shape.

  `weights` (tweetjax/model/quantize.py): "model" (default) decodes with the params as they are, in the model's
  compute dtype; "bfloat16" and "int8" convert them once (`prepare`) and decode in bf16, reading half / a quarter
  of the fp32 bytes per token.

  `unstack_layers` (default): a scanned model decodes unscanned, from per-layer copies of its params made by
  `prepare` (transformer.unstack_layers). In a layer loop every generated token would slice each layer's weights
  out of the stacked arrays, and XLA materialises those slices: one more write and read of all the weights per
  token, in a loop whose time is reading the weights. The copies cost one params' worth of memory while they live.
  """

  def __init__(self, model: nn.Module, mesh: Mesh, rules: Rules, *, pad_id: int = 0, prompt_bucket: int = 16,
               cache_dtype=None, weights: str | None = None, unstack_layers: bool = True):
    self.weights = weights or "model"
    if self.weights not in quantize.WEIGHT_FORMATS:
      raise ValueError(f"Sampler weights={weights!r}: expected one of {quantize.WEIGHT_FORMATS}")
    self.stacked_cfg = model.cfg
    if self.weights != "model" and model.cfg.dtype != "bfloat16":
      model = model.clone(cfg=dataclasses.replace(model.cfg, dtype="bfloat16"))
    self.unstack = unstack_layers and model.cfg.scan_layers
    if self.unstack:
      model = model.clone(cfg=dataclasses.replace(model.cfg, scan_layers=False))
    self.model, self.mesh, self.rules, self.pad_id = model, mesh, rules, pad_id
    self.prompt_bucket = prompt_bucket
    self.cache_dtype = jnp.dtype(cache_dtype or default_cache_dtype(model.cfg.compute_dtype))
    self.batch_shards = axis_size(mesh, mesh_axes_of("act_batch", rules))
    self._compiled: dict[tuple, Any] = {}
    self._prepare = jax.jit(functools.partial(_prepare, weights=self.weights, cfg=self.stacked_cfg,
                                              unstack=self.unstack))

  def prepare(self, params: Any) -> PreparedWeights:
    """`params` in this sampler's weight format; pass the result to `generate` to convert only once."""
    if isinstance(params, PreparedWeights):
      if params.weights != self.weights:
        raise ValueError(f"params prepared for weights={params.weights!r}, this sampler uses {self.weights!r}")
      return params
    if self.weights == "model" and not self.unstack:
      return PreparedWeights(nn.meta.unbox(params), self.weights)  # nothing to convert: no copy
    with mesh_context(self.mesh, self.rules):
      return PreparedWeights(self._prepare(params), self.weights)

  def _fn(self, sampling: SamplingConfig, use_cache: bool, return_logits: bool):
    key = (sampling, use_cache, return_logits)
    if key not in self._compiled:
      rows = batch_sharding(self.mesh)
      fn = functools.partial(_generate, self.model, sampling=sampling, use_cache=use_cache,
                             return_logits=return_logits, pad_id=self.pad_id, cache_dtype=self.cache_dtype)
      # Outputs replicated: every process reads all the generated rows (multi-host sampling and evaluation).
      everywhere = replicated(self.mesh)
      self._compiled[key] = jax.jit(fn, in_shardings=(None, rows, rows, rows, rows, everywhere),
                                    out_shardings=(everywhere, everywhere if return_logits else None))
    return self._compiled[key]

  def generate(self, params: Any | PreparedWeights, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
               rng: jax.Array | None = None, *, padding: str = "left", use_cache: bool = True,
               return_logits: bool = False) -> DecodeOutput:
    """Generates up to sampling.max_new_tokens ids after each prompt (lists of ids, BOS included by the caller)."""
    if not prompts:
      return DecodeOutput([], None)
    rng = jax.random.key(0) if rng is None else rng
    num = len(prompts)
    batch = -(-num // self.batch_shards) * self.batch_shards
    # Filler rows (a copy of the first prompt) make the batch divisible by the batch shards; they are dropped.
    prompts = [list(p) for p in prompts] + [list(prompts[0])] * (batch - num)
    longest = max(len(p) for p in prompts)
    length = -(-longest // self.prompt_bucket) * self.prompt_bucket
    rows = batch_sharding(self.mesh)
    host = [host_to_global(x, rows) for x in pad_prompts(prompts, length, padding, self.pad_id)]
    params = self.prepare(params).params
    with mesh_context(self.mesh, self.rules):
      tokens_BxT, logits_BxTxV = self._fn(sampling, use_cache, return_logits)(params, *host, rng)
    tokens_BxT = np.asarray(jax.device_get(tokens_BxT))[:num]
    out = []
    for row in tokens_BxT:
      row = row.tolist()
      if sampling.eos_id in row:
        row = row[:row.index(sampling.eos_id) + 1]
      out.append(row)
    logits = np.asarray(jax.device_get(logits_BxTxV))[:num] if return_logits else None
    return DecodeOutput(out, logits)


def generate_text(sampler: Sampler, params: Any, tokenizer, texts: Sequence[str], sampling: SamplingConfig,
                  rng: jax.Array | None = None, **kwargs) -> list[str]:
  """Prompts are [BOS] + tokens of each text (as documents are packed for training); returns the continuations.

  Sampling is restricted to the tokenizer's ids (the model's vocab may be padded beyond them).
  """
  sampling = dataclasses.replace(sampling, vocab_size=sampling.vocab_size or tokenizer.vocab_size)
  prompts = [[tokenizer.bos_id] + ids for ids in tokenizer.encode_batch(list(texts))]
  output = sampler.generate(params, prompts, sampling, rng, **kwargs)
  return [tokenizer.decode([t for t in row if t != sampling.eos_id]) for row in output.tokens]

