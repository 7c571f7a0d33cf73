"""Blockwise attention equals the reference einsum attention (values and grads: packed segments, padding, soft-cap,
GQA and MQA, a length that is not a multiple of the block), its causal schedule skips the blocks above the diagonal,
and the per-block online-softmax steps compose in any key order (what ring attention relies on)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tweetjax.model import blockwise
from tweetjax.parallel import online_softmax
from tweetjax.model.attention import attention_mask, reference_attention
from tweetjax.perf import hlo

TOL = dict(rtol=2e-5, atol=2e-5)


def _inputs(B, L, H, K, Dh, seed=0):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  # Large logits (x3) so that the soft-cap and the running max both matter.
  q = jax.random.normal(kq, (B, L, H, Dh)) * 3
  k = jax.random.normal(kk, (B, L, K, Dh)) * 3
  v = jax.random.normal(kv, (B, L, K, Dh))
  do = jax.random.normal(kd, (B, L, H, Dh))
  # Packed rows: documents of 5..30 tokens, the last row ends in padding (segment 0); a document crosses blocks.
  rng = np.random.default_rng(seed)
  seg = np.cumsum(rng.random((B, L)) < 0.08, axis=1) + 1
  seg[-1, -9:] = 0
  return q, k, v, do, jnp.asarray(seg, jnp.int32)


def _values_and_grads(attend, q, k, v, do):
  out, vjp = jax.vjp(attend, q, k, v)
  return (out,) + vjp(do)


# (B, L, H, K, Dh, block, softcap, causal)
CASES = [(2, 64, 4, 2, 16, 16, 0.0, True),  # GQA, 4 x 4 blocks, 10 visited
         (2, 70, 4, 1, 8, 16, 5.0, True),  # MQA, soft-cap, L padded up to 80
         (2, 40, 4, 2, 8, 16, 3.0, False)]  # bidirectional (segments only)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[1]}_H{c[2]}K{c[3]}_b{c[5]}_cap{c[6]}_causal{c[7]}")
def test_blockwise_matches_reference_values_and_grads(case):
  B, L, H, K, Dh, block, softcap, causal = case
  q, k, v, do, seg = _inputs(B, L, H, K, Dh)
  mask = attention_mask(seg, seg) if causal else (seg[:, :, None] == seg[:, None, :])[:, None]
  reference = functools.partial(reference_attention, mask_Bx1xLxS=mask, softcap=softcap)
  want = jax.jit(lambda *a: _values_and_grads(reference, *a))(q, k, v, do)
  attend = functools.partial(blockwise.blockwise_attention, q_segment_ids_BxL=seg, kv_segment_ids_BxS=seg,
                             causal=causal, softcap=softcap, block=block)
  got = jax.jit(lambda *a: _values_and_grads(attend, *a))(q, k, v, do)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(g / scale, w / scale, err_msg=name, **TOL)


def test_causal_schedule_skips_blocks_above_the_diagonal():
  assert blockwise.block_pairs(4, 4, causal=True).tolist() == [
      [0, 0], [1, 0], [1, 1], [2, 0], [2, 1], [2, 2], [3, 0], [3, 1], [3, 2], [3, 3]]
  assert len(blockwise.block_pairs(4, 4, causal=False)) == 16
  # The compiled program's matmul FLOPs (loop trip counts applied): 10 of the 16 block pairs, forward and backward.
  B, L, H, K, Dh, block = 1, 64, 2, 1, 8, 16
  q, k, v, do, _ = _inputs(B, L, H, K, Dh)
  seg = jnp.ones((B, L), jnp.int32)

  def step(q, k, v, do):
    return _values_and_grads(functools.partial(blockwise.blockwise_attention, q_segment_ids_BxL=seg,
                                               kv_segment_ids_BxS=seg, block=block), q, k, v, do)

  flops = hlo.dot_flops(hlo.parse_module(jax.jit(step).lower(q, k, v, do).compile().as_text()))
  # Forward 2 products (q.k, p.v), backward 5 (scores again, dv, dp, dk, dq), each 2 * block^2 * Dh per head.
  per_pair = 7 * 2 * block * block * Dh * H * B
  assert flops == pytest.approx(10 * per_pair, rel=0.02)


def test_online_softmax_steps_compose_in_any_key_order():
  """Running the step over the key blocks in reverse order (as a ring delivers them) and summing the backward
  steps over the pairs gives the reference values and gradients."""
  B, L, H, K, Dh, bq = 2, 32, 4, 2, 8, 16
  q, k, v, do, seg = _inputs(B, L, H, K, Dh, seed=1)
  reference = functools.partial(reference_attention, mask_Bx1xLxS=attention_mask(seg, seg), softcap=4.0)
  want = jax.jit(lambda *a: _values_and_grads(reference, *a))(q, k, v, do)
  got = jax.jit(functools.partial(_by_block_steps, bq=bq, softcap=4.0))(q, k, v, do, seg)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(g / scale, w / scale, err_msg=name, **TOL)


def _by_block_steps(q, k, v, do, seg, *, bq, softcap):
  B, L, H, Dh = q.shape
  K = k.shape[2]
  G = H // K
  to_q = lambda x: x.reshape(B, L, K, G, Dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, Dh]
  to_kv = lambda x: x.transpose(0, 2, 1, 3)  # [B, K, S, Dh]
  qb, dob, kb, vb = to_q(q), to_q(do), to_kv(k), to_kv(v)
  pos = jnp.arange(L)
  blk = lambda i: slice(i * bq, (i + 1) * bq)
  kw = dict(causal=True, softcap=softcap)
  outs, dq, dk, dv = [], jnp.zeros_like(qb), jnp.zeros_like(kb), jnp.zeros_like(vb)
  for i in range(L // bq):
    state = online_softmax.initial_state(B, K, G, bq, Dh)
    for j in reversed(range(L // bq)):
      state = online_softmax.online_softmax_step(state, qb[:, :, :, blk(i)], kb[:, :, blk(j)], vb[:, :, blk(j)],
                                            seg[:, blk(i)], seg[:, blk(j)], pos[blk(i)], pos[blk(j)], **kw)
    out_i, lse_i = online_softmax.finalize(state)
    outs.append(out_i)
    delta_i = jnp.sum(dob[:, :, :, blk(i)] * out_i, axis=-1)
    for j in range(L // bq):
      dq_ij, dk_ij, dv_ij = online_softmax.online_softmax_backward_step(
          qb[:, :, :, blk(i)], kb[:, :, blk(j)], vb[:, :, blk(j)], dob[:, :, :, blk(i)], lse_i, delta_i,
          seg[:, blk(i)], seg[:, blk(j)], pos[blk(i)], pos[blk(j)], **kw)
      dq, dk, dv = dq.at[:, :, :, blk(i)].add(dq_ij), dk.at[:, :, blk(j)].add(dk_ij), dv.at[:, :, blk(j)].add(dv_ij)
  from_q = lambda x: x.transpose(0, 3, 1, 2, 4).reshape(B, L, H, Dh)
  return from_q(jnp.concatenate(outs, axis=3)), from_q(dq), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)
