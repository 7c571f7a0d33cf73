"""The tiled LM head + cross-entropy equals the dense path: loss, z-loss and the grads of the hidden states and the
head weight, on one device and the four equivalence layouts, untied and tied, with the final soft-cap, vocab padding
and padded chunks; through the model's LossFn on a 3-D mesh; and the compiled step holds less memory than the dense
one by at least its fp32 logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from tests.helpers import load_config
from tweetjax.data.token_stream import synthetic_batch, to_global_array
from tweetjax.model.config import ModelConfig
from tweetjax.model.layers import finalize_logits
from tweetjax.parallel.losses import tiled_cross_entropy
from tweetjax.parallel.mesh import make_mesh
from tweetjax.parallel.rules import DEFAULT_RULES, batch_sharding, logical_to_mesh_spec, mesh_context, replicated
from tweetjax.parallel.shard_map_ops import dense_cross_entropy
from tweetjax.train.experiment import build_experiment
from tweetjax.train.step import loss_and_grads

B, L, D, V = 8, 24, 16, 128
Z_LOSS = 1e-2
RTOL = 1e-5
CFG = ModelConfig(vocab_size=V, valid_vocab_size=120, final_logit_softcap=4.0)  # 8 padding ids, logits capped at 4
LAYOUTS = [dict(), dict(data=8), dict(fsdp=8), dict(data=2, tensor=4), dict(data=2, fsdp=2, tensor=2)]
# Untied on one device and every equivalence layout; the tied head on one device and the 3-D mesh.
CASES = [(False, layout) for layout in LAYOUTS] + [(True, LAYOUTS[0]), (True, LAYOUTS[-1])]


def _problem(tied):
  kh, kw, kt, ku = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(kh, (B, L, D))
  weight = jax.random.normal(kw, (V, D) if tied else (D, V))
  targets = jax.random.randint(kt, (B, L), 0, CFG.valid_vocab_size)
  weights = (jax.random.uniform(ku, (B, L)) > 0.2).astype(jnp.float32)  # some tokens do not count
  return hidden, weight, targets, weights


def _dense_total(hidden, weight, targets, weights, tied):
  logits = finalize_logits(CFG, jnp.einsum("bld,vd->blv" if tied else "bld,dv->blv", hidden, weight))
  loss, log_z = dense_cross_entropy(logits, targets)
  ce, z = jnp.sum(loss * weights), jnp.sum(jnp.square(log_z) * weights)
  return ce + Z_LOSS * z, (ce, z)


@functools.cache
def _dense_reference(tied):
  """Loss sums and grads of the dense path, once per head kind."""
  problem = _problem(tied)
  (total, (ce, z)), grads = jax.jit(jax.value_and_grad(
      functools.partial(_dense_total, tied=tied), argnums=(0, 1), has_aux=True))(*problem)
  return problem, (total, ce, z), grads


@pytest.mark.parametrize("tied,layout", CASES, ids=[("tied-" if t else "untied-") + (
    ",".join(f"{k}={v}" for k, v in l.items()) or "1dev") for t, l in CASES])
def test_tiled_loss_and_grads_equal_dense(tied, layout):
  (hidden, weight, targets, weights), want, want_grads = _dense_reference(tied)
  mesh = make_mesh({"data": 1, **layout}, jax.devices()[:max(1, int(np.prod(list(layout.values()) or [1])))])
  put = lambda x, axes: jax.device_put(x, NamedSharding(mesh, logical_to_mesh_spec(axes, DEFAULT_RULES)))
  args = (put(hidden, ("act_batch", "act_length", None)), put(weight, ("vocab", "embed") if tied else ("embed", "vocab")),
          put(targets, ("act_batch", "act_length")), put(weights, ("act_batch", "act_length")))
  # 24 * 8 / (batch shards) tokens per device in chunks of 10: the last chunk is padded.
  tiled = functools.partial(tiled_cross_entropy, vocab_axis=0 if tied else 1, finalize=functools.partial(
      finalize_logits, CFG), chunk=10, z_loss_weight=Z_LOSS, mesh=mesh, rules=DEFAULT_RULES,
                            compute_dtype=jnp.float32)
  with mesh_context(mesh, DEFAULT_RULES):
    got, got_grads = jax.jit(jax.value_and_grad(lambda h, w, t, u: tiled(h, w, t, u)[0], argnums=(0, 1)))(*args)
    got_sums = jax.jit(tiled)(*args)  # the forward alone (evaluation): no gradients formed
  np.testing.assert_allclose(got, want[0], rtol=RTOL)
  np.testing.assert_allclose(np.array(got_sums), np.array(want), rtol=RTOL)
  for name, g, w in zip(("d hidden", "d weight"), got_grads, want_grads):
    assert float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) < RTOL, name
  # The weight gradient comes out in the param's own shards (reduce-scattered, not gathered).
  assert got_grads[1].sharding.is_equivalent_to(args[1].sharding, 2)


def test_tiled_step_holds_less_memory_than_the_dense_logits():
  N, Dm, Vm = 2048, 64, 8192  # fp32 logits: 64 MiB
  h, w = jnp.zeros((1, N, Dm)), jnp.zeros((Dm, Vm))
  t, u = jnp.zeros((1, N), jnp.int32), jnp.ones((1, N))
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  cfg = ModelConfig(vocab_size=Vm)
  tiled = lambda h, w: tiled_cross_entropy(h, w, t, u, vocab_axis=1, finalize=functools.partial(finalize_logits, cfg),
                                           chunk=256, z_loss_weight=Z_LOSS, mesh=mesh, rules=DEFAULT_RULES,
                                           compute_dtype=jnp.float32)[0]
  dense = lambda h, w: _dense_total(h, w, t, u, False)[0]
  temp = lambda f: jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, w).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = N * Vm * 4
  assert temp(tiled) <= temp(dense) - logits_bytes, (temp(tiled), temp(dense))


def test_loss_fn_with_logits_chunk_equals_dense_on_a_3d_mesh():
  """The whole model (tied embedding, final soft-cap): LossFn's loss and every param's grad, logits_chunk vs 0."""
  results = []
  for chunk in (0, 48):
    config = load_config("tiny")
    config.mesh.update(data=2, fsdp=2, expert=1, tensor=2)
    config.model.update(logits_chunk=chunk, tie_embeddings=True, final_logit_softcap=8.0)
    experiment = build_experiment(config)
    params = experiment.init_state().params
    batch = to_global_array(synthetic_batch(3, 0, config.data.global_batch_size, config.data.seq_len,
                                            config.model.vocab_size), experiment.mesh)
    grad_fn = jax.jit(lambda p, b: loss_and_grads(experiment.loss_fn, p, b, 1),
                      in_shardings=(experiment.layout.param_shardings, batch_sharding(experiment.mesh)),
                      out_shardings=(experiment.layout.param_shardings, replicated(experiment.mesh)))
    with mesh_context(experiment.mesh, experiment.rules):
      results.append(jax.device_get(grad_fn(params, batch)))
  (want_grads, want), (got_grads, got) = results
  for key in ("loss", "ce_loss", "z_loss"):
    np.testing.assert_allclose(got[key], want[key], rtol=RTOL, err_msg=key)
  errors = jax.tree.map(lambda g, w: float(np.linalg.norm(g - w) / np.linalg.norm(w)), got_grads, want_grads)
  assert max(jax.tree.leaves(errors)) < RTOL, errors
