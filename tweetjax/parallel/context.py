"""Context parallelism: the sequence split over the `context` mesh axis, ring attention, a load-balanced causal split.

Dims: B batch, L length, H query heads, K kv heads, G = H // K, Dh head dim, C context shards; lower case (b, l,
h, k) are one device's shares, lh = l / 2 the length of one chunk.

Load balance ("zigzag"). With causal attention the device holding the end of the sequence has the most keys to
attend to. `load_balance` reorders every [B, L] array of a batch (inputs, targets, positions, segment ids, weights)
so that device c holds chunks c and 2C - 1 - c of the 2C equal chunks: an early and a late one, the same work on
every device. It also adds `token_index`, each slot's index in the original row, which attention uses for
causality; the per-token loss is a sum over tokens, so nothing has to be put back. The data loader's rows and
positions are untouched: the permutation happens inside the step.

Ring attention. One jax.shard_map over the mesh: each device keeps its queries and passes its K/V blocks (with
their segment ids and token indices) around the ring of context shards with ppermute, C - 1 times; each arriving
block is folded into an online softmax per query chunk. Chunk pairs with nothing visible (a late key chunk against
an early query chunk, different packed tweets) are skipped at run time (lax.cond); with the zigzag order each device
then computes about half of its C x 4 chunk pairs. The custom VJP recomputes the scores (flash attention style):
a second pass around the ring carries K/V with their gradient accumulators, which arrive back at their owner after
C moves, so no [l, L] probabilities are ever kept.

The per-block steps are the blockwise kernel's (tweetjax/parallel/online_softmax.py), with the blocks' token indices
as positions.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from tweetjax.parallel.mesh import MeshError
from tweetjax.parallel.online_softmax import (block_mask, finalize, initial_state, online_softmax_backward_step,
                                              online_softmax_step)
from tweetjax.parallel.rules import DEFAULT_RULES, Rules, mesh_axes_of

# ----------------------------------------------------------------------------------------------------------------
# Load-balanced order.


def validate(seq_len: int, shards: int) -> None:
  if shards > 1 and seq_len % (2 * shards):
    raise MeshError(f"data.seq_len={seq_len} is not divisible by 2 x {shards} context shards (mesh.context): the "
                    "load-balanced split gives every context shard two equal chunks")


def zigzag_order(length: int, shards: int) -> np.ndarray:
  """Original token index of every slot: device c's slots hold chunks c and 2C - 1 - c of 2C equal chunks."""
  validate(length, shards)
  chunk = length // (2 * shards)
  chunks = [i for c in range(shards) for i in (c, 2 * shards - 1 - c)]
  return np.concatenate([np.arange(i * chunk, (i + 1) * chunk) for i in chunks])


def load_balance(batch: dict[str, jax.Array], shards: int) -> dict[str, jax.Array]:
  """Every [B, L] array in zigzag order, plus `token_index` [B, L] (original positions in the row)."""
  length = batch["inputs"].shape[1]
  order = zigzag_order(length, shards)
  out = {key: jnp.take(value, order, axis=1) for key, value in batch.items()}
  out["token_index"] = jnp.broadcast_to(jnp.asarray(order, jnp.int32), batch["inputs"].shape)
  return out


def context_shards(mesh=None, rules: Rules | None = None) -> int:
  """How many ways the sequence is split (the mesh axes of "act_length"); `mesh` defaults to the one in context."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    return 1
  rules = rules or nn.get_logical_axis_rules() or DEFAULT_RULES
  size = 1
  for axis in mesh_axes_of("act_length", rules):
    size *= mesh.shape[axis]
  return size


# ----------------------------------------------------------------------------------------------------------------
# Ring attention.


def _q_chunks(x_bxlxhxd, kv_heads: int):
  """[b, l, h, Dh] -> [2, b, k, G, lh, Dh]."""
  b, l, h, d = x_bxlxhxd.shape
  return x_bxlxhxd.reshape(b, 2, l // 2, kv_heads, h // kv_heads, d).transpose(1, 0, 3, 4, 2, 5)


def _q_unchunk(x_2xbxkxGxlhxd):
  _, b, k, g, lh, d = x_2xbxkxGxlhxd.shape
  return x_2xbxkxGxlhxd.transpose(1, 0, 4, 2, 3, 5).reshape(b, 2 * lh, k * g, d)


def _kv_chunks(x_bxlxkxd):
  """[b, l, k, Dh] -> [2, b, k, lh, Dh]."""
  b, l, k, d = x_bxlxkxd.shape
  return x_bxlxkxd.reshape(b, 2, l // 2, k, d).transpose(1, 0, 3, 2, 4)


def _kv_unchunk(x_2xbxkxlhxd):
  _, b, k, lh, d = x_2xbxkxlhxd.shape
  return x_2xbxkxlhxd.transpose(1, 0, 3, 2, 4).reshape(b, 2 * lh, k, d)


def _id_chunks(x_bxl):
  b, l = x_bxl.shape
  return x_bxl.reshape(b, 2, l // 2).transpose(1, 0, 2)


def _visible(q_ids, kv_ids, qi, kj):
  (q_seg, q_pos), (kv_seg, kv_pos) = q_ids, kv_ids
  return jnp.any(block_mask(q_seg[qi], kv_seg[kj], q_pos[qi], kv_pos[kj]))


def _ring_shift(tree, axis, shards: int):
  return jax.tree.map(lambda x: lax.ppermute(x, axis, [(i, (i + 1) % shards) for i in range(shards)]), tree)


def _forward(q, k, v, segment_ids, token_index, axis, shards, softcap):
  kv_heads, (b, l, h, d) = k.shape[2], q.shape
  q_c, ids = _q_chunks(q, kv_heads), (_id_chunks(segment_ids), _id_chunks(token_index))
  kv = (_kv_chunks(k), _kv_chunks(v), ids)
  states = jax.tree.map(lambda x: jnp.stack([x, x]), initial_state(b, kv_heads, h // kv_heads, l // 2, d))
  step = functools.partial(online_softmax_step, softcap=softcap)

  def fold(states, kv):
    k_c, v_c, kv_ids = kv
    out = []
    for qi in range(2):
      state = jax.tree.map(lambda x: x[qi], states)
      for kj in range(2):
        args = (q_c[qi], k_c[kj], v_c[kj], ids[0][qi], kv_ids[0][kj], ids[1][qi], kv_ids[1][kj])
        state = lax.cond(_visible(ids, kv_ids, qi, kj), lambda s, a=args: step(s, *a), lambda s: s, state)
      out.append(state)
    return jax.tree.map(lambda *x: jnp.stack(x), *out)

  def body(carry, _):
    states, kv = carry
    return (fold(states, kv), _ring_shift(kv, axis, shards)), None

  (states, kv), _ = lax.scan(body, (states, kv), None, length=shards - 1)
  out_c, lse_c = jax.vmap(finalize)(fold(states, kv))
  return _q_unchunk(out_c).astype(q.dtype), (q, k, v, segment_ids, token_index, out_c, lse_c)


def _backward(axis, shards, softcap, residuals, do):
  q, k, v, segment_ids, token_index, out_c, lse_c = residuals
  kv_heads = k.shape[2]
  q_c, do_c = _q_chunks(q, kv_heads), _q_chunks(do, kv_heads)
  ids = (_id_chunks(segment_ids), _id_chunks(token_index))
  delta_c = jnp.sum(out_c * do_c.astype(jnp.float32), axis=-1)
  step = functools.partial(online_softmax_backward_step, softcap=softcap)
  k_c, v_c = _kv_chunks(k), _kv_chunks(v)
  zeros_kv = jnp.zeros(k_c.shape, jnp.float32)

  def fold(dq_c, kv, dkv):
    k_c, v_c, kv_ids = kv
    dk_c, dv_c = dkv
    for qi in range(2):
      for kj in range(2):
        args = (q_c[qi], k_c[kj], v_c[kj], do_c[qi], lse_c[qi], delta_c[qi], ids[0][qi], kv_ids[0][kj], ids[1][qi],
                kv_ids[1][kj])
        zeros = (jnp.zeros(q_c.shape[1:], jnp.float32), jnp.zeros(k_c.shape[1:], jnp.float32),
                 jnp.zeros(k_c.shape[1:], jnp.float32))
        dq, dk, dv = lax.cond(_visible(ids, kv_ids, qi, kj), lambda a=args: step(*a), lambda: zeros)
        dq_c, dk_c, dv_c = dq_c.at[qi].add(dq), dk_c.at[kj].add(dk), dv_c.at[kj].add(dv)
    return dq_c, (dk_c, dv_c)

  def body(carry, _):
    dq_c, kv, dkv = carry
    dq_c, dkv = fold(dq_c, kv, dkv)
    return (dq_c, _ring_shift(kv, axis, shards), _ring_shift(dkv, axis, shards)), None

  carry = (jnp.zeros(q_c.shape, jnp.float32), (k_c, v_c, ids), (zeros_kv, zeros_kv))
  (dq_c, kv, dkv), _ = lax.scan(body, carry, None, length=shards - 1)
  dq_c, dkv = fold(dq_c, kv, dkv)
  dk_c, dv_c = _ring_shift(dkv, axis, shards)  # the C-th move brings every block's gradient home
  return (_q_unchunk(dq_c).astype(q.dtype), _kv_unchunk(dk_c).astype(k.dtype), _kv_unchunk(dv_c).astype(v.dtype),
          None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k, v, segment_ids, token_index, axis, shards, softcap):
  return _forward(q, k, v, segment_ids, token_index, axis, shards, softcap)[0]


_ring.defvjp(lambda q, k, v, s, t, axis, shards, softcap: _forward(q, k, v, s, t, axis, shards, softcap), _backward)


def ring_fits(batch: int, length: int, mesh=None, rules: Rules | None = None) -> bool:
  """Whether [batch, length] splits over the batch and context shards (a batch of 1 at init does not)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  rules = rules or nn.get_logical_axis_rules() or DEFAULT_RULES
  batch_shards = 1
  for axis in mesh_axes_of("act_batch", rules):
    batch_shards *= mesh.shape[axis]
  return batch % batch_shards == 0 and length % (2 * context_shards(mesh, rules)) == 0


def _spec(*dims):
  return P(*(None if not axes else axes[0] if len(axes) == 1 else tuple(axes) for axes in dims))


def ring_attention(q_BxLxHxDh: jax.Array, k_BxLxKxDh: jax.Array, v_BxLxKxDh: jax.Array, segment_ids_BxL: jax.Array,
                   token_index_BxL: jax.Array, *, softcap: float = 0.0, mesh: Mesh | None = None,
                   rules: Rules | None = None) -> jax.Array:
  """Causal attention (a query sees the keys of its segment whose token index is not after its own) with the
  length split over the mesh axes of "act_length"; heads stay split as "act_heads" / "act_kv_heads"."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  rules = rules or nn.get_logical_axis_rules() or DEFAULT_RULES
  batch, length = mesh_axes_of("act_batch", rules), mesh_axes_of("act_length", rules)
  heads, kv_heads = mesh_axes_of("act_heads", rules), mesh_axes_of("act_kv_heads", rules)
  shards = context_shards(mesh, rules)
  if q_BxLxHxDh.shape[1] % (2 * shards):
    raise MeshError(f"ring attention: length {q_BxLxHxDh.shape[1]} is not divisible by 2 x {shards} context shards")
  axis = length[0] if len(length) == 1 else tuple(length)
  fn = jax.shard_map(
      lambda q, k, v, s, t: _ring(q, k, v, s, t, axis, shards, float(softcap)), mesh=mesh,
      in_specs=(_spec(batch, length, heads, ()), _spec(batch, length, kv_heads, ()),
                _spec(batch, length, kv_heads, ()), _spec(batch, length), _spec(batch, length)),
      out_specs=_spec(batch, length, heads, ()), check_vma=False)  # the softmax state starts device-invariant
  return fn(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL.astype(jnp.int32), token_index_BxL.astype(jnp.int32))
