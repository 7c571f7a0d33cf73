"""The dataset build as an Apache Beam pipeline: the rules of builder.py, applied as keyed rounds on any runner.

  read     one task per file, or per byte range of a large JSONL/CSV file (ranges.py); parse, normalize, filter;
           each record to the bucket of its id's TFDS hash key (beam_rounds.Buckets)
  ids      keyed by bucket: one record per id (dedup.id_rank); the bucket's store (serialized examples, MinHash
           signatures, ...), written once; the dedup rounds after it move columns of locators, not records
  text     keyed by the normalized text's digest: one record per text (dedup.rank); LSH band entries
  bands    keyed by LSH band bucket: (representative, member) pairs that  } near duplicates,
           pass the sketch test (dedup.NearDuplicateLSH.may_be_similar) } the rule of dedup.py
  reps     keyed by the representative's bucket: its stored signature     }
  final    keyed by bucket: the records its store keeps, and the totals that fix the shard counts
  [threads keyed by id: parents, then LOG2_MAX_REPLY_DEPTH pointer-jumping rounds (threads.py); keyed by root:
           join each conversation; keyed by bucket: the documents' store]
  write    one task per (split, shard): the kept examples of the buckets it covers, in TFDS hash order (writer.py)
beam_rounds.py has the per-partition functions. Every round is a function of one key's records, so the result does
not depend on the worker count, bundle order, or the number of partitions; it is exactly the local engine's
(tests/data/test_beam_build.py).

Shuffles go through files (beam_shuffle.py): a round's producers write their partitions' blobs to files in the
build's temporary directory and the runner moves only (partition, file span) references, so no process holds a
stage's data: a worker holds one partition (~`PARTITION_INPUT_BYTES` of input, the partition count grows with the
input) and its producer buffers. The shuffle files are removed when the build ends.

Counts go to Beam counters (namespace "tweetjax"), read back into build_stats.json.
"""

import bisect
import collections
import json
import math
import os
import shlex
import time
import types
from typing import Any, Callable, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath
import numpy as np

from tweetjax.data import beam_rounds, beam_shuffle, builder, dedup, formats, ranges, threads, writer

NAMESPACE = "tweetjax"
PARTITION_INPUT_BYTES = 16 << 20  # input bytes per partition of a keyed round: bounds what one worker holds
CHUNK_ITEMS = 4096  # list items per element between a round's function and its scatter
CHUNK_ROWS = 1 << 16  # column rows per element
DEFAULT_OPTIONS = "--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=0"
_SHARD_INFOS = "shard_infos.json"
CPU_PREFIX = "cpu_us/"  # stats keys of the CPU microseconds per step (build_stats.json: "cpu_seconds")

Stats = collections.Counter


def _commit(stats: Stats) -> None:
  for name, value in stats.items():
    if value:
      beam.metrics.Metrics.counter(NAMESPACE, name).inc(value)


class _Gather(beam.DoFn):
  """(partition, {input: [refs]}) -> fn(partition, {input: items}, stats) -> tagged chunks of output items.

  Inputs named in `stores` pass through as their list of StoreRefs, those in `streams` as an iterator of their
  packed parts (beam_shuffle.read_parts); outputs named in `elements` are emitted item by item (keyed references
  for a later round), the others in chunks for a scatter (an output given as a generator: its chunks as they come).
  """

  def __init__(self, label: str, fn: Callable[..., dict[str, Any]], stores: Sequence[str], elements: Sequence[str],
               streams: Sequence[str] = (), **kwargs):
    self._label, self._fn, self._stores, self._elements, self._kwargs = label, fn, set(stores), set(elements), kwargs
    self._streams = set(streams)

  def _input(self, tag: str, refs):
    if tag in self._stores:
      return list(refs)
    if not refs:
      return None
    return beam_shuffle.read_parts(refs) if tag in self._streams else beam_shuffle.read(refs)

  def process(self, keyed):
    t0 = time.thread_time()
    partition, grouped = keyed
    inputs = {tag: self._input(tag, refs) for tag, refs in grouped.items()}
    stats = Stats()
    outputs = self._fn(partition, inputs, stats, **self._kwargs)
    del inputs
    beam_shuffle.count_cpu(self._label, t0)
    for tag, items in outputs.items():
      if items is None:
        continue
      if tag in self._elements:
        for item in items:
          yield beam.pvalue.TaggedOutput(tag, item)
      elif isinstance(items, types.GeneratorType):
        for chunk in items:
          yield beam.pvalue.TaggedOutput(tag, chunk)
      else:
        n = CHUNK_ROWS if beam_shuffle.is_columns(items) else CHUNK_ITEMS
        for chunk in beam_shuffle.chunks(items, n):
          yield beam.pvalue.TaggedOutput(tag, chunk)
    _commit(stats)
    outputs = items = None  # what the partition held, before its freed pages go back
    beam_shuffle.release_memory()


def _round(label: str, inputs: dict[str, Any], fn, outputs: Sequence[str], stores: Sequence[str] = (),
           elements: Sequence[str] = (), streams: Sequence[str] = (), **kwargs):
  """One keyed round: CoGroupByKey of (partition, ref) inputs, then `fn` per partition; returns {output: pcoll}."""
  grouped = inputs | f"{label}/group" >> beam.CoGroupByKey()
  gather = _Gather(label, fn, stores, elements, streams=streams, **kwargs)
  result = grouped | f"{label}/apply" >> beam.ParDo(gather).with_outputs(*outputs)
  return {tag: result[tag] for tag in outputs}


class _ReadClean(beam.DoFn):
  """A byte range of an export -> columns (bucket, hash key, ...) of its normalized, filtered records: rank, text
  and serialized example, or the record itself when threads are joined."""

  def __init__(self, config: builder.BuildConfig, buckets: beam_rounds.Buckets):
    self._config, self._buckets = config, buckets

  def _columns(self, records):
    hkeys, where = self._buckets.locate([r["id"] for r in records], self._config.validation_fraction)
    if self._config.join_threads:  # threads are joined from records, documents serialized after the join
      return where, beam_shuffle.objects(hkeys), beam_shuffle.objects(records)
    # Records leave as what the ids round needs of them (beam_rounds.ids): the serialized example is cheaper to
    # move than the record's dict and is made once either way.
    return (where, beam_shuffle.objects(hkeys), beam_shuffle.objects([dedup.rank(r) for r in records]),
            beam_shuffle.objects([r["text"] for r in records]),
            beam_shuffle.objects([writer.serialize(r) for r in records]))

  def process(self, rng: ranges.Range, quotes):
    stats = Stats()
    before = sum(quotes.get((rng.path, j), 0) for j in range(rng.index))
    batch = []
    t0 = time.thread_time()
    for r in ranges.read(rng, stats, before):
      batch.append(r)
      if len(batch) == builder.BATCH:
        columns = self._columns(builder.clean_batch(batch, self._config, stats))
        beam_shuffle.count_cpu("read", t0)
        yield columns
        t0 = time.thread_time()
        batch = []
    if batch:
      yield self._columns(builder.clean_batch(batch, self._config, stats))
    beam_shuffle.count_cpu("read", t0)
    _commit(stats)


def _shard_tasks(finals: list, buckets: beam_rounds.Buckets):
  """(split, shard, shards, [final items of the buckets that may hold its keys]) for every shard of every split."""
  by_bucket = {f[0]: f for f in finals}
  for split in writer.SPLITS:
    mine = [f for f in finals if buckets.split_of(f[0]) == split]
    count, size = sum(f[3] for f in mine), sum(f[4] for f in mine)
    if not count:
      continue
    shards = writer.num_shards(count, size)
    for shard in range(shards):
      parts = [by_bucket[b] for b in buckets.covering(split, shard, shards) if b in by_bucket]
      yield split, shard, shards, parts


def _shard_examples(parts, shard: int, shards: int):
  """The shard's kept examples in hash-key order: the covering buckets are consecutive hash ranges and each store
  is in hash-key order, so a shard is a slice of each; one store is held at a time."""
  for _, store, mask, _, _ in sorted(parts, key=lambda f: f[0]):
    hkeys, payload = beam_shuffle.read_store(store, "hkeys", "payload")
    rows = range(len(hkeys)) if mask is None else np.flatnonzero(
        np.unpackbits(np.frombuffer(mask, np.uint8), count=len(hkeys))).tolist()
    where = lambda i: writer.shard_of(hkeys[rows[i]], shards)  # non-decreasing in the hash key
    lo = bisect.bisect_left(range(len(rows)), shard, key=where)
    hi = bisect.bisect_right(range(len(rows)), shard, lo=lo, key=where)
    for i in rows[lo:hi]:
      yield hkeys[i], payload[i]
    del hkeys, payload


def _write_shard(task, root: str):
  t0 = time.thread_time()
  split, shard, shards, parts = task
  count, size = writer.write_shard(writer.shard_path(root, split, shard, shards),
                                   _shard_examples(parts, shard, shards), ordered=True)
  beam_shuffle.release_memory()
  beam_shuffle.count_cpu("write", t0)
  return split, shard, shards, count, size


def _write_infos(infos: list, root: str) -> None:
  (epath.Path(root) / _SHARD_INFOS).write_text(json.dumps(infos))


def _plan(inputs, split_bytes: int) -> tuple[list[ranges.Range], int]:
  files = formats.list_inputs(inputs)
  plan = [rng for f in files for rng in ranges.plan(f, split_bytes)]
  return plan, sum(f.stat().length for f in files)


def build_pipeline(p: beam.Pipeline, plan: Sequence[ranges.Range], total_bytes: int, root: str,
                   config: builder.BuildConfig, tokenizer_path: str | None = None) -> None:
  parts = max(1, math.ceil(total_bytes / PARTITION_INPUT_BYTES))
  buckets = beam_rounds.Buckets.for_input(parts, config.validation_fraction)
  store_dir = str(beam_shuffle.directory(root) / "stores")
  scatter = lambda pcoll, label, n, key_fn=None, compress=None: beam_shuffle.scatter(
      pcoll, label, root, n, key_fn, compress=key_fn is not None if compress is None else compress)
  csv_ranges = [r for r in plan if r.kind == "csv"]
  quotes = (p | "csv_ranges" >> beam.Create(csv_ranges or [None])
            | "count_quotes" >> beam.FlatMap(lambda r: [((r.path, r.index), ranges.count_quotes(r))] if r else []))
  records = (p | "ranges" >> beam.Create(list(plan)) | "spread" >> beam.Reshuffle()
             | "read" >> beam.ParDo(_ReadClean(config, buckets), quotes=beam.pvalue.AsDict(quotes)))

  ids = _round("ids", {"records": scatter(records, "ids/scatter", buckets.total, compress=True)}, beam_rounds.ids,
               ["store", "texts", "bands"], elements=["store"], config=config, store_dir=store_dir,
               tokenizer_path=tokenizer_path)
  final_inputs = {"store": ids["store"]}
  bands = ids["bands"]
  if config.dedup_exact:
    text = _round("text", {"texts": scatter(ids["texts"], "text/scatter", parts)}, beam_rounds.text,
                  ["drops", "bands"], near=config.dedup_near)
    final_inputs["drops"] = scatter(text["drops"], "final/scatter_drops", buckets.total)
    bands = text["bands"]
  if config.dedup_near:
    pairs = _round("bands", {"bands": scatter(bands, "bands/scatter", parts)}, beam_rounds.bands, ["pairs"],
                   threshold=config.near_threshold)["pairs"]
    repsigs = _round("reps", {"store": ids["store"], "pairs": scatter(pairs, "reps/scatter", buckets.total)},
                     beam_rounds.reps, ["repsigs"], stores=["store"])["repsigs"]
    final_inputs["repsigs"] = scatter(repsigs, "final/scatter_repsigs", buckets.total)
  final = _round("final", final_inputs, beam_rounds.final, ["final", "records"], stores=["store"],
                 elements=["final"], streams=["repsigs"], config=config, buckets=buckets)
  finals = final["final"]
  if config.join_threads:
    finals = _threads(final["records"], scatter, parts, buckets, store_dir, config, tokenizer_path)

  infos = (finals | "write/collect" >> beam.combiners.ToList()
           | "write/plan" >> beam.FlatMap(_shard_tasks, buckets=buckets) | "write/spread" >> beam.Reshuffle()
           | "write/shards" >> beam.Map(_write_shard, root=root))
  _ = (infos | "infos/collect" >> beam.combiners.ToList() | "infos/write" >> beam.Map(_write_infos, root=root))


def _threads(records, scatter, parts: int, buckets: beam_rounds.Buckets, store_dir: str,
             config: builder.BuildConfig, tokenizer_path: str | None):
  """The thread rounds over kept records; returns the final items of the documents' stores."""
  by_first = lambda item: dedup.stable_hash(item[0])
  by_id = lambda r: dedup.stable_hash(r["id"])
  split = records | "threads/split" >> beam.ParDo(_SplitForThreads()).with_outputs(
      "rooted", "chained", "ids", "requests", "roots")
  states = _round("threads/parents", {"ids": scatter(split["ids"], "threads/scatter_ids", parts, by_first),
                                      "requests": scatter(split["requests"], "threads/scatter_req", parts, by_first),
                                      "roots": scatter(split["roots"], "threads/scatter_roots", parts,
                                                       dedup.stable_hash)},
                  beam_rounds.parents, ["states", "asks"])
  for k in range(threads.LOG2_MAX_REPLY_DEPTH):
    states = _round(f"threads/jump{k}", {
        "states": scatter(states["states"], f"threads/jump{k}/scatter_states", parts, by_first),
        "asks": scatter(states["asks"], f"threads/jump{k}/scatter_asks", parts, by_first)},
        beam_rounds.jump, ["states", "asks"])
  rooted = _round("threads/attach", {
      "states": scatter(states["states"], "threads/attach/scatter_states", parts, by_first),
      "records": scatter(split["chained"], "threads/attach/scatter_records", parts, by_id)},
      beam_rounds.attach, ["rooted"])["rooted"]
  docs = _round("threads/join", {"rooted": scatter(rooted, "threads/scatter_rooted", parts, by_first),
                                 "rooted_v2": scatter(split["rooted"], "threads/scatter_rooted_v2", parts, by_first)},
                beam_rounds.join, ["examples"], validation_fraction=config.validation_fraction, buckets=buckets,
                tokenizer_path=tokenizer_path)["examples"]
  return _round("threads/store", {"examples": scatter(docs, "threads/scatter_docs", buckets.total, compress=True)},
                beam_rounds.store_docs, ["final"], elements=["final"], buckets=buckets,
                store_dir=store_dir)["final"]


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


def _counters(result, namespace: str) -> Stats:
  stats = Stats()
  for c in result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]:
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
  try:
    result = p.run()
    state = result.wait_until_finish()
  finally:
    beam_shuffle.remove(root)
  if state != beam.runners.runner.PipelineState.DONE:
    raise RuntimeError(f"the Beam build of {root} ended in state {state}")
  stats = _counters(result, NAMESPACE)
  stats.update({f"{CPU_PREFIX}{step}": us for step, us in _counters(result, beam_shuffle.CPU_NAMESPACE).items()})
  infos_path = epath.Path(root) / _SHARD_INFOS
  infos = []
  if infos_path.exists():
    infos = json.loads(infos_path.read_text())
    infos_path.unlink()
  lengths: dict[str, list[int]] = {}
  for split, shard, shards, count, _ in infos:
    lengths.setdefault(split, [0] * shards)[shard] = count
  writer.write_metadata(root, lengths)
  splits = {s: sum(lengths.get(s, [])) for s in writer.SPLITS}
  tokens = {s: stats.pop(f"tokens/{s}", 0) for s in writer.SPLITS} if tokenizer_path else {}
  return stats, splits, tokens
