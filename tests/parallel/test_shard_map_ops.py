"""Vocab-parallel cross-entropy equals the dense one (loss, log-partition and grads) on several layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from tweetjax.parallel.mesh import make_mesh
from tweetjax.parallel.rules import DEFAULT_RULES, logical_to_mesh_spec, mesh_context
from tweetjax.parallel.shard_map_ops import dense_cross_entropy, vocab_parallel_cross_entropy

B, L, V = 8, 6, 64


@pytest.mark.parametrize("layout", [dict(tensor=8), dict(data=2, tensor=4), dict(data=2, fsdp=2, tensor=2),
                                    dict(data=8)])
def test_vocab_parallel_cross_entropy_matches_dense(layout):
  mesh = make_mesh({"data": 1, **layout})
  logits = jax.random.normal(jax.random.key(0), (B, L, V)) * 4
  targets = jax.random.randint(jax.random.key(1), (B, L), 0, V)
  weights = jax.random.uniform(jax.random.key(2), (B, L))

  def objective(ce, logits):
    loss, log_z = ce(logits, targets)
    return jnp.sum(loss * weights) + 1e-2 * jnp.sum(log_z ** 2 * weights), (loss, log_z)

  parallel = lambda x, t: vocab_parallel_cross_entropy(x, t, mesh, DEFAULT_RULES)
  logits_sharded = jax.device_put(
      logits, NamedSharding(mesh, logical_to_mesh_spec(("act_batch", "act_length", "act_vocab"), DEFAULT_RULES)))
  with mesh_context(mesh, DEFAULT_RULES):
    (got, (got_loss, got_log_z)), got_grad = jax.jit(
        jax.value_and_grad(lambda x: objective(parallel, x), has_aux=True))(logits_sharded)
  (want, (want_loss, want_log_z)), want_grad = jax.value_and_grad(
      lambda x: objective(dense_cross_entropy, x), has_aux=True)(logits)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_log_z, want_log_z, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
  # The grads keep the vocab sharding: nothing gathered the full logits.
  assert got_grad.sharding.spec == logits_sharded.sharding.spec


def test_dense_cross_entropy_hand_computed():
  logits = jnp.log(jnp.array([[[1.0, 2.0, 1.0]]]))  # softmax = [.25, .5, .25]
  loss, log_z = dense_cross_entropy(logits, jnp.array([[1]]))
  np.testing.assert_allclose(loss, [[np.log(2.0)]], rtol=1e-6)
  np.testing.assert_allclose(log_z, [[np.log(4.0)]], rtol=1e-6)
