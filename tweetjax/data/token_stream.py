"""A learnable synthetic token stream in the batch contract, for tests and benchmarks that need no dataset.

Documents are walks of a sparse random Markov chain (each token has a few likely successors), packed into rows with
segment ids and per-segment positions, so the loss falls well below log(V) and the segment-aware mask is exercised.
Batch k depends only on (seed, stream, k): resuming at step k needs nothing but k. The chain itself depends on the
seed alone, so a validation stream (another `stream`) measures the same distribution on documents never trained on.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from tweetjax.parallel.rules import batch_sharding

_SUCCESSORS = 4
_SUCCESSOR_PROBS = np.array([0.7, 0.15, 0.1, 0.05])


def synthetic_batch(seed: int, step: int, batch_size: int, seq_len: int, vocab_size: int,
                    mean_doc_len: int = 48, stream: int = 0) -> dict[str, np.ndarray]:
  """Global batch number `step` as numpy arrays (int32 token fields, float32 weights)."""
  table = np.random.default_rng([seed, 0]).integers(3, vocab_size, size=(vocab_size, _SUCCESSORS))
  rng = np.random.default_rng([seed, 1 + stream, step])
  B, L = batch_size, seq_len
  tokens_BxL1 = np.empty((B, L + 1), np.int64)
  segment_ids_BxL1 = np.empty((B, L + 1), np.int32)
  positions_BxL1 = np.empty((B, L + 1), np.int32)
  starts_BxL1 = rng.random((B, L + 1)) < 1.0 / mean_doc_len
  starts_BxL1[:, 0] = True
  choice_BxL1 = rng.choice(_SUCCESSORS, size=(B, L + 1), p=_SUCCESSOR_PROBS)
  fresh_BxL1 = rng.integers(3, vocab_size, size=(B, L + 1))
  segment_ids_BxL1[:, 0] = 1
  positions_BxL1[:, 0] = 0
  tokens_BxL1[:, 0] = fresh_BxL1[:, 0]
  for t in range(1, L + 1):
    start = starts_BxL1[:, t]
    tokens_BxL1[:, t] = np.where(start, fresh_BxL1[:, t], table[tokens_BxL1[:, t - 1], choice_BxL1[:, t]])
    segment_ids_BxL1[:, t] = segment_ids_BxL1[:, t - 1] + start
    positions_BxL1[:, t] = np.where(start, 0, positions_BxL1[:, t - 1] + 1)
  # A target that starts a new document is not predictable from the current one: it does not count.
  weights_BxL = (~starts_BxL1[:, 1:]).astype(np.float32)
  segment_ids_BxL = segment_ids_BxL1[:, :-1].copy()
  # Pad the tail of every fourth row so the padding path is exercised too.
  pad_from = L - L // 8
  segment_ids_BxL[::4, pad_from:] = 0
  weights_BxL[::4, pad_from:] = 0.0
  inputs_BxL = np.where(segment_ids_BxL > 0, tokens_BxL1[:, :-1], 0)
  return {
      "inputs": inputs_BxL.astype(np.int32),
      "targets": np.where(segment_ids_BxL > 0, tokens_BxL1[:, 1:], 0).astype(np.int32),
      "segment_ids": segment_ids_BxL,
      "positions": np.where(segment_ids_BxL > 0, positions_BxL1[:, :-1], 0).astype(np.int32),
      "weights": weights_BxL,
  }


def to_global_array(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host-global numpy batch as sharded jax.Arrays; each process copies only its own shards."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


class TokenStreamIterator:
  """Checkpointable iterator of global batches: its whole state is the next step number."""

  def __init__(self, seed: int, batch_size: int, seq_len: int, vocab_size: int, mesh: Mesh | None,
               stream: int = 0):
    self.seed, self.batch_size, self.seq_len, self.vocab_size = seed, batch_size, seq_len, vocab_size
    self.stream = stream
    self.mesh = mesh
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    batch = synthetic_batch(self.seed, self.step, self.batch_size, self.seq_len, self.vocab_size,
                            stream=self.stream)
    self.step += 1
    return batch if self.mesh is None else to_global_array(batch, self.mesh)

  def get_state(self) -> dict[str, int]:
    return {"step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    self.step = int(state["step"])
