"""The dataset build as an Apache Beam pipeline: the rules of builder.py, applied as keyed rounds on any runner.

  reads      one task per file, or per byte range of a large JSONL/CSV file (ranges.py); parse, normalize, filter
  ids        keyed by id: one record per id (dedup.id_rank)
  text       keyed by the normalized text's digest: one record per text (dedup.rank); LSH band buckets
  bands      keyed by LSH band bucket: (member, representative) pairs        } near duplicates,
  reps       keyed by representative: its signature to each member          } the rule of dedup.py
  near       keyed by member: drop it if its signature is within the threshold of a representative's
  [threads]  keyed by id: parents, then LOG2_MAX_REPLY_DEPTH pointer-jumping rounds (threads.py); keyed by root:
             join each conversation
  write      keyed by (split, shard): sort by TFDS hash, write the array_record shard (writer.py)
Every round is a function of one key's records, so the result does not depend on the worker count, bundle order,
or the number of partitions; it is exactly the local engine's (tests/data/test_beam_build.py).

Elements are batches. A round's input is scattered into `partitions` keys (hash of the round's key modulo the
partition count, ~`PARTITION_INPUT_BYTES` of input each), each worker bundle emitting one zstd-compressed pickled
blob per partition, and a partition's function sees all records of its keys at once. So a shuffle moves a few large
blobs instead of one element per tweet or per band bucket (the Python runners hold shuffled data in the driver, at
~3 KB of memory per small element), and a worker holds one partition, whose size the partition count bounds.

Counts go to Beam counters (namespace "tweetjax"), read back into build_stats.json.
"""

import collections
import json
import math
import os
import pickle
import shlex
from typing import Any, Callable, Iterable, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms import window
from etils import epath
import numpy as np
import zstandard

from tweetjax.data import builder, dedup, formats, ranges, threads, writer

NAMESPACE = "tweetjax"
PARTITION_INPUT_BYTES = 16 << 20  # input bytes per partition of a keyed round: bounds what one worker holds
BLOB_ITEMS = 4096  # items per blob a bundle emits
DEFAULT_OPTIONS = "--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=0"
_SHARD_INFOS = "shard_infos.json"

Stats = collections.Counter


def _pack(obj: Any) -> bytes:
  return zstandard.ZstdCompressor(level=1).compress(pickle.dumps(obj, protocol=5))


def _unpack(blob: bytes) -> Any:
  return pickle.loads(zstandard.ZstdDecompressor().decompress(blob))


def _commit(stats: Stats) -> None:
  for name, value in stats.items():
    if value:
      beam.metrics.Metrics.counter(NAMESPACE, name).inc(value)


# Items of a channel are either records (dicts, keyed by `key_fn`) or columns: a tuple of equal-length numpy arrays
# whose first is the uint64 key.
def _key_of(key_fn: Callable[[Any], int] | None, chunk) -> np.ndarray:
  if key_fn is None:
    return chunk[0]
  return np.fromiter((key_fn(item) for item in chunk), np.uint64, len(chunk))


def _take(chunk, idx: np.ndarray, columns: bool):
  return tuple(c[idx] for c in chunk) if columns else [chunk[i] for i in idx.tolist()]


def _size(chunk, columns: bool) -> int:
  return len(chunk[0]) if columns else len(chunk)


class _Scatter(beam.DoFn):
  """Chunks of items -> (partition, blob of that partition's items), buffered over a bundle."""

  def __init__(self, partitions: int, key_fn: Callable[[Any], int] | None):
    self._partitions, self._key_fn = partitions, key_fn

  def start_bundle(self):
    self._buf: dict[int, list] = collections.defaultdict(list)
    self._count: dict[int, int] = collections.defaultdict(int)

  def _flush(self, p: int):
    parts = self._buf.pop(p)
    self._count.pop(p)
    if self._key_fn is None:
      parts = tuple(np.concatenate(cols) for cols in zip(*parts))
    else:
      parts = [item for part in parts for item in part]
    return p, _pack(parts)

  def process(self, chunk):
    columns = self._key_fn is None
    if not _size(chunk, columns):
      return
    part_N = _key_of(self._key_fn, chunk) % np.uint64(self._partitions)
    order = np.argsort(part_N, kind="stable")
    bounds = np.flatnonzero(np.diff(part_N[order])) + 1
    for idx in np.split(order, bounds):
      p = int(part_N[idx[0]])
      self._buf[p].append(_take(chunk, idx, columns))
      self._count[p] += len(idx)
      if self._count[p] >= BLOB_ITEMS:
        yield self._flush(p)

  def finish_bundle(self):
    for p in list(self._buf):
      yield window.GlobalWindows.windowed_value(self._flush(p))


def _scatter(pcoll, label: str, partitions: int, key_fn: Callable[[Any], int] | None = None):
  return pcoll | label >> beam.ParDo(_Scatter(partitions, key_fn))


def _chunks(items, columns: bool) -> Iterable:
  n = _size(items, columns)
  for i in range(0, n, BLOB_ITEMS):
    yield tuple(c[i:i + BLOB_ITEMS] for c in items) if columns else items[i:i + BLOB_ITEMS]


class _Gather(beam.DoFn):
  """(partition, {input: [blobs]}) -> fn({input: items}, stats) -> tagged chunks of output items."""

  def __init__(self, fn: Callable[..., dict[str, Any]], columns: Sequence[str], **kwargs):
    self._fn, self._columns, self._kwargs = fn, set(columns), kwargs

  def process(self, keyed):
    _, grouped = keyed
    inputs = {}
    for tag, blobs in grouped.items():
      parts = [_unpack(b) for b in blobs]
      if tag in self._columns:
        inputs[tag] = tuple(np.concatenate(cols) for cols in zip(*parts)) if parts else None
      else:
        inputs[tag] = [item for part in parts for item in part]
    stats = Stats()
    for tag, items in self._fn(inputs, stats, **self._kwargs).items():
      if items is not None:
        for chunk in _chunks(items, tag in self._columns):
          yield beam.pvalue.TaggedOutput(tag, chunk)
    _commit(stats)


def _round(label: str, inputs: dict[str, Any], fn, outputs: Sequence[str], columns: Sequence[str] = (), **kwargs):
  """One keyed round: CoGroupByKey of scattered inputs, then `fn` per partition; returns {output tag: pcoll}."""
  grouped = inputs | f"{label}/group" >> beam.CoGroupByKey()
  result = grouped | f"{label}/apply" >> beam.ParDo(_Gather(fn, columns, **kwargs)).with_outputs(*outputs)
  return {tag: result[tag] for tag in outputs}


# ---- per-partition functions (plain: they call the same rules as builder.py's local engine)


def _r_ids(inputs, stats):
  return {"records": builder.dedup_ids(inputs["records"], stats)}


def _r_text(inputs, stats, config: builder.BuildConfig):
  records = inputs["records"]
  if config.dedup_exact:
    records = builder.dedup_exact(records, stats)
  out = {"records": records}
  if config.dedup_near and records:
    lsh = dedup.NearDuplicateLSH(config.near_threshold)
    buckets_NxB = lsh.buckets(lsh.signatures([r["text"] for r in records]))
    ranks_N = dedup.rank_bytes([dedup.rank(r) for r in records])
    out["bands"] = (buckets_NxB.ravel(), np.repeat(ranks_N, lsh.bands))
  return out


def _text_hash(record) -> int:
  return int.from_bytes(builder.text_key(record)[:8], "big")


def _rank_hash(record) -> int:
  return dedup.stable_hash(dedup.rank_bytes([dedup.rank(record)])[0])


def _hashes(strings) -> np.ndarray:
  return np.fromiter((dedup.stable_hash(s) for s in strings), np.uint64, len(strings))


def _r_bands(inputs, stats):
  del stats
  buckets_M, ranks_M = inputs["bands"]
  pairs = sorted(set(dedup.bucket_pairs(buckets_M, ranks_M)))  # a pair sharing several bands, once
  reps = np.array([r for _, r in pairs], dtype=object)
  members = np.array([m for m, _ in pairs], dtype=object)
  return {"pairs": (_hashes(reps), reps, members)}


def _signatures(records, lsh) -> dict[bytes, np.ndarray]:
  ranks = dedup.rank_bytes([dedup.rank(r) for r in records]).tolist()
  return dict(zip(ranks, lsh.signatures([r["text"] for r in records])))


def _r_reps(inputs, stats, config: builder.BuildConfig):
  """At each representative: its signature (from its text, cheaper to move than 64 hash values) to its members."""
  del stats
  if inputs.get("pairs") is None:
    return {}
  _, reps, members = inputs["pairs"]
  pairs = sorted(set(zip(reps.tolist(), members.tolist())))  # a pair found in several band partitions, once
  wanted = {rep for rep, _ in pairs}
  records = [r for r in inputs.get("records") or [] if dedup.rank_bytes([dedup.rank(r)])[0] in wanted]
  sigs = _signatures(records, dedup.NearDuplicateLSH(config.near_threshold))
  members = np.array([m for _, m in pairs], dtype=object)
  return {"repsigs": (_hashes(members), members, np.stack([sigs[rep] for rep, _ in pairs]))}


def _r_near(inputs, stats, config: builder.BuildConfig):
  """At each member: dropped if a representative's signature is within the threshold of its own."""
  records = inputs.get("records") or []
  if inputs.get("repsigs") is None:
    return {"records": records}
  _, members, rep_sigs = inputs["repsigs"]
  by_member = collections.defaultdict(list)
  for m, sig in zip(members.tolist(), rep_sigs):
    by_member[m].append(sig)
  lsh = dedup.NearDuplicateLSH(config.near_threshold)
  ranks = dedup.rank_bytes([dedup.rank(r) for r in records]).tolist()
  candidates = [r for r, k in zip(records, ranks) if k in by_member]
  own = _signatures(candidates, lsh)
  dropped = {k for k, sig in own.items() if any(lsh.similar(sig, s) for s in by_member[k])}
  stats["near_duplicate"] += len(dropped)
  return {"records": [r for r, k in zip(records, ranks) if k not in dropped]}


def _r_parents(inputs, stats):
  """Round 0 of the reply chains: each tweet without conversation_id learns its parent (threads.pointer_target)."""
  del stats
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


def _r_jump(inputs, stats):
  del stats
  state = {n[0]: n for n in inputs.get("states") or []}
  out_states = [n for n in state.values() if n[2]]  # resolved nodes carry over; unresolved ones are re-emitted below
  asks = []
  for target, asker in inputs.get("asks") or []:
    node = threads.jump((asker, target, ""), state[target])
    out_states.append(node)
    if not node[2]:
      asks.append((node[1], asker))
  return {"states": out_states, "asks": asks}


def _r_attach(inputs, stats):
  del stats
  root = {n[0]: threads.final_root(n) for n in inputs.get("states") or []}
  return {"rooted": [(root[r["id"]], r) for r in inputs.get("records") or []]}


def _r_group(inputs, stats):
  groups = collections.defaultdict(list)
  for root, r in inputs.get("rooted") or []:
    groups[root].append(r)
  docs = [threads.join_group(root, tweets) for root, tweets in groups.items()]
  stats["thread_merged"] += threads.merged_count(docs)
  return {"records": docs}


def _r_write(inputs, stats, root: str):
  del stats
  infos = []
  for (split, shard, shards), examples in _by_shard(inputs["examples"]).items():
    count, size = writer.write_shard(writer.shard_path(root, split, shard, shards), examples)
    infos.append((split, shard, shards, count, size))
  return {"infos": infos}


def _by_shard(items):
  groups = collections.defaultdict(list)
  for key, hkey, data in items:
    groups[key].append((hkey, data))
  return groups


# ---- element-wise stages


class _ReadClean(beam.DoFn):
  """A byte range of an export -> batches of normalized, filtered records."""

  def __init__(self, config: builder.BuildConfig):
    self._config = config

  def process(self, rng: ranges.Range, quotes):
    stats = Stats()
    before = sum(quotes.get((rng.path, j), 0) for j in range(rng.index))
    batch = []
    for r in ranges.read(rng, stats, before):
      batch.append(r)
      if len(batch) == builder.BATCH:
        yield builder.clean_batch(batch, self._config, stats)
        batch = []
    if batch:
      yield builder.clean_batch(batch, self._config, stats)
    _commit(stats)


class _Serialize(beam.DoFn):
  """Records -> (split, hkey, serialized example); counts tokens per split when given a tokenizer."""

  def __init__(self, validation_fraction: float, tokenizer_path: str | None):
    self._fraction, self._tokenizer_path = validation_fraction, tokenizer_path

  def setup(self):
    self._tok = None
    if self._tokenizer_path:
      from tweetjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
      self._tok = tokenizer_lib.Tokenizer(self._tokenizer_path)

  def process(self, records):
    out, stats = [], Stats()
    splits = [builder.split_of(r["id"], self._fraction) for r in records]
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r, split in zip(records, splits):
      data = writer.serialize(r)
      out.append((split, writer.hkey(split, r["id"]), data))
      totals[split][0] += 1
      totals[split][1] += len(data)
    if self._tok is not None:
      for split, ids in zip(splits, self._tok.encode_batch([r["text"] for r in records])):
        stats[f"tokens/{split}"] += len(ids) + 2
    _commit(stats)
    for split, t in totals.items():
      yield beam.pvalue.TaggedOutput("totals", (split, tuple(t)))
    yield _pack(out)  # packed: this collection waits for the totals, so the Python runners keep all of it


class _AssignShards(beam.DoFn):
  """(split, hkey, data) -> ((split, shard, shards), hkey, data), the shard count from the split's totals."""

  def process(self, packed, totals):
    out = []
    for split, hkey, data in _unpack(packed):
      count, size = totals[split]
      shards = writer.num_shards(count, size)
      out.append(((split, writer.shard_of(hkey, shards), shards), hkey, data))
    yield out


def _shard_key(item) -> int:
  split, shard, _ = item[0]
  return dedup.stable_hash(f"{split}/{shard}")


def _write_infos(infos: list, root: str) -> None:
  (epath.Path(root) / _SHARD_INFOS).write_text(json.dumps(infos))


def _add_totals(values) -> tuple[int, int]:
  values = list(values)
  return (sum(v[0] for v in values), sum(v[1] for v in values))


def _plan(inputs, split_bytes: int) -> tuple[list[ranges.Range], int]:
  files = formats.list_inputs(inputs)
  plan = [rng for f in files for rng in ranges.plan(f, split_bytes)]
  return plan, sum(f.stat().length for f in files)


def build_pipeline(p: beam.Pipeline, plan: Sequence[ranges.Range], total_bytes: int, root: str,
                   config: builder.BuildConfig, tokenizer_path: str | None = None) -> None:
  parts = max(1, math.ceil(total_bytes / PARTITION_INPUT_BYTES))
  by_id = lambda r: dedup.stable_hash(r["id"])
  csv_ranges = [r for r in plan if r.kind == "csv"]
  quotes = (p | "csv_ranges" >> beam.Create(csv_ranges or [None])
            | "count_quotes" >> beam.FlatMap(lambda r: [((r.path, r.index), ranges.count_quotes(r))] if r else []))
  records = (p | "ranges" >> beam.Create(list(plan)) | "spread" >> beam.Reshuffle()
             | "read" >> beam.ParDo(_ReadClean(config), quotes=beam.pvalue.AsDict(quotes)))

  records = _round("ids", {"records": _scatter(records, "ids/scatter", parts, by_id)}, _r_ids, ["records"])["records"]
  text = _round("text", {"records": _scatter(records, "text/scatter", parts, _text_hash)}, _r_text,
                ["records", "bands"], columns=["bands"], config=config)
  records = text["records"]
  if config.dedup_near:
    bands = _round("bands", {"bands": _scatter(text["bands"], "bands/scatter", parts)}, _r_bands, ["pairs"],
                   columns=["bands", "pairs"])
    repsigs = _round("reps", {"records": _scatter(records, "reps/scatter_records", parts, _rank_hash),
                              "pairs": _scatter(bands["pairs"], "reps/scatter_pairs", parts)},
                     _r_reps, ["repsigs"], columns=["pairs", "repsigs"], config=config)["repsigs"]
    records = _round("near", {"records": _scatter(records, "near/scatter", parts, _rank_hash),
                              "repsigs": _scatter(repsigs, "near/scatter_repsigs", parts)},
                     _r_near, ["records"], columns=["repsigs"], config=config)["records"]
  if config.join_threads:
    records = _threads(records, parts)

  examples = records | "serialize" >> beam.ParDo(_Serialize(config.validation_fraction, tokenizer_path)).with_outputs(
      "totals", main="examples")
  totals = examples["totals"] | "totals/sum" >> beam.CombinePerKey(_add_totals)
  assigned = examples["examples"] | "assign_shards" >> beam.ParDo(_AssignShards(),
                                                                  totals=beam.pvalue.AsDict(totals))
  shard_parts = max(parts, 8)
  infos = _round("write", {"examples": _scatter(assigned, "write/scatter", shard_parts, _shard_key)}, _r_write,
                 ["infos"], root=root)["infos"]
  _ = (infos | "infos/flatten" >> beam.FlatMap(lambda chunk: chunk)
       | "infos/collect" >> beam.combiners.ToList() | "infos/write" >> beam.Map(_write_infos, root=root))


def _threads(records, parts: int):
  by_first = lambda item: dedup.stable_hash(item[0])
  by_id = lambda r: dedup.stable_hash(r["id"])
  split = records | "threads/split" >> beam.ParDo(_SplitForThreads()).with_outputs(
      "rooted", "chained", "ids", "requests", "roots")
  states = _round("threads/parents", {"ids": _scatter(split["ids"], "threads/scatter_ids", parts, by_first),
                                      "requests": _scatter(split["requests"], "threads/scatter_req", parts,
                                                           by_first),
                                      "roots": _scatter(split["roots"], "threads/scatter_roots", parts,
                                                        dedup.stable_hash)},
                  _r_parents, ["states", "asks"])
  for k in range(threads.LOG2_MAX_REPLY_DEPTH):
    states = _round(f"threads/jump{k}", {
        "states": _scatter(states["states"], f"threads/jump{k}/scatter_states", parts, by_first),
        "asks": _scatter(states["asks"], f"threads/jump{k}/scatter_asks", parts, by_first)},
        _r_jump, ["states", "asks"])
  rooted = _round("threads/attach", {
      "states": _scatter(states["states"], "threads/attach/scatter_states", parts, by_first),
      "records": _scatter(split["chained"], "threads/attach/scatter_records", parts, by_id)},
      _r_attach, ["rooted"])["rooted"]
  rooted = (rooted, split["rooted"]) | "threads/all" >> beam.Flatten()
  return _round("threads/join", {"rooted": _scatter(rooted, "threads/scatter_rooted", parts, by_first)},
                _r_group, ["records"])["records"]


class _SplitForThreads(beam.DoFn):
  """Records with a conversation_id know their root; the others go through the reply-chain rounds."""

  def process(self, records):
    rooted, chained, ids, requests, roots = [], [], [], [], []
    for r in records:
      ids.append((r["id"], r["conversation_id"]))
      if r["conversation_id"]:
        rooted.append((r["conversation_id"], r))
        continue
      chained.append(r)
      if r["reply_to_id"]:
        requests.append((r["reply_to_id"], r["id"]))
      else:
        roots.append(r["id"])
    for tag, items in (("rooted", rooted), ("chained", chained), ("ids", ids), ("requests", requests),
                       ("roots", roots)):
      if items:
        yield beam.pvalue.TaggedOutput(tag, items)


def _counters(result) -> Stats:
  stats = Stats()
  for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
    stats[c.key.metric.name] += c.committed
  return stats


def run(inputs, root, config: builder.BuildConfig, *, beam_options: str = "", tokenizer_path: str | None = None,
        split_bytes: int | None = None) -> tuple[Stats, dict[str, int], dict[str, int]]:
  """Runs the pipeline writing into `root` (a temp directory); returns (counts, records per split, tokens)."""
  root = os.fspath(root)
  plan, total_bytes = _plan(inputs, ranges.SPLIT_BYTES if split_bytes is None else split_bytes)
  options = PipelineOptions(shlex.split(beam_options or DEFAULT_OPTIONS))
  p = beam.Pipeline(options=options)
  build_pipeline(p, plan, total_bytes, root, config, tokenizer_path)
  result = p.run()
  state = result.wait_until_finish()
  if state != beam.runners.runner.PipelineState.DONE:
    raise RuntimeError(f"the Beam build of {root} ended in state {state}")
  stats = _counters(result)
  infos_path = epath.Path(root) / _SHARD_INFOS
  infos = json.loads(infos_path.read_text())
  infos_path.unlink()
  lengths: dict[str, list[int]] = {}
  for split, shard, shards, count, _ in infos:
    lengths.setdefault(split, [0] * shards)[shard] = count
  for split, counts in lengths.items():  # a hash range that got no record still needs its (empty) file
    for shard, count in enumerate(counts):
      path = writer.shard_path(root, split, shard, len(counts))
      if not count and not path.exists():
        writer.write_shard(path, [])
  writer.write_metadata(root, lengths)
  splits = {s: sum(lengths.get(s, [])) for s in writer.SPLITS}
  tokens = {s: stats.pop(f"tokens/{s}", 0) for s in writer.SPLITS} if tokenizer_path else {}
  return stats, splits, tokens
