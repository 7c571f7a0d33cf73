"""Sampling weight formats (bf16, int8) decode close to the fp32 model, and the sort-free nucleus equals the sorted
one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import load_config
from tweetjax.model import quantize
from tweetjax.model.decode import SamplingConfig, Sampler, nucleus_mask
from tweetjax.train.experiment import build_experiment

PROMPTS = [[1, 5, 9, 300, 12], [1, 17, 4, 99, 3, 8, 250, 7]]
NEW_TOKENS = 6
# Relative L2 error of a step's logits against the fp32 model run on the same tokens: bf16 weights and activations
# carry ~3 significant digits; int8 adds the per-channel weight and per-row activation rounding (7 bits each).
LOGITS_RTOL = {"bfloat16": 2e-2, "int8": 6e-2}


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_int8_matmul_and_contract_match_the_float_product():
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (4, 3, 2, 16))  # [B, L, H, Dh]
  w = jax.random.normal(kw, (2, 16, 24))  # [H, Dh, D]: two contracted axes, as attention's output projection
  q = quantize.quantize_kernel(w, num_contracted=2, rank=3)
  assert q.q.dtype == jnp.int8 and q.scale.shape == (24,)
  want = jnp.tensordot(x, w, 2, precision="highest")
  assert _rel(np.asarray(quantize.int8_contract(x, q, jnp.float32)), np.asarray(want)) < 1.5e-2
  # Kernels of one input fused into one dot give the separate products exactly (same int8 x, int32 sums), also
  # with multi-axis outputs ([D, K, Dh] like q/k/v).
  x2 = x.reshape(12, 32)
  ka, kb = (quantize.quantize_kernel(jax.random.normal(k, shape), 1, len(shape))
            for k, shape in zip(jax.random.split(kw), ((32, 2, 4), (32, 5))))
  fused_kernel = quantize.fuse_kernels([ka, kb], out_ranks=[2, 1])
  assert fused_kernel.q.shape == (32, 13) and fused_kernel.fused_outs == ((2, 4), (5,))
  fused = quantize.int8_contract_fused(x2, [fused_kernel, quantize.Int8FusedMember(index=1)], jnp.float32)
  for y, k in zip(fused, (ka, kb)):
    np.testing.assert_array_equal(y, quantize.int8_contract(x2, k, jnp.float32))
  with pytest.raises(ValueError, match="fuse_kernels grouped"):
    quantize.int8_contract_fused(x2, [ka, kb], jnp.float32)
  stacked = quantize.quantize_kernel(jnp.stack([w, 2 * w]), num_contracted=2, rank=3)  # a scanned layer axis
  np.testing.assert_array_equal(stacked.q[1], q.q)
  np.testing.assert_allclose(stacked.scale[1], 2 * q.scale, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  config = load_config("tiny")
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  experiment = build_experiment(config, devices=jax.devices()[:1])
  params = experiment.init_state(jax.random.key(3)).params
  return experiment, params


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_sampling_weights_decode_close_to_fp32(tiny, weights):
  experiment, params = tiny
  sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, eos_id=-1)
  sampler = Sampler(experiment.model, experiment.mesh, experiment.rules, weights=weights, prompt_bucket=8)
  prepared = sampler.prepare(params)
  leaves = jax.tree.leaves(prepared.params)
  assert {x.dtype for x in leaves} <= {jnp.dtype(t) for t in (jnp.bfloat16, jnp.int8, jnp.float32, jnp.uint16)}
  # The untied table as its bf16 bits, exactly.
  table = prepared.params["embed"]["embedding"]
  assert isinstance(table, quantize.BitsTable)
  np.testing.assert_array_equal(jax.lax.bitcast_convert_type(table.bits_VxD, jnp.bfloat16),
                                nn.meta.unbox(params)["embed"]["embedding"].astype(jnp.bfloat16))
  if weights == "int8":
    # Every matmul kernel is int8; beside the (untied) embedding table only norm scales and int8 scales remain.
    rest = sum(x.size for x in leaves if x.dtype != jnp.int8) - table.bits_VxD.size
    assert 0 < rest < 0.02 * sum(x.size for x in leaves)
    # q/k/v and gate/up as one kernel each, held by the first of them.
    attention, mlp = prepared.params["layers_0"]["attention"], prepared.params["layers_0"]["mlp"]
    cfg = experiment.model_config
    assert attention["query"].fused_outs == ((cfg.num_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim),
                                             (cfg.num_kv_heads, cfg.head_dim))
    assert [attention[n].index for n in ("key", "value")] == [1, 2] and mlp["up"].index == 1
    assert mlp["gate"].q.shape == (cfg.d_model, 2 * cfg.mlp_dim)
  assert sampler.cache_dtype == jnp.float32  # bf16 compute on a CPU: an fp32 cache (decode.default_cache_dtype)
  out = sampler.generate(prepared, PROMPTS, sampling, return_logits=True)
  # Teacher-forced fp32 reference on the tokens this format generated: every step's logits within tolerance.
  sequences = [p + g for p, g in zip(PROMPTS, out.tokens)]
  length = max(map(len, sequences))
  tokens = np.zeros((len(sequences), length), np.int32)
  segments = np.zeros_like(tokens)
  for b, s in enumerate(sequences):
    tokens[b, :len(s)], segments[b, :len(s)] = s, 1
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
  reference = np.asarray(jax.jit(experiment.model.apply)({"params": params}, tokens, positions, segments))
  for b, prompt in enumerate(PROMPTS):
    for t in range(NEW_TOKENS):
      err = _rel(out.logits[b, t], reference[b, len(prompt) - 1 + t])
      assert err < LOGITS_RTOL[weights], (b, t, err)
  with pytest.raises(ValueError, match="prepared for weights"):
    Sampler(experiment.model, experiment.mesh, experiment.rules).prepare(prepared)


def test_int8_sampling_on_a_sharded_mesh_matches_data_parallel(tiny):
  """The fused int8 q/k/v and gate/up kernels split over `tensor` (heads, mlp) and the bits table over vocab give
  the tokens and logits of the same prepared weights on a data-parallel mesh. (A one-device program rounds bf16
  differently from any mesh's, ~0.7% of the logits for bfloat16 weights, the same for every layout, so the layouts
  are compared with a 2-device one; the tokens match one device too.)"""
  experiment, params = tiny
  params = jax.device_get(params)
  sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, eos_id=-1)
  outputs = []
  for mesh in (dict(data=2, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)):
    config = load_config("tiny")
    config.mesh.update(expert=1, **mesh)
    exp = build_experiment(config, devices=jax.devices()[:int(np.prod(list(mesh.values())))])
    sampler = Sampler(exp.model, exp.mesh, exp.rules, weights="int8", prompt_bucket=8)
    outputs.append(sampler.generate(params, PROMPTS, sampling, return_logits=True))
  data_parallel, sharded = outputs
  assert sharded.tokens == data_parallel.tokens
  assert _rel(np.asarray(sharded.logits), np.asarray(data_parallel.logits)) < 1e-3
  one = Sampler(experiment.model, experiment.mesh, experiment.rules, weights="int8", prompt_bucket=8)
  assert one.generate(params, PROMPTS, sampling).tokens == sharded.tokens


def test_nucleus_mask_equals_the_sorted_nucleus():
  logits = jax.random.normal(jax.random.key(1), (6, 500)) * 3
  for top_p in (0.3, 0.9, 0.99):
    got = np.asarray(jax.jit(nucleus_mask, static_argnums=1)(logits, top_p))
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    order = np.argsort(-probs, axis=-1)
    mass_before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(probs, order, -1)
    want = np.zeros_like(got)
    np.put_along_axis(want, order, mass_before < top_p, -1)
    np.testing.assert_array_equal(got, want, err_msg=f"top_p={top_p}")
