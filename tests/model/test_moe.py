"""Mixture of experts: expert-parallel == dense reference, exact capacity drops, router losses, layer grouping,
training, and the grok-1 shape on a 512-device mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import REPO, assert_trees_close, load_config
from tweetjax.model import moe
from tweetjax.model.config import ModelConfig
from tweetjax.model.transformer import Transformer
from tweetjax.parallel.mesh import MeshError, make_mesh
from tweetjax.parallel.rules import DEFAULT_RULES, mesh_context
from tweetjax.train.experiment import build_experiment
from tweetjax.train.loop import make_train_iterator

B, L, D, E, F, K = 16, 8, 32, 8, 64, 2


@pytest.fixture(scope="module")
def moe_inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, L, D))
  logits = rng.normal(size=(B, L, E))
  gate, up = rng.normal(size=(2, E, D, F)) / np.sqrt(D)
  down = rng.normal(size=(E, F, D)) / np.sqrt(F)
  valid = np.ones((B, L), bool)
  valid[3, 5:] = False  # a padded row tail: takes no capacity, returns zeros
  return tuple(jnp.asarray(a, jnp.float32) for a in (x, logits, gate, up, down)) + (jnp.asarray(valid),)


def _loss_and_grads(impl, inputs, capacity_factor=float(E) / K):
  *params, valid = inputs
  cos_weights_BxLxD = jnp.cos(jnp.arange(B * L * D, dtype=jnp.float32).reshape(B, L, D))

  def loss(x, logits, gate, up, down):
    ids, gates, _ = moe.route(logits, K)
    if impl == "dense":
      y, kept = moe.dense_moe(x, ids, gates, valid, gate, up, down), valid[..., None] & (ids >= 0)
    else:
      y, kept = moe.expert_parallel_moe(x, ids, gates, valid, gate, up, down, capacity_factor=capacity_factor)
    return jnp.sum(y * cos_weights_BxLxD), (y, kept)

  (_, (y, kept)), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*params)
  return y, kept, grads


@pytest.fixture(scope="module")
def dense_reference(moe_inputs):
  return _loss_and_grads("dense", moe_inputs)


@pytest.mark.parametrize("mesh_shape", [{"expert": 8}, {"data": 2, "expert": 4}, {"expert": 4, "tensor": 2}],
                         ids=["expert8", "data2_expert4", "expert4_tensor2"])
def test_expert_parallel_matches_dense_reference(mesh_shape, moe_inputs, dense_reference):
  mesh = make_mesh({"data": 1, **mesh_shape})
  with mesh_context(mesh, DEFAULT_RULES):
    y, kept, grads = _loss_and_grads("expert_parallel", moe_inputs)
  y_ref, kept_ref, grads_ref = dense_reference
  np.testing.assert_array_equal(kept, kept_ref)  # capacity E/K: nothing dropped, padding never dispatched
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(y)[3, 5:] == 0)
  names = ("x", "router_logits", "gate", "up", "down")
  for name, g, g_ref in zip(names, grads, grads_ref):
    assert np.abs(np.asarray(g_ref)).max() > 0, name
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=f"grad of {name}")


def test_capacity_overflow_drops_exactly_the_overflowing_assignments():
  # 8 rows of 4 tokens on (expert=8): each device is one group of T=4 tokens; capacity factor 1 gives
  # C = ceil(1 * 4 * 2 / 8) = 1 slot per expert. Choices (first, second) per token, shifted by the row number so
  # every device and every expert shard takes part:
  #   t0 (0, 1): both fit.  t1 (0, 6): expert 0 taken by t0; expert 6 taken by t3's FIRST choice, which is served
  #   before any second choice although t3 comes later.  t2 (0, 5): first dropped, second fits.
  #   t3 (6, 5): first fits, second dropped (expert 5 already holds t2).
  rows, tokens, d, f = 8, 4, 16, 32
  first, second = [0, 0, 0, 6], [1, 6, 5, 5]
  expected_kept = np.array([[1, 1], [0, 0], [0, 1], [1, 0]], bool)
  logits = np.zeros((rows, tokens, E), np.float32)
  for b in range(rows):
    for t in range(tokens):
      logits[b, t, (first[t] + b) % E] = 5.0
      logits[b, t, (second[t] + b) % E] = 3.0
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(rows, tokens, d)), jnp.float32)
  gate, up = jnp.asarray(rng.normal(size=(2, E, d, f)) / np.sqrt(d), jnp.float32)
  down = jnp.asarray(rng.normal(size=(E, f, d)) / np.sqrt(f), jnp.float32)
  valid = jnp.ones((rows, tokens), bool)
  ids, gates, _ = moe.route(jnp.asarray(logits), K)
  assert moe.capacity(tokens, K, E, 1.0) == 1

  mesh = make_mesh({"data": 1, "expert": 8})
  with mesh_context(mesh, DEFAULT_RULES):
    y, kept = jax.jit(lambda *a: moe.expert_parallel_moe(*a, capacity_factor=1.0))(x, ids, gates, valid, gate, up,
                                                                                   down)
  np.testing.assert_array_equal(kept, np.broadcast_to(expected_kept, (rows, tokens, K)))
  # Kept assignments contribute gate * expert(x) exactly as in the dense reference; dropped ones contribute zero,
  # so a token with both choices dropped (t1) leaves the MoE as 0 and the residual stream carries it unchanged.
  y_expected = moe.dense_moe(x, ids, gates * jnp.asarray(expected_kept, jnp.float32), valid, gate, up, down)
  np.testing.assert_allclose(y, y_expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(y)[:, 1] == 0) and np.all(np.abs(np.asarray(y)[:, [0, 2, 3]]) > 0)


def test_router_losses_match_hand_computed_case():
  # probs chosen directly: logits = log p + c_t (a per-token shift changes nothing but logsumexp = c_t).
  probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.3, 0.1], [0.6, 0.1, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4],
                    [0.97, 0.01, 0.01, 0.01]])  # the last token is padding: it must not count anywhere
  shifts = np.array([1.0, 2.0, 0.0, -1.0, 10.0])
  logits = jnp.asarray((np.log(probs) + shifts[:, None])[None], jnp.float32)
  valid = jnp.asarray([[True, True, True, True, False]])
  ids, gates, p = moe.route(logits, 2)
  np.testing.assert_array_equal(ids[0, :4], [[0, 1], [1, 2], [0, 2], [3, 2]])
  np.testing.assert_allclose(gates[0, 0], [4 / 7, 3 / 7], rtol=1e-6)
  stats = moe.router_stats(logits, ids, p, valid)
  # Assignments: e0 {t0, t2}, e1 {t0, t1}, e2 {t1, t2, t3}, e3 {t3} of 8 -> load 0.25, 0.25, 0.375, 0.125.
  # Mean probabilities over the 4 real tokens: 0.3, 0.275, 0.25, 0.175.
  np.testing.assert_allclose(stats["load"], [0.25, 0.25, 0.375, 0.125], rtol=1e-6)
  np.testing.assert_allclose(stats["aux_loss"], 4 * (0.25 * 0.3 + 0.25 * 0.275 + 0.375 * 0.25 + 0.125 * 0.175),
                             rtol=1e-6)  # = 1.0375
  np.testing.assert_allclose(stats["z_loss"], (1 + 4 + 0 + 1) / 4, rtol=1e-5)
  # Perfect balance gives 1, everything on one expert gives E.
  uniform = jnp.zeros((1, 4, 4))
  one_hot_ids = jnp.zeros((1, 4, 1), jnp.int32)
  assert float(moe.router_stats(uniform, one_hot_ids, jax.nn.softmax(uniform), jnp.ones((1, 4)))["aux_loss"]) == 1.0
  peaked = jax.nn.one_hot(jnp.zeros((1, 4), jnp.int32), 4)
  assert float(moe.router_stats(uniform, one_hot_ids, peaked, jnp.ones((1, 4)))["aux_loss"]) == 4.0


def _unscanned_params(scanned, moe_every):
  """layers/block_i/...[g] -> layers_{g * moe_every + i}/..."""
  params = {k: v for k, v in scanned.items() if k != "layers"}
  groups = jax.tree.leaves(scanned["layers"])[0].shape[0]
  for g in range(groups):
    for i in range(moe_every):
      params[f"layers_{g * moe_every + i}"] = jax.tree.map(lambda a: a[g], scanned["layers"][f"block_{i}"])
  return params


def test_moe_every_groups_scan_and_match_unrolled_dense_reference():
  """moe_every=2: layers 1, 3 dense, 2, 4 MoE; the scanned expert-parallel model (2 groups of 2 layers) equals the
  unrolled model with the dense reference MoE, padding included; the MoE layers sow their statistics."""
  config = load_config("tiny_moe", "moe_every=2")
  config.model.update(capacity_factor=0.0, num_layers=4)  # dropless: must equal the dense reference exactly
  scanned_cfg = ModelConfig.from_config(config.model)
  unrolled_cfg = ModelConfig.from_config({**config.model, "scan_layers": False, "moe_impl": "dense"})
  mesh = make_mesh({"data": 2, "expert": 4})
  inputs = jax.random.randint(jax.random.key(0), (8, 16), 0, scanned_cfg.vocab_size)
  segment_ids = jnp.ones((8, 16), jnp.int32).at[:, 12:].set(0)
  # Random params of the right shapes without compiling init (any params will do for an equivalence).
  shapes = nn.meta.unbox(jax.eval_shape(Transformer(scanned_cfg).init, jax.random.key(1), inputs)["params"])
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.1 + (s.ndim <= 2), s.dtype), shapes)
  with mesh_context(mesh, DEFAULT_RULES):
    layer_params = params["layers"]
    assert set(layer_params) == {"block_0", "block_1"}
    assert "mlp" in layer_params["block_0"] and "moe" in layer_params["block_1"]
    assert layer_params["block_1"]["moe"]["gate"].shape == (2, 8, 64, 128)
    run = lambda cfg, p: Transformer(cfg).apply({"params": p}, inputs, None, segment_ids, mutable=[moe.MOE_STATS])
    logits, stats = jax.jit(lambda p: run(scanned_cfg, p))(params)
    logits_ref, stats_ref = jax.jit(lambda p: run(unrolled_cfg, p))(_unscanned_params(params, 2))
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
  summary = moe.summarize_stats(stats[moe.MOE_STATS], 8)
  summary_ref = moe.summarize_stats(stats_ref[moe.MOE_STATS], 8)
  assert_trees_close(summary, summary_ref, rtol=1e-5, what="moe stats")
  assert float(summary["assigned"]) == 2 * 8 * 12 * 2  # 2 MoE layers x 96 real tokens x top-2
  assert float(summary["dropped"]) == 0.0


@pytest.mark.slow
def test_tiny_moe_trains_and_reports_router_metrics():
  config = load_config("tiny_moe")
  config.data.update(seq_len=64, global_batch_size=16)
  config.train.update(steps=30, microbatches=2)
  experiment = build_experiment(config)
  state = experiment.init_state()
  train_step = experiment.train_step()
  batches = make_train_iterator(config, experiment)
  history = []
  for _ in range(30):
    state, metrics = train_step(state, next(batches))
    history.append(jax.device_get(metrics))
  losses = [float(m["ce_loss"]) for m in history]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  cfg = experiment.model_config
  for m in history:
    loads = [float(m[f"moe/load_expert_{e}"]) for e in range(cfg.num_experts)]
    assert abs(sum(loads) - 1.0) < 1e-4 and min(loads) >= 0
    assert 0.0 <= float(m["moe/dropped_fraction"]) < 1.0
    assert float(m["moe/aux_loss"]) >= 1.0 - 1e-4  # E * sum(load * importance) is minimised by balance at 1
    # The router losses reach the training loss with the config weights.
    expected = (m["ce_loss"] + config.train.z_loss_weight * m["z_loss"]
                + cfg.router_aux_loss_weight * m["moe/aux_loss"] + cfg.router_z_loss_weight * m["moe/router_z_loss"])
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-5)


def test_num_experts_not_divisible_by_expert_axis_is_a_clear_error():
  config = load_config("tiny_moe")
  config.model.num_experts = 6
  config.mesh.update(fsdp=1, expert=4, tensor=2)
  with pytest.raises(MeshError, match=r"model.num_experts=6 is not divisible by the 4 expert shards"):
    build_experiment(config)


def test_config_validation_messages():
  base = dict(num_experts=8, num_layers=4)
  with pytest.raises(ValueError, match=r"experts_per_token=9: expected 1..num_experts=8"):
    ModelConfig(**base, experts_per_token=9)
  with pytest.raises(ValueError, match=r"moe_every=3: expected a positive divisor of config.model.num_layers=4"):
    ModelConfig(**base, moe_every=3)
  with pytest.raises(ValueError, match=r"moe_impl='sparse'"):
    ModelConfig(**base, moe_impl="sparse")
  with pytest.raises(ValueError, match=r"num_experts=-1"):
    ModelConfig(num_experts=-1)
  assert ModelConfig(**base, moe_every=2).is_moe_layer(1) and not ModelConfig(**base, moe_every=2).is_moe_layer(2)
  assert ModelConfig(**base, mlp_dim=96).moe_mlp_dim == 96


_GROK_SCRIPT = """
import json
import jax
import numpy as np
from tests.helpers import load_config
from tweetjax.train.experiment import build_experiment, param_count
config = load_config("grok1_314b")
experiment = build_experiment(config)  # shapes only: eval_shape, nothing allocated
layout = experiment.layout
state_bytes = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                  for a, s in zip(jax.tree.leaves(layout.abstract_state), jax.tree.leaves(layout.state_shardings)))
expert_params = sum(int(np.prod(layout.abstract_state.params["layers"]["moe"][n].shape)) for n in ("gate", "up", "down"))
gate_sharding = layout.param_shardings["layers"]["moe"]["gate"]
print(json.dumps({"params": param_count(layout.abstract_state.params), "mesh": dict(experiment.mesh.shape),
                  "expert_params": expert_params, "state_bytes_per_device": state_bytes,
                  "gate_shard": gate_sharding.shard_shape(layout.abstract_state.params["layers"]["moe"]["gate"].shape),
                  "devices": jax.device_count()}))
"""


def test_grok1_shape_on_512_device_mesh():
  """build_experiment(grok1_314b) on its 512-device layout: 314B params within 1%, fully sharded state."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=512", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", _GROK_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 512
  assert result["mesh"] == {"data": 1, "stage": 1, "fsdp": 16, "expert": 8, "context": 1, "tensor": 4}
  assert abs(result["params"] - 314e9) / 314e9 < 0.01, result
  # Expert weights [layers, E, D, F] split 512 ways (expert x fsdp x tensor); the rest (attention, embedding: 2%
  # of the params) too (d_model over fsdp x expert, heads/vocab over tensor; norms and the router's expert axis are
  # not split). Params + Adam moments: 12 bytes per param. (With the rest replicated over expert: 8.46e9 bytes.)
  assert result["gate_shard"] == [64, 1, 6144 // 16, 32768 // 4]
  expected = 12 * result["params"] / 512
  assert abs(result["state_bytes_per_device"] - expected) / expected < 0.01, (result, expected)
