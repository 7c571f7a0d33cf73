"""Model behaviour: causality, segment isolation, GQA, scan/remat invariance, attention paths, param counts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_trees_close, load_config
from tweetjax.model.attention import attention_mask, dot_product_attention, reference_attention
from tweetjax.model.config import ModelConfig
from tweetjax.model.transformer import Transformer
from tweetjax.train.experiment import param_count

CFG = ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
B, L = 2, 16


def init(cfg, seed=0):
  return nn.meta.unbox(Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, L), jnp.int32))["params"])


@pytest.fixture(scope="module")
def params():
  return init(CFG)


def tokens(seed=1):
  return jax.random.randint(jax.random.key(seed), (B, L), 0, CFG.vocab_size)


def apply(cfg, params, ids, positions=None, segment_ids=None):
  return Transformer(cfg).apply({"params": params}, ids, positions, segment_ids)


def test_logits_do_not_see_the_future(params):
  ids = tokens()
  t = 7
  changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 5) % CFG.vocab_size)
  a, b = apply(CFG, params, ids), apply(CFG, params, changed)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:]), "later positions should depend on the changed tokens"


def test_packed_segments_are_isolated_and_positions_restart(params):
  """A tweet packed after another gets exactly the logits it gets alone."""
  ids = tokens()
  split = 6
  segment_ids = jnp.concatenate([jnp.ones((B, split), jnp.int32), 2 * jnp.ones((B, L - split), jnp.int32)], 1)
  positions = jnp.concatenate([jnp.arange(split), jnp.arange(L - split)])[None].repeat(B, 0)
  packed = apply(CFG, params, ids, positions, segment_ids)
  alone_second = apply(CFG, params, ids[:, split:])
  alone_first = apply(CFG, params, ids[:, :split])
  np.testing.assert_allclose(packed[:, split:], alone_second, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[:, :split], alone_first, rtol=1e-5, atol=1e-5)
  # Changing the first segment leaves the second untouched.
  changed = ids.at[:, :split].set((ids[:, :split] + 3) % CFG.vocab_size)
  repacked = apply(CFG, params, changed, positions, segment_ids)
  np.testing.assert_allclose(repacked[:, split:], packed[:, split:], rtol=1e-6, atol=1e-6)
  assert not np.allclose(repacked[:, :split], packed[:, :split])


def _plain_multi_head(x, p, cfg, mask):
  """Textbook multi-head attention, one head at a time, with RoPE from the model."""
  from tweetjax.model.attention import apply_rope
  positions = jnp.arange(x.shape[1])[None].repeat(x.shape[0], 0)
  outs = []
  for h in range(cfg.num_heads):
    kv = h // (cfg.num_heads // cfg.num_kv_heads)
    q = apply_rope((x @ p["query"][:, h])[:, :, None], positions, cfg.rope_theta)[:, :, 0]
    k = apply_rope((x @ p["key"][:, kv])[:, :, None], positions, cfg.rope_theta)[:, :, 0]
    v = x @ p["value"][:, kv]
    s = q @ k.transpose(0, 2, 1) / np.sqrt(cfg.head_dim)
    s = jnp.where(mask[:, 0], s, -jnp.inf)
    outs.append(jax.nn.softmax(s, -1) @ v)
  o = jnp.stack(outs, 2)
  return jnp.einsum("blhk,hkd->bld", o, p["out"])


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_query_attention_matches_plain_multi_head(kv_heads):
  from tweetjax.model.attention import Attention
  cfg = dataclasses.replace(CFG, num_kv_heads=kv_heads)
  x = jax.random.normal(jax.random.key(2), (B, L, cfg.d_model))
  positions = jnp.arange(L)[None].repeat(B, 0)
  seg = jnp.ones((B, L), jnp.int32)
  attn = Attention(cfg)
  p = nn.meta.unbox(attn.init(jax.random.key(3), x, positions, seg)["params"])
  got = attn.apply({"params": p}, x, positions, seg)
  want = _plain_multi_head(x, p, cfg, attention_mask(seg, seg))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_gqa_equals_multi_head_with_repeated_kv_weights():
  from tweetjax.model.attention import Attention
  gqa = dataclasses.replace(CFG, num_kv_heads=2)
  mha = dataclasses.replace(CFG, num_kv_heads=4)
  x = jax.random.normal(jax.random.key(4), (B, L, CFG.d_model))
  positions = jnp.arange(L)[None].repeat(B, 0)
  seg = jnp.ones((B, L), jnp.int32)
  p = nn.meta.unbox(Attention(gqa).init(jax.random.key(5), x, positions, seg)["params"])
  repeated = dict(p, key=jnp.repeat(p["key"], 2, axis=1), value=jnp.repeat(p["value"], 2, axis=1))
  np.testing.assert_allclose(Attention(gqa).apply({"params": p}, x, positions, seg),
                             Attention(mha).apply({"params": repeated}, x, positions, seg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_attention_implementations_agree(softcap):
  kq, kk, kv = jax.random.split(jax.random.key(6), 3)
  q = jax.random.normal(kq, (B, L, 4, 8)) * 3
  k = jax.random.normal(kk, (B, L, 2, 8)) * 3
  v = jax.random.normal(kv, (B, L, 2, 8))
  seg = jnp.array([[1] * 5 + [2] * 9 + [0] * 2, [1] * 16])
  mask = attention_mask(seg, seg)
  want = reference_attention(q, k, v, mask, softcap=softcap)
  got = dot_product_attention(q, k, v, mask, impl="xla", softcap=softcap)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if softcap:
    assert not np.allclose(want, reference_attention(q, k, v, mask)), "soft-cap must change these logits"


def test_scan_equals_unrolled(params):
  unrolled_cfg = dataclasses.replace(CFG, scan_layers=False)
  unrolled = {k: v for k, v in params.items() if k != "layers"}
  for i in range(CFG.num_layers):
    unrolled[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  assert jax.tree.structure(unrolled) == jax.tree.structure(init(unrolled_cfg))
  ids = tokens()
  np.testing.assert_allclose(apply(unrolled_cfg, unrolled, ids), apply(CFG, params, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["dots", "dots_no_batch", "full"])
def test_remat_leaves_grads_unchanged(params, policy):
  ids = tokens()

  def loss(cfg, p):
    return jnp.mean(jax.nn.log_softmax(apply(cfg, p, ids))[..., 0])

  want = jax.grad(lambda p: loss(CFG, p))(params)
  got = jax.grad(lambda p: loss(dataclasses.replace(CFG, remat_policy=policy), p))(params)
  assert_trees_close(got, want, rtol=1e-5, atol=1e-7, what=f"grads with remat={policy}")


def test_bf16_compute_keeps_fp32_params():
  cfg = dataclasses.replace(CFG, dtype="bfloat16", norm_style="sandwich", attn_logit_softcap=30.0,
                            final_logit_softcap=30.0)
  p = init(cfg)
  assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}
  assert "attention_post_norm" in p["layers"] and "mlp_post_norm" in p["layers"]
  logits = apply(cfg, p, tokens())
  assert logits.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(logits.astype(jnp.float32)))) <= 30.0


def test_tied_embeddings_have_no_lm_head():
  p = init(dataclasses.replace(CFG, tie_embeddings=True))
  assert "lm_head" not in p
  assert param_count(p) == param_count(init(CFG)) - CFG.d_model * CFG.vocab_size


def boxed_shapes(name):
  cfg = ModelConfig.from_config(load_config(name).model)
  return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.mark.parametrize("name,expected", [("llama_7b", 6.74e9), ("llama_1b", 1.236e9), ("llama_70b", 68.98e9),
                                           ("small", 56.4e6)])
def test_published_param_counts_via_eval_shape(name, expected):
  n = param_count(nn.meta.unbox(boxed_shapes(name)))
  assert abs(n - expected) / expected < 0.01, f"{name}: {n:,} params, expected ~{expected:,.0f}"


# The totals of the published checkpoints (safetensors metadata of meta-llama/Llama-3.1-8B, meta-llama/Llama-3.2-1B,
# Qwen/Qwen2.5-7B): exact, so a missing bias or a wrong vocab shows.
@pytest.mark.parametrize("name,expected", [("llama3_8b", 8_030_261_248), ("llama3_2_1b", 1_235_814_400),
                                           ("qwen2_5_7b", 7_615_616_512)])
def test_open_weight_shapes_have_the_published_param_counts(name, expected):
  boxed = boxed_shapes(name)
  assert param_count(nn.meta.unbox(boxed)) == expected
  if name == "qwen2_5_7b":  # q/k/v biases sharded like the heads they belong to
    specs = nn.get_partition_spec(boxed)["layers"]["attention"]
    assert tuple(specs["query_bias"]) == ("layers", "heads", "head_dim")
    assert tuple(specs["key_bias"]) == tuple(specs["value_bias"]) == ("layers", "kv_heads", "head_dim")


def test_rope_scaling():
  from tweetjax.model import attention
  apply_rope = jax.jit(attention.apply_rope, static_argnums=(2, 3))
  x = jax.random.normal(jax.random.key(0), (B, L, 2, 16))
  positions = jnp.broadcast_to(jnp.arange(L) * 37, (B, L))
  linear = ModelConfig(head_dim=16, rope_scaling="linear", rope_scaling_factor=4.0)
  # linear: plain RoPE at positions / factor
  np.testing.assert_allclose(apply_rope(x, positions, 1e4, linear), apply_rope(x, positions / 4.0, 1e4),
                             rtol=1e-5, atol=1e-5)
  # llama3 with a context shorter than every wavelength (>= 2 pi) stretches all of them: linear; with one longer
  # than all of them stretches none: plain.
  llama3 = dict(head_dim=16, rope_scaling="llama3", rope_scaling_factor=4.0, rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0)
  np.testing.assert_allclose(apply_rope(x, positions, 1e4, ModelConfig(**llama3, rope_original_max_position=6)),
                             apply_rope(x, positions, 1e4, linear), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(apply_rope(x, positions, 1e4, ModelConfig(**llama3, rope_original_max_position=10**6)),
                             apply_rope(x, positions, 1e4), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="rope_scaling='yarn'"):
    ModelConfig(rope_scaling="yarn")
  with pytest.raises(ValueError, match="expected 0 < low < high"):
    ModelConfig(**{**llama3, "rope_low_freq_factor": 4.0})


def test_model_config_rejects_bad_values():
  with pytest.raises(ValueError, match="num_heads=6 is not a multiple of config.model.num_kv_heads=4"):
    ModelConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="remat_policy='sometimes'"):
    ModelConfig(remat_policy="sometimes")
  with pytest.raises(ValueError, match=r"unknown keys \['num_layer'\]"):
    ModelConfig.from_config({"num_layer": 3})
