"""Context parallelism: the load-balanced order, ring attention against the reference attention (forward and
gradients, packed segments, padding, soft-cap), and validation (training equivalence with one device:
tests/parallel/test_scale_equivalence.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import small_config
from tweetjax.data.token_stream import synthetic_batch
from tweetjax.model.attention import attention_mask, reference_attention
from tweetjax.parallel import context
from tweetjax.parallel.mesh import MeshError, make_mesh
from tweetjax.parallel.rules import DEFAULT_RULES, mesh_context
from tweetjax.train.experiment import build_experiment


def test_zigzag_gives_every_shard_an_early_and_a_late_chunk():
  order = context.zigzag_order(16, 4)  # 8 chunks of 2
  per_shard = order.reshape(4, 4)
  np.testing.assert_array_equal(per_shard, [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]])
  # Causal work per shard (sum over its queries of the keys before them) is the same on every shard.
  assert len({int(np.sum(row + 1)) for row in per_shard}) == 1
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(0, 0, 2, 16, 64).items()}
  balanced = context.load_balance(batch, 4)
  for key in batch:  # the same tokens, positions, ... moved together; the loader's arrays are untouched
    np.testing.assert_array_equal(balanced[key], np.asarray(batch[key])[:, order])
  np.testing.assert_array_equal(balanced["token_index"][1], order)


@pytest.mark.parametrize("shards,softcap", [(4, 0.0), (2, 30.0)])
def test_ring_attention_matches_reference(shards, softcap):
  B, L, H, K, Dh = 4, 32, 4, 2, 8
  kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
  q, w = jax.random.normal(kq, (B, L, H, Dh)), jax.random.normal(kw, (B, L, H, Dh))
  k, v = jax.random.normal(kk, (B, L, K, Dh)), jax.random.normal(kv, (B, L, K, Dh))
  segments = np.ones((B, L), np.int32)
  segments[1, 10:] = 2  # packed tweets, one crossing the chunk boundaries
  segments[2, 5:20], segments[2, 20:] = 2, 3
  segments[3, 28:] = 0  # padding
  segments = jnp.asarray(segments)
  order, inverse = context.zigzag_order(L, shards), np.argsort(context.zigzag_order(L, shards))

  def reference(q, k, v):
    return reference_attention(q, k, v, attention_mask(segments, segments), softcap=softcap)

  def ring(q, k, v):
    token_index = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (B, L))
    out = context.ring_attention(q[:, order], k[:, order], v[:, order], segments[:, order], token_index,
                                 softcap=softcap)
    return out[:, inverse]

  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
  with mesh_context(make_mesh({"context": shards, "data": -1}), DEFAULT_RULES):
    out = jax.jit(ring)(q, k, v)
    grads = jax.jit(jax.grad(loss(ring), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(out, reference(q, k, v), atol=2e-6)
  for got, want in zip(grads, jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sequence_must_split_into_two_chunks_per_shard():
  config = small_config(dict(context=4, data=2))
  config.data.seq_len = 36  # divisible by 4, not by 8
  with pytest.raises(MeshError, match=r"data.seq_len=36 is not divisible by 2 x 4 context shards \(mesh.context\)"):
    build_experiment(config)
  config = small_config(dict(context=2, data=4))
  config.model.context_attention = "ulysses"
  with pytest.raises(ValueError, match=r"config.model.context_attention='ulysses': expected one of .*ring"):
    build_experiment(config)
