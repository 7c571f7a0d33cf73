"""Deduplication rules shared by both build engines: keeper order, exact keys, MinHash LSH near-duplicates.

Every rule is a function of the records alone, never of their order, so the local engine (all records at once) and
the Beam engine (one partition of keys at a time, any number of workers) keep exactly the same records.

Keeper order (`rank`): the smallest (created_at, id) wins, ids compared as (length, string) so numeric ids compare
as numbers; a record without a time sorts after every record with one. Records sharing an id are ordered by
`id_rank` (rank, then text, then the serialized example), which is total.

Near-duplicates: MinHash over character k-shingles (k = `shingle`, default 5) with `num_perm` hash functions; LSH
buckets of `num_perm // bands` rows in each of `bands` bands. The rule, one keyed round over band buckets:
  the representative of a bucket is its member with the smallest rank; a record is a near-duplicate iff, in at
  least one band, its bucket's representative is another record whose signature agrees with its own on at least
  `threshold * num_perm` entries (the estimated Jaccard similarity).
Representatives are chosen among all candidates, dropped or not, so the result needs no iteration: a dropped record
is always within the threshold of an older record (never a chain of them), and two kept records can still be
near-duplicates when neither represents the bucket they share. Everything is seeded with fixed constants, so results
are identical across runs, machines and Python versions.

Shapes: N texts, S shingles in a batch, P hash functions (`num_perm`), B bands, R rows per band, M bucket entries,
W 64-bit words of a sketch.
"""

import hashlib
from typing import Any, Sequence

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
NO_TIME = "~" * 20  # sorts after every ISO-8601 time (`2023-03-01T00:00:00Z`)


def rank(record: dict[str, Any]) -> str:
  """The keeper order as one string: fixed-width time, zero-padded id length, id (the id is its suffix)."""
  tweet_id = record["id"]
  return f"{record['created_at'] or NO_TIME:<20}{len(tweet_id):06d}{tweet_id}"


def rank_id(rank_str: str) -> str:
  return rank_str[26:]


def id_rank(rank_str: str, text: str, example: bytes) -> tuple[str, str, bytes]:
  """Total order among records sharing an id: `rank`, then the text, then `example`, the record's serialized
  tf.Example (writer.serialize): two records equal in all three are written identically, so either may be kept."""
  return rank_str, text, example


def text_key(text: str) -> bytes:
  """128-bit digest of the normalized text: the exact-duplicate key."""
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def stable_hash(key: str | bytes) -> int:
  """A 64-bit hash that is the same in every process (Python's `hash` is salted per process)."""
  data = key.encode("utf-8") if isinstance(key, str) else key
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def smallest_per_key(items: Sequence[Any], key, order) -> list[int]:
  """Per `key(item)`, the index of the item with the smallest `order(item)` (the earliest on ties), in the order
  each key first occurs. `order` is computed only for keys that occur more than once (ids and texts rarely do)."""
  first: dict[Any, int] = {}
  repeats: dict[Any, list[int]] = {}
  for i, item in enumerate(items):
    k = key(item)
    j = first.setdefault(k, i)
    if j != i:
      repeats.setdefault(k, [j]).append(i)
  if not repeats:
    return list(first.values())
  return [i if k not in repeats else min(repeats[k], key=lambda m: order(items[m])) for k, i in first.items()]


def keep_smallest(records: Sequence[dict[str, Any]], key, order) -> tuple[list[dict[str, Any]], int]:
  """Per `key(record)`, the record with the smallest `order(record)`; returns (kept, number dropped)."""
  kept = smallest_per_key(records, key, order)
  return [records[i] for i in kept], len(records) - len(kept)


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

  def __call__(self, texts: Sequence[str], chunk: int = 256, block: int = 4) -> np.ndarray:
    """In chunks of `chunk` texts and `block` hash functions, so the [block, S] products (~1 MB) stay in cache and
    are reused (2x the texts/s of one [P, S] product per chunk of 64 texts; memory traffic bounds this loop). The
    shift to the high 32 bits comes after the min: (h >> 32) is monotone in h, so it is the same min."""
    num_perm = len(self.a_P)
    out = []
    with np.errstate(over="ignore"):  # the products wrap mod 2**64 by design
      for i in range(0, len(texts), chunk):
        x_S, starts_N = shingle_hashes(texts[i:i + chunk], self.shingle)
        min_PxN = np.empty((num_perm, len(starts_N)), np.uint64)
        h_BxS = np.empty((block, len(x_S)), np.uint64)
        for p in range(0, num_perm, block):
          h = h_BxS[:min(block, num_perm - p)]
          np.multiply(self.a_P[p:p + block, None], x_S[None, :], out=h)
          h += self.b_P[p:p + block, None]
          np.minimum.reduceat(h, starts_N, axis=1, out=min_PxN[p:p + len(h)])
        out.append((min_PxN >> np.uint64(32)).T.astype(np.uint32))
    return np.concatenate(out) if out else np.zeros((0, len(self.a_P)), np.uint32)


# Bits per signature entry in the sketch of a candidate pair's test (`NearDuplicateLSH.may_be_similar`). On the
# synthetic corpus 2 bits (16 bytes a record at num_perm=64) let 3.7% of the candidate pairs through at 200k tweets
# and 5.0% at 2M; 4 bits 1.3% / 1.7%, 8 bits 1.0% / 1.3%. Every bit is 16 more bytes in each of a record's band
# entries, so 2 moves the fewest bytes in all.
SKETCH_BITS = 2


class NearDuplicateLSH:
  """Signatures, band buckets and the similarity test of the near-duplicate rule (module docstring)."""

  def __init__(self, threshold: float = 0.7, num_perm: int = 64, bands: int = 16, shingle: int = 5):
    if num_perm % bands:
      raise ValueError(f"num_perm={num_perm} must be divisible by bands={bands}")
    self.threshold, self.num_perm, self.bands = threshold, num_perm, bands
    self.hasher = MinHasher(num_perm, shingle)
    rows = num_perm // bands
    self._row_mult_R = np.random.default_rng(99).integers(1, 2**63, rows, dtype=np.uint64) | np.uint64(1)
    self._band_salt_B = np.random.default_rng(98).integers(1, 2**63, bands, dtype=np.uint64)

  def signatures(self, texts: Sequence[str]) -> np.ndarray:
    return self.hasher(texts)

  def buckets(self, sig_NxP: np.ndarray) -> np.ndarray:
    """uint64[N, B] bucket ids; the band is folded in, so equal rows in different bands are different buckets."""
    n = len(sig_NxP)
    with np.errstate(over="ignore"):
      rows_NxB = (sig_NxP.reshape(n, self.bands, -1).astype(np.uint64) * self._row_mult_R).sum(
          axis=2, dtype=np.uint64)
      return _mix64(rows_NxB ^ self._band_salt_B)

  def similar(self, sig_a_P: np.ndarray, sig_b_P: np.ndarray) -> np.ndarray:
    """Whether signatures agree on at least `threshold * num_perm` entries: one pair ([P]) or rows ([N, P])."""
    return np.count_nonzero(sig_a_P == sig_b_P, axis=-1) >= self.threshold * self.num_perm

  def sketches(self, sig_NxP: np.ndarray) -> np.ndarray:
    """uint64[N, W]: the low SKETCH_BITS bits of every signature entry, packed (W = ceil(P * SKETCH_BITS / 64))."""
    per_word = 64 // SKETCH_BITS
    n, p = sig_NxP.shape
    words = -(-p // per_word)
    low_NxP = (sig_NxP & np.uint32((1 << SKETCH_BITS) - 1)).astype(np.uint64)
    low_NxWxE = np.pad(low_NxP, ((0, 0), (0, words * per_word - p))).reshape(n, words, per_word)
    shifts_E = np.arange(per_word, dtype=np.uint64) * np.uint64(SKETCH_BITS)
    return np.bitwise_or.reduce(low_NxWxE << shifts_E, axis=2)

  def may_be_similar(self, sketch_a_MxW: np.ndarray, sketch_b_MxW: np.ndarray) -> np.ndarray:
    """bool[M]: whether the sketches agree on at least `threshold * num_perm` entries. Equal MinHash values have
    equal low bits, so the sketches agree wherever the signatures do: False here implies False from `similar`,
    and a candidate pair can be ruled out before its signatures are brought together."""
    x = sketch_a_MxW ^ sketch_b_MxW
    differ = x | (x >> np.uint64(1))  # SKETCH_BITS == 2: an entry differs iff either of its bits does
    differ &= np.uint64(0x5555555555555555)
    agree_M = self.num_perm - np.bitwise_count(differ).sum(axis=-1, dtype=np.int64)  # padding never differs
    return agree_M >= self.threshold * self.num_perm

  def similar_pairs(self, sig_NxP: np.ndarray, a_M: np.ndarray, b_M: np.ndarray, chunk: int = 1 << 16):
    """`similar` of rows a_M[i] and b_M[i] of sig_NxP, bool[M] (in chunks: no [M, P] temporaries)."""
    return np.concatenate([self.similar(sig_NxP[a_M[i:i + chunk]], sig_NxP[b_M[i:i + chunk]])
                           for i in range(0, len(a_M), chunk)] or [np.zeros(0, bool)])


_NO_TIME_BYTES = b"\xff" * 6


def _rank_to_bytes(rank_str: str) -> bytes:
  t = rank_str[:20]
  time_bytes = _NO_TIME_BYTES if t == NO_TIME else int(
      t[0:4] + t[5:7] + t[8:10] + t[11:13] + t[14:16] + t[17:19]).to_bytes(6, "big")  # YYYYMMDDhhmmss
  return time_bytes + int(rank_str[20:26]).to_bytes(3, "big") + rank_str[26:].encode("utf-8")


def rank_bytes(ranks: Sequence[str]) -> np.ndarray:
  """Ranks as a numpy bytes array in the same order (time as 6 bytes, id length as 3, the id's UTF-8 bytes): half
  the size of the strings in the band buckets, and numpy sorts them without Python. Ids never end in NUL, which
  numpy's bytes dtype would strip."""
  return np.array([_rank_to_bytes(r) for r in ranks], dtype=bytes) if len(ranks) else np.zeros(0, "S1")


def _rank_prefixes(ranks_M: np.ndarray) -> np.ndarray:
  """The first 8 bytes of each `rank_bytes` as a big-endian uint64: ordered as the ranks, up to ties."""
  width = ranks_M.dtype.itemsize
  bytes_MxK = np.zeros((len(ranks_M), 8), np.uint8)
  k = min(8, width)
  bytes_MxK[:, :k] = ranks_M.view(np.uint8).reshape(len(ranks_M), width)[:, :k]
  return bytes_MxK.view(">u8")[:, 0].astype(np.uint64)


def bucket_pair_indices(buckets_M: np.ndarray, ranks_M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(member, representative) entry indices of every bucket with more than one member (module docstring).

  `ranks_M` are `rank_bytes`. The entries of one bucket must all be given together; entries of other buckets may
  be added freely, which is how the Beam engine runs it on one partition of buckets at a time. The representative
  is the smallest rank, the earliest entry among equal ones; members are the entries of a rank other than it.

  Sorting entries by (bucket, rank) compares bytes strings, ~0.9 us an entry when they come shuffled (the Beam
  engine's band rounds); here only the bucket is sorted, the smallest rank is found from a uint64 prefix of it, and
  full ranks are compared only where prefixes tie.
  """
  order_M = np.argsort(buckets_M)  # unstable is fine: ties are broken by entry index below
  b_M = buckets_M[order_M]
  starts_M = np.ones(len(b_M), bool)
  starts_M[1:] = b_M[1:] != b_M[:-1]
  group_M = np.cumsum(starts_M) - 1
  multi_M = np.bincount(group_M)[group_M] > 1
  order_M, starts_M = order_M[multi_M], starts_M[multi_M]  # singleton buckets have no pairs; groups stay whole
  if len(order_M) == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  prefix_M = _rank_prefixes(ranks_M[order_M])
  first_G = np.flatnonzero(starts_M)
  slot_M = np.cumsum(starts_M) - 1  # the entry's bucket among those kept
  candidate_M = prefix_M == np.minimum.reduceat(prefix_M, first_G)[slot_M]  # may hold the bucket's smallest rank
  cand = np.flatnonzero(candidate_M)
  cand_entry, cand_slot = order_M[cand], slot_M[cand]
  cand_rank = ranks_M[cand_entry]
  # a bucket's candidates by full rank, then entry index: the earliest of equal smallest ranks represents it
  by_rank = np.lexsort((cand_entry, cand_rank, cand_slot))
  firsts = np.ones(len(by_rank), bool)
  firsts[1:] = cand_slot[by_rank[1:]] != cand_slot[by_rank[:-1]]
  rep_G = np.empty(len(first_G), np.int64)
  rep_G[cand_slot[by_rank[firsts]]] = cand_entry[by_rank[firsts]]  # every bucket has a candidate: its low prefix
  rep_M = rep_G[slot_M]
  member_M = ~candidate_M
  member_M[cand] = cand_rank != ranks_M[rep_M[cand]]
  return order_M[member_M], rep_M[member_M]


def bucket_pairs(buckets_M: np.ndarray, ranks_M: np.ndarray) -> list[tuple[bytes, bytes]]:
  """`bucket_pair_indices` as (member, representative) `rank_bytes` pairs."""
  member, rep = bucket_pair_indices(buckets_M, ranks_M)
  return list(zip(ranks_M[member].tolist(), ranks_M[rep].tolist()))


def near_duplicates(records: Sequence[dict[str, Any]], lsh: NearDuplicateLSH) -> set[str]:
  """Ranks of the near-duplicates among `records` (all at once: the local engine)."""
  ranks = [rank(r) for r in records]
  sig_NxP = lsh.signatures([r["text"] for r in records])
  buckets_NxB = lsh.buckets(sig_NxP)
  member_M, rep_M = bucket_pair_indices(buckets_NxB.ravel(), np.repeat(rank_bytes(ranks), lsh.bands))
  member_M, rep_M = member_M // lsh.bands, rep_M // lsh.bands  # entry -> record (buckets_NxB is row-major)
  near = np.unique(member_M[lsh.similar_pairs(sig_NxP, member_M, rep_M)])
  return {ranks[i] for i in near.tolist()}


def jaccard(a: str, b: str, shingle: int = 5) -> float:
  """Exact shingle Jaccard similarity (for tests and for choosing a threshold)."""
  sa = {a[i:i + shingle] for i in range(max(1, len(a) - shingle + 1))}
  sb = {b[i:i + shingle] for i in range(max(1, len(b) - shingle + 1))}
  return len(sa & sb) / max(1, len(sa | sb))
