"""Blockwise attention in plain JAX: online softmax over key blocks, never an [L, S] score matrix.

Dims: B batch, L query length, S key length, H query heads, K kv heads, G = H // K query heads per kv head, Dh head
dim, bq / bk query / key block lengths, nq / nk block counts, R = G * bq rows of a query block (the G query heads of a
kv head stacked: grouped-query attention multiplies each K/V block once for all G heads, never repeating it).

Forward (flash attention): for every query block i, a running softmax (row max m, row sum l, weighted value sum acc)
is updated with one key block j at a time; out = acc / l and the log-sum-exp m + log l are all that is kept.
Backward (flash attention 2): per (i, j) the scores are recomputed from q_i, k_j and the saved log-sum-exp, giving
dq_i, dk_j, dv_j without storing probabilities. Memory is O(L) per head instead of O(L S).

Schedule: a static list of (query block, key block) pairs, one loop over it: with a causal mask the pairs above
the diagonal are left out (nq (nq + 1) / 2 of nq^2 blocks: about half the FLOPs; XLA's trip counts then give the
dry-run's FLOP count). A pair whose block is entirely masked by the segment ids (packed rows, padding) is skipped at
run time (lax.cond): packed tweets rarely see across a block boundary. Causal and segment masks and the attention
soft-cap are applied inside each block.

The per-block steps (online softmax forward and backward) live in tweetjax/parallel/online_softmax.py, shared with
ring attention.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from tweetjax.parallel.context import context_shards
from tweetjax.parallel.online_softmax import (block_mask, finalize, initial_state, online_softmax_backward_step,
                                              online_softmax_step)
from tweetjax.parallel.rules import DEFAULT_RULES, mesh_axes_of

DEFAULT_BLOCK = 128


# --- the whole attention: static block schedule + custom VJP --------------------------------------------------------


def block_pairs(nq: int, nk: int, causal: bool, q_offset_blocks: int = 0, key_major: bool = False) -> np.ndarray:
  """The (query block, key block) pairs with anything visible, [P, 2] int32, query-major (or key-major).

  Causal with equal block lengths: key block j is visible to query block i iff j <= i + q_offset_blocks.
  """
  pairs = [(i, j) for i in range(nq) for j in range(nk) if not causal or j <= i + q_offset_blocks]
  if key_major:
    pairs.sort(key=lambda p: (p[1], p[0]))
  return np.asarray(pairs, np.int32).reshape(-1, 2)


def _loop_over_pairs(body, carry, pairs: np.ndarray, first: np.ndarray):
  """carry = body(carry, ((i, j), is_first)) for every pair, in order.

  A while loop, not lax.scan: inside a differentiated layer scan, JAX's scan transposition hoists the parts of an
  inner scan that depend only on residuals (here the recomputed probabilities of every block pair) into a separate
  scan that stacks them, rebuilding the [L, S] matrix this avoids; a while loop is never split. XLA still sees the
  static trip count.
  """
  pairs_Px2, first_P = jnp.asarray(pairs), jnp.asarray(first)

  def step(state):
    p, carry = state
    return p + 1, body(carry, (pairs_Px2[p], first_P[p]))

  return lax.while_loop(lambda state: state[0] < len(pairs), step, (jnp.int32(0), carry))[1]


def _row_starts(pairs: np.ndarray, axis: int) -> np.ndarray:
  """Whether each pair starts a new run of equal `pairs[:, axis]` (a new query row, or key column)."""
  key = pairs[:, axis]
  return np.concatenate([[True], key[1:] != key[:-1]])


def blockwise_attention(q_BxLxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array,
                        q_segment_ids_BxL: jax.Array, kv_segment_ids_BxS: jax.Array, *, causal: bool = True,
                        softcap: float = 0.0, block: int = DEFAULT_BLOCK, mesh=None, rules=None) -> jax.Array:
  """softmax(mask(cap(q k^T / sqrt(Dh)))) v, blockwise, equal to attention.reference_attention with the mask of
  attention.attention_mask (segments equal and, if causal, key index <= query index + S - L).

  Query and key blocks are `block` long (the sequence is padded up to a multiple; L and S may differ, e.g. a
  prompt against a longer key sequence, provided S - L is a multiple of the block when causal).

  On a mesh (`mesh`, default: the one in context) it runs in a shard_map over the batch and head axes of the
  logical rules (`rules`, default: flax's in context): attention is independent per row and head, so every device
  runs its own rows and heads with no collective, and skips the blocks its own rows mask.
  """
  B, L, H, Dh = q_BxLxHxDh.shape
  S, K = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
  bq = min(block, max(L, S))
  if causal and (S - L) % bq:
    raise ValueError(f"blockwise attention: causal with S - L = {S - L} not a multiple of the block ({bq})")
  local = functools.partial(_attention, causal=causal, softcap=float(softcap), block=bq)
  args = (q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_ids_BxL.astype(jnp.int32),
          kv_segment_ids_BxS.astype(jnp.int32))
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    return local(*args)
  rules = rules or nn.get_logical_axis_rules() or DEFAULT_RULES
  batch_axes, head_axes = mesh_axes_of("act_batch", rules), mesh_axes_of("act_heads", rules)
  if context_shards(mesh, rules) > 1:
    raise ValueError("attention_impl='blockwise' needs the sequence unsharded (logical axis 'act_length' -> "
                     f"{list(mesh_axes_of('act_length', rules))}); a sharded sequence needs ring attention")
  if mesh_axes_of("act_kv_heads", rules) != head_axes:
    raise ValueError(f"attention_impl='blockwise' needs 'act_heads' and 'act_kv_heads' on the same mesh axes "
                     f"(got {list(head_axes)} and {list(mesh_axes_of('act_kv_heads', rules))}) so that every "
                     "device holds whole query groups")
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  if B % size(batch_axes) or K % size(head_axes):
    return local(*args)  # e.g. the batch of 1 that initialises the params: plain SPMD
  spec = lambda *dims: P(*(None if not d else d[0] if len(d) == 1 else tuple(d) for d in dims))
  heads = spec(batch_axes, (), head_axes, ())
  ids = spec(batch_axes, ())
  # check_vma=False: the per-device function has no collectives, and its loop carries start as plain zeros.
  return jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, ids, ids), out_specs=heads,
                       check_vma=False)(*args)


def _attention(q, k, v, q_seg, kv_seg, *, causal, softcap, block):
  return _custom_vjp_attention(q, k, v, q_seg, kv_seg, causal, softcap, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _custom_vjp_attention(q, k, v, q_seg, kv_seg, causal, softcap, block):
  return _forward(q, k, v, q_seg, kv_seg, causal, softcap, block)[0]


def _blocks(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_seg_BxL, kv_seg_BxS, block):
  """Padded, block-major copies: q [nq, B, K, G, bq, Dh] (pre-scaled), k/v [nk, B, K, bk, Dh], ids [n, B, b]."""
  B, L, H, Dh = q_BxLxHxDh.shape
  S, K = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
  G = H // K
  nq, nk = -(-L // block), -(-S // block)
  pad_q, pad_k = nq * block - L, nk * block - S
  q = jnp.pad(q_BxLxHxDh, ((0, 0), (0, pad_q), (0, 0), (0, 0))) * jnp.asarray(Dh ** -0.5, q_BxLxHxDh.dtype)
  q = q.reshape(B, nq, block, K, G, Dh).transpose(1, 0, 3, 4, 2, 5)
  kv_pad = ((0, 0), (0, pad_k), (0, 0), (0, 0))
  k = jnp.pad(k_BxSxKxDh, kv_pad).reshape(B, nk, block, K, Dh).transpose(1, 0, 3, 2, 4)
  v = jnp.pad(v_BxSxKxDh, kv_pad).reshape(B, nk, block, K, Dh).transpose(1, 0, 3, 2, 4)
  # Padded queries and keys get ids no real token has (and that differ from each other): they see nothing.
  q_seg = jnp.pad(q_seg_BxL, ((0, 0), (0, pad_q)), constant_values=-1).reshape(B, nq, block).transpose(1, 0, 2)
  kv_seg = jnp.pad(kv_seg_BxS, ((0, 0), (0, pad_k)), constant_values=-2).reshape(B, nk, block).transpose(1, 0, 2)
  q_pos = (jnp.arange(nq * block) + (S - L)).reshape(nq, block)  # causality by index, as attention_mask
  kv_pos = jnp.arange(nk * block).reshape(nk, block)
  return q, k, v, q_seg, kv_seg, q_pos, kv_pos


def _unblock(x_nqxBxKxGxbqxDh, L):
  nq, B, K, G, bq, Dh = x_nqxBxKxGxbqxDh.shape
  return x_nqxBxKxGxbqxDh.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K * G, Dh)[:, :L]


def _forward(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_seg_BxL, kv_seg_BxS, causal, softcap, block):
  B, L, H, Dh = q_BxLxHxDh.shape
  S, K = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
  G = H // K
  q, k, v, q_seg, kv_seg, q_pos, kv_pos = _blocks(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_seg_BxL, kv_seg_BxS, block)
  nq, nk = q.shape[0], k.shape[0]
  pairs = block_pairs(nq, nk, causal, (S - L) // block)
  first = _row_starts(pairs, 0)
  step = functools.partial(online_softmax_step, causal=causal, softcap=softcap, scale=1.0)
  empty = initial_state(B, K, G, block, Dh)

  def body(carry, xs):
    state, out, lse = carry
    (i, j), is_first = xs
    state = jax.tree.map(lambda e, s: jnp.where(is_first, e, s), empty, state)
    visible = jnp.any(block_mask(q_seg[i], kv_seg[j], q_pos[i], kv_pos[j], causal))
    # Only the block-sized state goes through the conditional: a whole output buffer would be copied through it.
    state = lax.cond(visible, lambda s: step(s, q[i], k[j], v[j], q_seg[i], kv_seg[j], q_pos[i], kv_pos[j]),
                     lambda s: s, state)
    o, l = finalize(state)  # written after every key block; the last one (the row's final state) stays
    return state, out.at[i].set(o.astype(out.dtype)), lse.at[i].set(l)

  out0 = jnp.zeros((nq, B, K, G, block, Dh), q_BxLxHxDh.dtype)
  lse0 = jnp.zeros((nq, B, K, G, block), jnp.float32)
  _, out, lse = _loop_over_pairs(body, (empty, out0, lse0), pairs, first)
  return _unblock(out, L), (q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_seg_BxL, kv_seg_BxS, out, lse)


def _forward_rule(q, k, v, q_seg, kv_seg, causal, softcap, block):
  return _forward(q, k, v, q_seg, kv_seg, causal, softcap, block)


def _backward_rule(causal, softcap, block, residuals, do_BxLxHxDh):
  q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_seg_BxL, kv_seg_BxS, out_blocks, lse_blocks = residuals
  B, L, H, Dh = q_BxLxHxDh.shape
  S, K = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
  G = H // K
  q, k, v, q_seg, kv_seg, q_pos, kv_pos = _blocks(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_seg_BxL, kv_seg_BxS, block)
  nq, nk = q.shape[0], k.shape[0]
  do = jnp.pad(do_BxLxHxDh, ((0, 0), (0, nq * block - L), (0, 0), (0, 0)))
  do = do.reshape(B, nq, block, K, G, Dh).transpose(1, 0, 3, 4, 2, 5)
  delta = jnp.sum(do.astype(jnp.float32) * out_blocks.astype(jnp.float32), axis=-1)  # [nq, B, K, G, bq]
  pairs = block_pairs(nq, nk, causal, (S - L) // block, key_major=True)
  first = _row_starts(pairs, 1)
  step = functools.partial(online_softmax_backward_step, causal=causal, softcap=softcap, scale=1.0)
  zeros_kv = jnp.zeros((B, K, block, Dh), jnp.float32)

  def body(carry, xs):
    dk_acc, dv_acc, dq, dk, dv = carry
    (i, j), is_first = xs
    dk_acc, dv_acc = jnp.where(is_first, zeros_kv, dk_acc), jnp.where(is_first, zeros_kv, dv_acc)
    visible = jnp.any(block_mask(q_seg[i], kv_seg[j], q_pos[i], kv_pos[j], causal))
    dq_ij, dk_ij, dv_ij = lax.cond(
        visible, lambda: step(q[i], k[j], v[j], do[i], lse_blocks[i], delta[i], q_seg[i], kv_seg[j], q_pos[i],
                              kv_pos[j]),
        lambda: (jnp.zeros_like(dq[i]), zeros_kv, zeros_kv))
    dk_acc, dv_acc = dk_acc + dk_ij, dv_acc + dv_ij
    # dk/dv of key block j are written after every query block; the last one (all its queries seen) stays.
    return dk_acc, dv_acc, dq.at[i].add(dq_ij), dk.at[j].set(dk_acc), dv.at[j].set(dv_acc)

  dq0 = jnp.zeros((nq, B, K, G, block, Dh), jnp.float32)
  dkv0 = jnp.zeros((nk, B, K, block, Dh), jnp.float32)
  _, _, dq, dk, dv = _loop_over_pairs(body, (zeros_kv, zeros_kv, dq0, dkv0, dkv0), pairs, first)
  # q was pre-scaled inside _blocks: the chain rule gives dq the same factor.
  dq = _unblock(dq, L) * (Dh ** -0.5)
  dk = dk.transpose(1, 0, 3, 2, 4).reshape(B, nk * block, K, Dh)[:, :S]
  dv = dv.transpose(1, 0, 3, 2, 4).reshape(B, nk * block, K, Dh)[:, :S]
  return (dq.astype(q_BxLxHxDh.dtype), dk.astype(k_BxSxKxDh.dtype), dv.astype(v_BxSxKxDh.dtype), None, None)


_custom_vjp_attention.defvjp(_forward_rule, _backward_rule)
