"""The per-partition functions of the Beam build's keyed rounds (beam_build.py): plain functions of one partition's
items that apply the rules of builder.py, dedup.py, threads.py and writer.py, as the local engine does.

Every function is `fn(partition, inputs, stats, **options) -> {output: items}`; `inputs` maps an input name to the
partition's items (None when it got none), `stats` counts drops by reason. Items are columns (tuples of numpy
arrays, the first the routing key) or lists (beam_shuffle.py).

Records are read and cleaned once, then stay in place: the `ids` round keeps one record per id and writes a
*store* per bucket (`Buckets`: a range of the TFDS hash of the id within a split) with the records' serialized
examples, their lengths, hash keys, MinHash signatures and token counts. The dedup rounds that follow move only
columns: a record is named by its *locator* `bucket << 32 | row` in its store, ranked by `dedup.rank_bytes`:
  text    keyed by text digest: drop all but the smallest rank; the kept records' LSH band entries
  bands   keyed by band bucket: (representative, member) pairs
  reps    keyed by the representative's bucket: its signature, read from its store, to each member
  final   keyed by bucket: exact drops, and members within the threshold of a representative, marked; the
          rest is what the bucket's store keeps for the write (a bit mask), with its totals
The write then reads each store once (twice for a bucket at a shard boundary) and writes the shards.
"""

import collections
import dataclasses
import functools
from typing import Any

import numpy as np

from tweetjax.data import beam_shuffle, builder, dedup, threads, writer

ROW_BITS = 32
ROW_MASK = np.uint64((1 << ROW_BITS) - 1)
SIG_CHUNK_ROWS = 4096  # candidate pairs per chunk of representatives' signatures (1 MB of 64 uint32 MinHash values)


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Contiguous ranges of the TFDS hash key (writer.hkey) per split: `counts[i]` buckets for writer.SPLITS[i]."""
  counts: tuple[int, ...]

  @classmethod
  def for_input(cls, partitions: int, validation_fraction: float) -> "Buckets":
    shares = (1.0 - validation_fraction, validation_fraction)
    return cls(tuple(max(1, int(np.ceil(partitions * s))) for s in shares))

  @property
  def total(self) -> int:
    return sum(self.counts)

  def base(self, split: str) -> int:
    return sum(self.counts[:writer.SPLITS.index(split)])

  def of(self, split: str, hkey: int) -> int:
    return self.base(split) + ((hkey * self.counts[writer.SPLITS.index(split)]) >> 128)

  def locate(self, ids, validation_fraction: float) -> tuple[list[int], np.ndarray]:
    """The TFDS hash keys (writer.hkey within each id's split) and the buckets of `ids`."""
    splits = [builder.split_of(i, validation_fraction) for i in ids]
    hkeys = [writer.hkey(s, i) for s, i in zip(splits, ids)]
    return hkeys, np.array([self.of(s, h) for s, h in zip(splits, hkeys)], np.uint64)

  def split_of(self, bucket: int) -> str:
    for split, n in zip(writer.SPLITS, self.counts):
      if bucket < n:
        return split
      bucket -= n
    raise ValueError(f"bucket {bucket} out of range for {self}")

  def covering(self, split: str, shard: int, shards: int) -> range:
    """The buckets that may hold keys of `shard` (writer.shard_of rounds through a float: one bucket of margin)."""
    n = self.counts[writer.SPLITS.index(split)]
    first = max(0, shard * n // shards - 1)
    last = min(n - 1, (shard + 1) * n // shards + 1)
    return range(self.base(split) + first, self.base(split) + last + 1)


@functools.cache
def _lsh(threshold: float) -> dedup.NearDuplicateLSH:
  return dedup.NearDuplicateLSH(threshold)


@functools.cache
def _tokenizer(path: str):
  from tweetjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.Tokenizer(path)


def _token_counts(texts, tokenizer_path: str | None) -> np.ndarray:
  if not tokenizer_path or not texts:
    return np.zeros(len(texts), np.int64)
  return np.array([len(ids) + 2 for ids in _tokenizer(tokenizer_path).encode_batch(texts)], np.int64)


def _digests(texts) -> tuple[np.ndarray, np.ndarray]:
  """The exact-duplicate key (dedup.text_key, 128 bits) as two uint64 columns."""
  raw = np.frombuffer(b"".join(dedup.text_key(t) for t in texts), ">u8").reshape(-1, 2).astype(np.uint64)
  return raw[:, 0].copy(), raw[:, 1].copy()


def _band_entries(buckets_NxB: np.ndarray, ranks_N: np.ndarray, loc_N: np.ndarray, sketch_NxW: np.ndarray):
  bands = buckets_NxB.shape[1]
  return (buckets_NxB.ravel(), np.repeat(ranks_N, bands), np.repeat(loc_N, bands),
          np.repeat(sketch_NxW, bands, axis=0))


def _unique_rows(*cols: np.ndarray) -> np.ndarray:
  """Indices of one of each distinct row of equal-length columns."""
  order = np.lexsort(cols[::-1])
  new = np.zeros(len(order), bool)
  new[:1] = True
  for c in cols:
    c = c[order]
    new[1:] |= c[1:] != c[:-1]
  return order[new]


# ---- dedup rounds


def ids(bucket: int, inputs, stats, *, config: builder.BuildConfig, store_dir: str, tokenizer_path: str | None):
  """One record per id (dedup.id_rank), the bucket's store in hash-key order, the columns of the next round.

  The records come as columns (hash key, rank, text, serialized example: beam_build._ReadClean), or as
  (hash key, record) when threads are joined next.
  """
  cols = inputs["records"]
  hkeys = cols[1]
  if config.join_threads:
    records = cols[2]
    kept = dedup.smallest_per_key(records, key=lambda r: r["id"], order=builder.id_rank)
  else:
    ranks_N, texts_N, examples_N = cols[2:]
    kept = dedup.smallest_per_key(range(len(ranks_N)), key=lambda i: dedup.rank_id(ranks_N[i]),
                                  order=lambda i: dedup.id_rank(ranks_N[i], texts_N[i], examples_N[i]))
  stats["duplicate_id"] += len(hkeys) - len(kept)
  kept.sort(key=hkeys.__getitem__)
  blobs = {"hkeys": hkeys[kept].tolist()}
  if config.join_threads:  # documents are serialized after the join
    records = records[kept].tolist()
    ranks, texts = [dedup.rank(r) for r in records], [r["text"] for r in records]
    blobs.update(payload=records, lengths=np.zeros(len(records), np.int64))
  else:
    ranks, texts, examples = ranks_N[kept].tolist(), texts_N[kept].tolist(), examples_N[kept].tolist()
    blobs.update(payload=examples, lengths=np.array([len(e) for e in examples], np.int64),
                 tokens=_token_counts(texts, tokenizer_path))
  ranks_N = dedup.rank_bytes(ranks)
  out = {}
  if config.dedup_near:
    lsh = _lsh(config.near_threshold)
    blobs["sigs"] = lsh.signatures(texts)
    buckets_NxB, sketch_NxW = lsh.buckets(blobs["sigs"]), lsh.sketches(blobs["sigs"])
  store = beam_shuffle.write_store(store_dir, f"{bucket:06d}", blobs, compress=("hkeys", "payload"))
  out["store"] = [(bucket, store)]
  loc_N = (np.uint64(bucket) << np.uint64(ROW_BITS)) | np.arange(len(texts), dtype=np.uint64)
  if config.dedup_exact:
    hi_N, lo_N = _digests(texts)
    out["texts"] = (hi_N, lo_N, ranks_N, loc_N) + ((buckets_NxB, sketch_NxW) if config.dedup_near else ())
  elif config.dedup_near:
    out["bands"] = _band_entries(buckets_NxB, ranks_N, loc_N, sketch_NxW)
  return out


def text(partition: int, inputs, stats, *, near: bool):
  """One record per normalized text: the smallest rank (dedup.rank) of each digest; drops go to their bucket."""
  del partition
  cols = inputs["texts"]
  hi_N, lo_N, ranks_N, loc_N = cols[:4]
  order = np.lexsort((ranks_N, lo_N, hi_N))  # by digest, then rank
  hi, lo = hi_N[order], lo_N[order]
  first = np.ones(len(order), bool)
  first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
  dropped, kept = order[~first], order[first]
  stats["duplicate"] += len(dropped)
  out = {"drops": (loc_N[dropped] >> np.uint64(ROW_BITS), loc_N[dropped])}
  if near:
    out["bands"] = _band_entries(cols[4][kept], ranks_N[kept], loc_N[kept], cols[5][kept])
  return out


def bands(partition: int, inputs, stats, *, threshold: float):
  """(representative, member) pairs of each band bucket (dedup.bucket_pair_indices), to the representative's bucket.

  Only the pairs whose sketches may be similar (dedup.NearDuplicateLSH.may_be_similar, never a false negative) go
  on: on the synthetic corpus 4-5% of the candidates (878k of 17.6M at 2M tweets), whose signatures the next two
  rounds would move otherwise.
  """
  del partition, stats
  buckets_M, ranks_M, loc_M, sketch_MxW = inputs["bands"]
  member, rep = dedup.bucket_pair_indices(buckets_M, ranks_M)
  maybe = _lsh(threshold).may_be_similar(sketch_MxW[member], sketch_MxW[rep])
  member, rep = member[maybe], rep[maybe]
  rep_loc, member_loc = loc_M[rep], loc_M[member]
  first = _unique_rows(rep_loc, member_loc)  # a pair sharing several bands of this partition, once
  rep_loc, member_loc = rep_loc[first], member_loc[first]
  return {"pairs": (rep_loc >> np.uint64(ROW_BITS), rep_loc, member_loc)}


def reps(bucket: int, inputs, stats):
  """At a representative's bucket: its signature, read from the store, to each of its members' buckets."""
  del bucket, stats
  if inputs.get("pairs") is None:
    return {}
  _, rep_loc, member_loc = inputs["pairs"]
  first = _unique_rows(rep_loc, member_loc)  # a pair found in several band partitions, once
  (sigs,) = beam_shuffle.read_store(inputs["store"][0], "sigs")
  member_loc, rep_rows = member_loc[first], (rep_loc[first] & ROW_MASK).astype(np.int64)

  def chunks():  # the signatures are most of the bytes: never all of the bucket's pairs' at once
    for i in range(0, len(member_loc), SIG_CHUNK_ROWS):
      m = member_loc[i:i + SIG_CHUNK_ROWS]
      yield m >> np.uint64(ROW_BITS), m, sigs[rep_rows[i:i + SIG_CHUNK_ROWS]]

  return {"repsigs": chunks()}


def final(bucket: int, inputs, stats, *, config: builder.BuildConfig, buckets: Buckets):
  """What a bucket's store keeps: all but exact drops and near-duplicates (a member within the threshold of a
  representative); emits the kept mask and totals, or the kept records when threads are joined next."""
  if not inputs["store"]:
    return {}
  (store,) = inputs["store"]
  (lengths_N,) = beam_shuffle.read_store(store, "lengths")
  dropped_N = np.zeros(len(lengths_N), bool)
  if inputs.get("drops") is not None:
    dropped_N[(inputs["drops"][1] & ROW_MASK).astype(np.int64)] = True
  if inputs.get("repsigs") is not None:  # one packed part at a time (a stream, see beam_build._Gather)
    (sigs,) = beam_shuffle.read_store(store, "sigs")
    lsh, near = _lsh(config.near_threshold), [np.zeros(0, np.int64)]
    for _, member_loc, rep_sigs in inputs["repsigs"]:
      rows = (member_loc & ROW_MASK).astype(np.int64)
      near.append(rows[lsh.similar(sigs[rows], rep_sigs)])
    near = np.unique(np.concatenate(near))
    stats["near_duplicate"] += len(near)
    dropped_N[near] = True
  kept_N = ~dropped_N
  if config.join_threads:
    (records,) = beam_shuffle.read_store(store, "payload")
    return {"records": [records[i] for i in np.flatnonzero(kept_N).tolist()]}
  split = buckets.split_of(bucket)
  (tokens_N,) = beam_shuffle.read_store(store, "tokens")
  stats[f"tokens/{split}"] += int(tokens_N[kept_N].sum())
  mask = np.packbits(kept_N).tobytes()
  return {"final": [(bucket, store, mask, int(kept_N.sum()), int(lengths_N[kept_N].sum()))]}


# ---- threads (threads.py): keyed by id, then pointer jumping, then by root


def parents(partition, inputs, stats):
  """Round 0 of the reply chains: each tweet without conversation_id learns its parent (threads.pointer_target)."""
  del partition, stats
  present = dict(inputs.get("ids") or [])  # id -> conversation_id, for the ids of this partition
  states, asks = [], []
  for parent, child in inputs.get("requests") or []:
    conv = present.get(parent)
    node = threads.pointer_target({"id": child, "reply_to_id": parent},
                                  None if conv is None else {"conversation_id": conv})
    states.append(node)
    if not node[2]:
      asks.append((node[1], child))
  states += [(i, "", i) for i in inputs.get("roots") or []]
  return {"states": states, "asks": asks}


def jump(partition, inputs, stats):
  del partition, stats
  state = {n[0]: n for n in inputs.get("states") or []}
  out_states = [n for n in state.values() if n[2]]  # resolved nodes carry over; unresolved ones are re-emitted below
  asks = []
  for target, asker in inputs.get("asks") or []:
    node = threads.jump((asker, target, ""), state[target])
    out_states.append(node)
    if not node[2]:
      asks.append((node[1], asker))
  return {"states": out_states, "asks": asks}


def attach(partition, inputs, stats):
  del partition, stats
  root = {n[0]: threads.final_root(n) for n in inputs.get("states") or []}
  return {"rooted": [(root[r["id"]], r) for r in inputs.get("records") or []]}


def join(partition, inputs, stats, *, validation_fraction: float, buckets: Buckets, tokenizer_path: str | None):
  """Each conversation's document (threads.join_group), serialized, to the bucket of its root id."""
  del partition
  groups = collections.defaultdict(list)
  for rooted in (inputs.get("rooted") or [], inputs.get("rooted_v2") or []):
    for root, r in rooted:
      groups[root].append(r)
  docs = [threads.join_group(root, tweets) for root, tweets in groups.items()]
  stats["thread_merged"] += threads.merged_count(docs)
  hkeys, where = buckets.locate([d["id"] for d in docs], validation_fraction)
  examples = [writer.serialize(d) for d in docs]
  tokens = _token_counts([d["text"] for d in docs], tokenizer_path)
  return {"examples": (where, beam_shuffle.objects(hkeys), beam_shuffle.objects(examples),
                       np.array([len(e) for e in examples], np.int64), tokens)}


def store_docs(bucket: int, inputs, stats, *, buckets: Buckets, store_dir: str):
  """The store of a bucket's joined documents (all kept), in hash-key order, and its totals."""
  _, hkeys, examples, lengths, tokens = inputs["examples"]
  order = np.array(sorted(range(len(hkeys)), key=hkeys.__getitem__), np.int64)
  blobs = {"hkeys": hkeys[order].tolist(), "payload": examples[order].tolist(), "lengths": lengths[order]}
  store = beam_shuffle.write_store(store_dir, f"{bucket:06d}", blobs, compress=("hkeys", "payload"))
  stats[f"tokens/{buckets.split_of(bucket)}"] += int(tokens.sum())
  return {"final": [(bucket, store, None, len(order), int(lengths.sum()))]}
