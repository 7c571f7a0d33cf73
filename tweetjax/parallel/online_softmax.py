"""The per-block steps of flash attention, shared by the blockwise kernel (tweetjax/model/blockwise.py: blocks of one
sequence) and ring attention (tweetjax/parallel/context.py: blocks that arrive from other devices, with their
global token indices as positions). Contract of `online_softmax_step(state, q, k, v, q_segment_ids, kv_segment_ids, q_positions,
kv_positions, causal=, softcap=, scale=)`:
  q [B, K, G, bq, Dh]; k, v [B, K, bk, Dh] (any float dtype; products accumulate in fp32);
  q_segment_ids [B, bq], kv_segment_ids [B, bk] (int; a query sees a key only with an equal id);
  q_positions [bq] or [B, bq], kv_positions [bk] or [B, bk] (int; with causal=True a query sees the keys whose
  position is <= its own);
  state = SoftmaxState(max [B, K, G, bq], sum [B, K, G, bq], acc [B, K, G, bq, Dh]), fp32, from `initial_state`;
  returns the updated state. Logits are scale * q.k (scale None: Dh ** -0.5), then softcap * tanh(logits / softcap)
  when softcap > 0, then masked. `finalize(state) -> (out [B, K, G, bq, Dh] fp32, lse [B, K, G, bq])`; a row that saw
  no key at all gets out = 0 and lse = 0 (the reference softmax would spread it uniformly over masked keys).
The backward step takes the same blocks plus the output's cotangent do [B, K, G, bq, Dh], the forward's lse and
delta = sum(do * out, -1) [B, K, G, bq], and returns this pair's (dq [B, K, G, bq, Dh], dk, dv [B, K, bk, Dh]) in
fp32, to be summed over pairs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = -1e30  # "no key seen yet" max, and the logit of a masked key: finite, so exp(m_old - m_new) is never NaN


class SoftmaxState(NamedTuple):
  """Running online-softmax statistics of one query block (fp32)."""
  max_BxKxGxbq: jax.Array
  sum_BxKxGxbq: jax.Array
  acc_BxKxGxbqxDh: jax.Array


def initial_state(B: int, K: int, G: int, bq: int, Dh: int) -> SoftmaxState:
  return SoftmaxState(jnp.full((B, K, G, bq), _NEG, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                      jnp.zeros((B, K, G, bq, Dh), jnp.float32))


def block_mask(q_segment_ids_Bxbq, kv_segment_ids_Bxbk, q_positions, kv_positions, causal: bool = True
               ) -> jax.Array:
  """Boolean [B, bq, bk]: the key is in the query's segment and, if causal, not after it."""
  mask_Bxbqxbk = q_segment_ids_Bxbq[:, :, None] == kv_segment_ids_Bxbk[:, None, :]
  if causal:
    q_pos = jnp.asarray(q_positions)
    kv_pos = jnp.asarray(kv_positions)
    q_pos = q_pos[None] if q_pos.ndim == 1 else q_pos
    kv_pos = kv_pos[None] if kv_pos.ndim == 1 else kv_pos
    mask_Bxbqxbk = mask_Bxbqxbk & (kv_pos[:, None, :] <= q_pos[:, :, None])
  return mask_Bxbqxbk


def _scores(q_BxKxGxbqxDh, k_BxKxbkxDh, scale, softcap):
  """Scaled (and soft-capped) logits [B, K, G, bq, bk] in fp32, and tanh of the cap (for the backward)."""
  B, K, G, bq, Dh = q_BxKxGxbqxDh.shape
  q_BxKxRxDh = q_BxKxGxbqxDh.reshape(B, K, G * bq, Dh)
  s_BxKxRxbk = jnp.einsum("bkrd,bksd->bkrs", q_BxKxRxDh, k_BxKxbkxDh, preferred_element_type=jnp.float32)
  s = s_BxKxRxbk.reshape(B, K, G, bq, -1)
  if scale != 1.0:
    s = s * scale
  if softcap:
    t = jnp.tanh(s / softcap)
    return softcap * t, t
  return s, None


def online_softmax_step(state: SoftmaxState, q_BxKxGxbqxDh, k_BxKxbkxDh, v_BxKxbkxDh, q_segment_ids_Bxbq,
                        kv_segment_ids_Bxbk, q_positions, kv_positions, *, causal: bool = True,
                        softcap: float = 0.0, scale: float | None = None) -> SoftmaxState:
  """One key block into the running softmax of one query block (the contract is in the module docstring)."""
  Dh = q_BxKxGxbqxDh.shape[-1]
  scale = Dh ** -0.5 if scale is None else scale
  s_BxKxGxbqxbk, _ = _scores(q_BxKxGxbqxDh, k_BxKxbkxDh, scale, softcap)
  mask = block_mask(q_segment_ids_Bxbq, kv_segment_ids_Bxbk, q_positions, kv_positions, causal)[:, None, None]
  s_BxKxGxbqxbk = jnp.where(mask, s_BxKxGxbqxbk, _NEG)
  m_old, l_old, acc_old = state
  m_new = jnp.maximum(m_old, jnp.max(s_BxKxGxbqxbk, axis=-1))
  p_BxKxGxbqxbk = jnp.where(mask, jnp.exp(s_BxKxGxbqxbk - m_new[..., None]), 0.0)
  alpha = jnp.exp(m_old - m_new)
  l_new = alpha * l_old + jnp.sum(p_BxKxGxbqxbk, axis=-1)
  pv = jnp.einsum("bkgqs,bksd->bkgqd", p_BxKxGxbqxbk.astype(v_BxKxbkxDh.dtype), v_BxKxbkxDh,
                  preferred_element_type=jnp.float32)
  return SoftmaxState(m_new, l_new, alpha[..., None] * acc_old + pv)


def finalize(state: SoftmaxState) -> tuple[jax.Array, jax.Array]:
  """(out [B, K, G, bq, Dh] fp32, lse [B, K, G, bq]) of a query block that has seen all its keys."""
  m, l, acc = state
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  return jnp.where(seen[..., None], acc / safe_l[..., None], 0.0), jnp.where(seen, m + jnp.log(safe_l), 0.0)


def online_softmax_backward_step(q_BxKxGxbqxDh, k_BxKxbkxDh, v_BxKxbkxDh, do_BxKxGxbqxDh, lse_BxKxGxbq,
                                 delta_BxKxGxbq, q_segment_ids_Bxbq, kv_segment_ids_Bxbk, q_positions, kv_positions,
                                 *, causal: bool = True, softcap: float = 0.0, scale: float | None = None):
  """This (query block, key block) pair's share of (dq, dk, dv), fp32, from recomputed scores.

  Computed key-major (scores as [B, K, bk, R]) so that four of the five products have their contraction on the
  operands' last axes, the form XLA:CPU's fast matmul path takes.
  """
  B, K, G, bq, Dh = q_BxKxGxbqxDh.shape
  bk = k_BxKxbkxDh.shape[2]
  scale = Dh ** -0.5 if scale is None else scale
  q_BxKxRxDh = q_BxKxGxbqxDh.reshape(B, K, G * bq, Dh)
  do_BxKxRxDh = do_BxKxGxbqxDh.reshape(B, K, G * bq, Dh)
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  sT_BxKxbkxGxbq = f32("bksd,bkrd->bksr", k_BxKxbkxDh, q_BxKxRxDh).reshape(B, K, bk, G, bq) * scale
  tanh = None
  if softcap:
    tanh = jnp.tanh(sT_BxKxbkxGxbq / softcap)
    sT_BxKxbkxGxbq = softcap * tanh
  maskT = jnp.swapaxes(block_mask(q_segment_ids_Bxbq, kv_segment_ids_Bxbk, q_positions, kv_positions, causal), 1, 2)
  maskT = maskT[:, None, :, None, :]  # [B, 1, bk, 1, bq]
  pT = jnp.where(maskT, jnp.exp(sT_BxKxbkxGxbq - lse_BxKxGxbq[:, :, None]), 0.0)
  pT_BxKxbkxR = pT.reshape(B, K, bk, G * bq)
  dv_BxKxbkxDh = f32("bksr,bkrd->bksd", pT_BxKxbkxR.astype(do_BxKxRxDh.dtype), do_BxKxRxDh)
  dpT = f32("bksd,bkrd->bksr", v_BxKxbkxDh, do_BxKxRxDh).reshape(B, K, bk, G, bq)
  dsT = pT * (dpT - delta_BxKxGxbq[:, :, None])
  if softcap:
    dsT = dsT * (1.0 - jnp.square(tanh))
  dsT_BxKxbkxR = (dsT * scale).reshape(B, K, bk, G * bq).astype(q_BxKxRxDh.dtype)
  dk_BxKxbkxDh = f32("bksr,bkrd->bksd", dsT_BxKxbkxR, q_BxKxRxDh)
  dq_BxKxRxDh = f32("bksr,bksd->bkrd", dsT_BxKxbkxR, k_BxKxbkxDh)
  return dq_BxKxRxDh.reshape(B, K, G, bq, Dh), dk_BxKxbkxDh, dv_BxKxbkxDh
