"""Exact and near-duplicate filters over normalized tweet text; the first occurrence in build order is kept.

Near-duplicates: MinHash over character k-shingles (k = `shingle`, default 5) with `num_perm` hash functions,
bucketed by LSH into `bands` bands of `num_perm // bands` rows; a candidate sharing a band is a duplicate only if
its estimated Jaccard similarity (fraction of equal signature entries) is >= `threshold`. Everything is seeded
with fixed constants, so results are identical across runs, machines and Python versions.

Shapes: N texts in a batch, S shingles in the batch, P hash functions (`num_perm`).
"""

import hashlib
from typing import Sequence

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)


def _mix64(h_N: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer: spreads the polynomial hash bits (uint64 arithmetic wraps by design)."""
  h_N = h_N ^ (h_N >> np.uint64(30))
  h_N = h_N * np.uint64(0xBF58476D1CE4E5B9)
  h_N = h_N ^ (h_N >> np.uint64(27))
  h_N = h_N * np.uint64(0x94D049BB133111EB)
  return h_N ^ (h_N >> np.uint64(31))


def shingle_hashes(texts: Sequence[str], shingle: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """uint32 hashes of all character shingles of all texts, and the start of each text's run in them."""
  padded = [t if len(t) >= shingle else t + "\x00" * (shingle - len(t)) for t in texts]
  lengths_N = np.fromiter((len(t) for t in padded), np.int64, len(padded))
  cp_T = np.frombuffer("".join(padded).encode("utf-32-le"), np.uint32).astype(np.uint64)
  windows_WxK = np.lib.stride_tricks.sliding_window_view(cp_T, shingle)
  powers_K = np.uint64(1000003) ** np.arange(shingle, dtype=np.uint64)
  with np.errstate(over="ignore"):
    h_W = _mix64((windows_WxK * powers_K).sum(axis=1, dtype=np.uint64))
  counts_N = lengths_N - shingle + 1
  text_start_N = np.cumsum(lengths_N) - lengths_N
  run_start_N = np.cumsum(counts_N) - counts_N
  idx_S = np.arange(counts_N.sum()) + np.repeat(text_start_N - run_start_N, counts_N)
  h_S = h_W[idx_S]
  return ((h_S >> np.uint64(32)) ^ (h_S & _MASK32)), run_start_N


class MinHasher:
  """MinHash signatures uint32[N, P] for a batch of texts."""

  def __init__(self, num_perm: int = 64, shingle: int = 5, seed: int = 1234):
    rng = np.random.default_rng(seed)
    self.a_P = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)
    self.b_P = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    self.shingle = shingle

  def __call__(self, texts: Sequence[str], chunk: int = 512) -> np.ndarray:
    out = []
    for i in range(0, len(texts), chunk):  # chunks bound the [P, S] temporary to tens of MB
      x_S, starts_N = shingle_hashes(texts[i:i + chunk], self.shingle)
      with np.errstate(over="ignore"):
        hv_PxS = (self.a_P[:, None] * x_S[None, :] + self.b_P[:, None]) >> np.uint64(32)
      out.append(np.minimum.reduceat(hv_PxS, starts_N, axis=1).T.astype(np.uint32))
    return np.concatenate(out) if out else np.zeros((0, len(self.a_P)), np.uint32)


class NearDuplicateFilter:
  """Streams batches of texts; `keep(texts)` marks the ones not near-duplicating any earlier kept text."""

  def __init__(self, threshold: float = 0.7, num_perm: int = 64, bands: int = 16, shingle: int = 5):
    if num_perm % bands:
      raise ValueError(f"num_perm={num_perm} must be divisible by bands={bands}")
    self.threshold = threshold
    self.bands = bands
    self.hasher = MinHasher(num_perm, shingle)
    rows = num_perm // bands
    self._band_mult_R = np.random.default_rng(99).integers(1, 2**63, rows, dtype=np.uint64) | np.uint64(1)
    self._buckets: dict[tuple[int, int], int] = {}
    self._sigs: list[np.ndarray] = []

  def keep(self, texts: Sequence[str]) -> np.ndarray:
    sig_NxP = self.hasher(texts)
    n = len(texts)
    with np.errstate(over="ignore"):
      keys_NxB = (sig_NxP.reshape(n, self.bands, -1).astype(np.uint64) * self._band_mult_R).sum(
          axis=2, dtype=np.uint64)
    keys = keys_NxB.tolist()
    keep_N = np.ones(n, bool)
    num_perm = sig_NxP.shape[1]
    for i in range(n):
      sig_P = sig_NxP[i]
      for band, key in enumerate(keys[i]):
        j = self._buckets.get((band, key))
        if j is not None and np.count_nonzero(self._sigs[j] == sig_P) >= self.threshold * num_perm:
          keep_N[i] = False
          break
      if keep_N[i]:
        idx = len(self._sigs)
        self._sigs.append(sig_P)
        for band, key in enumerate(keys[i]):
          self._buckets.setdefault((band, key), idx)
    return keep_N


class ExactDuplicateFilter:
  """Keeps the first occurrence of each exact text (8-byte blake2b digests: memory stays small)."""

  def __init__(self):
    self._seen: set[bytes] = set()

  def keep(self, texts: Sequence[str]) -> np.ndarray:
    keep_N = np.ones(len(texts), bool)
    for i, t in enumerate(texts):
      d = hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest()
      if d in self._seen:
        keep_N[i] = False
      else:
        self._seen.add(d)
    return keep_N


def jaccard(a: str, b: str, shingle: int = 5) -> float:
  """Exact shingle Jaccard similarity (for tests and for choosing a threshold)."""
  sa = {a[i:i + shingle] for i in range(max(1, len(a) - shingle + 1))}
  sb = {b[i:i + shingle] for i in range(max(1, len(b) - shingle + 1))}
  return len(sa & sb) / max(1, len(sa | sb))
