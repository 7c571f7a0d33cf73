"""The file shuffle of the Beam build: a partition reads exactly what was emitted for it, never a retried bundle's
orphan files; the shuffle directory goes away; the write finds every record's shard among the buckets it reads."""

import collections
import random

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from tweetjax import paths  # noqa: E402
from tweetjax.data import beam_rounds, beam_shuffle, writer  # noqa: E402


def _bundle(scatter, chunks):
  """Runs one bundle of a Scatter DoFn the way a runner does; returns the emitted (partition, ref) elements."""
  scatter.start_bundle()
  out = [e for chunk in chunks for e in scatter.process(chunk)]
  return out + [wv.value for wv in scatter.finish_bundle()]


def _items(n, seed):
  rng = np.random.default_rng(seed)
  keys = rng.integers(0, 2**63, n, dtype=np.uint64)
  return keys, rng.integers(0, 2**32, (n, 4), dtype=np.uint32)


def test_partitions_read_what_was_emitted_and_never_orphans(tmp_path, monkeypatch):
  monkeypatch.setattr(beam_shuffle, "RUN_BYTES", 20_000)  # several run files per bundle
  monkeypatch.setattr(beam_shuffle, "PACK_BYTES", 4_000)
  round_dir = str(beam_shuffle.directory(str(tmp_path)) / "r")
  parts = 5
  keys, rows = _items(3000, 0)
  chunks = [(keys[i:i + 500], rows[i:i + 500]) for i in range(0, 3000, 500)]
  emitted = _bundle(beam_shuffle.Scatter("r", round_dir, parts, None, compress=False), chunks)
  # a failed attempt of the same bundle with other data: its files are written but its references are lost
  _bundle(beam_shuffle.Scatter("r", round_dir, parts, None, compress=False), [_items(700, 1)])
  # a list channel (records), keyed by a function, compressed as it would be on a remote file system
  records = [{"id": str(i), "text": f"tweet {i}"} for i in range(900)]
  with monkeypatch.context() as remote:
    remote.setattr(paths, "is_url", lambda path: True)
    emitted_records = _bundle(beam_shuffle.Scatter("r", round_dir, parts, lambda r: int(r["id"]) * 7,
                                                   compress=True), [records[:450], records[450:]])
  blob_kinds = lambda emitted: {blob[:1] for _, ref in emitted for blob in beam_shuffle._frames(
      beam_shuffle._read_span(*ref))}
  assert blob_kinds(emitted_records) == {b"z"} and blob_kinds(emitted) == {b"p"}
  runs = {str(p) for p in tmp_path.glob("**/*.run")}
  referenced = {ref[0] for _, ref in emitted + emitted_records}
  assert len({ref[0] for _, ref in emitted}) > 1 and referenced < runs  # several runs; the failed one's are orphans

  refs, record_refs = collections.defaultdict(list), collections.defaultdict(list)
  for p, ref in emitted:
    refs[p].append(ref)
  for p, ref in emitted_records:
    record_refs[p].append(ref)
  for p in range(parts):
    got_keys, got_rows = beam_shuffle.read(refs[p])
    mine = keys % np.uint64(parts) == p
    order, expected = np.argsort(got_keys), np.argsort(keys[mine])
    assert np.array_equal(got_keys[order], keys[mine][expected])  # all of them, only them: no orphan item
    assert np.array_equal(got_rows[order], rows[mine][expected])
    got = beam_shuffle.read(record_refs[p])
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in records if int(r["id"]) * 7 % parts == p)

  path, offset, length = emitted[0][1]
  with pytest.raises(IOError, match="truncated shuffle file"):
    beam_shuffle.read([(path, offset, length + 10**9)])
  beam_shuffle.remove(str(tmp_path))
  assert list(tmp_path.iterdir()) == []


def _weight(chunk) -> int:
  return int(beam_shuffle._row_bytes(chunk).sum())


def test_buffers_count_the_objects_of_object_columns():
  keys = np.arange(1000, dtype=np.uint64)
  records = beam_shuffle.objects([{"id": str(i), "text": "x" * 300} for i in range(1000)])
  assert _weight((keys, records)) == keys.nbytes + 1000 * beam_shuffle.OBJECT_BYTES  # not 8 B a pointer
  texts = beam_shuffle.objects(["é" * (i % 50) for i in range(1000)])  # characters, not UTF-8 bytes: a lower bound
  hkeys = beam_shuffle.objects([2**127 + i for i in range(1000)])
  small = beam_shuffle.SMALL_OBJECT_BYTES
  assert _weight((keys, texts, hkeys)) == (keys.nbytes + sum(i % 50 for i in range(1000))
                                                        + 2000 * small)
  assert _weight([b"ab", b"cde"]) == 5 + 2 * small
  assert _weight(["ab", None]) == 2 * beam_shuffle.OBJECT_BYTES  # mixed: the record estimate


@pytest.mark.parametrize("remote", [False, True])
def test_stores_read_back_by_name(tmp_path, monkeypatch, remote):
  monkeypatch.setattr(paths, "is_url", lambda path: remote)
  sigs = np.arange(12, dtype=np.uint32).reshape(3, 4)
  ref = beam_shuffle.write_store(str(tmp_path), "000001", {"hkeys": [2**127, 5, 2**64], "sigs": sigs},
                                 compress=("hkeys",))
  hkeys, got = beam_shuffle.read_store(ref, "hkeys", "sigs")
  assert hkeys == [2**127, 5, 2**64] and np.array_equal(got, sigs)
  path, index = ref
  kinds = {name: beam_shuffle._read_span(path, offset, 1) for name, (offset, _) in index.items()}
  assert kinds == {"hkeys": b"z" if remote else b"p", "sigs": b"p"}  # zstd only where bytes cross a network


def test_buckets_cover_every_shard():
  rng = random.Random(0)
  for train, shards in ((1, 1), (7, 3), (33, 12), (64, 5), (3, 7)):
    buckets = beam_rounds.Buckets((train, 2))
    for split in writer.SPLITS:
      n = buckets.counts[writer.SPLITS.index(split)]
      edges = [s * 2**128 // shards + d for s in range(1, shards) for d in (-1, 0, 1)]
      edges += [b * 2**128 // n + d for b in range(1, n) for d in (-1, 0, 1)]
      for h in [rng.getrandbits(128) for _ in range(2000)] + edges + [0, 2**128 - 1]:
        b = buckets.of(split, h)
        assert buckets.split_of(b) == split
        assert b in buckets.covering(split, writer.shard_of(h, shards), shards)


def test_streamed_shard_refuses_examples_out_of_order(tmp_path):
  path = writer.shard_path(tmp_path, "train", 0, 1)
  with pytest.raises(ValueError, match="out of hash-key order"):
    writer.write_shard(path, iter([(5, b"a"), (3, b"b")]), ordered=True)
  assert not path.exists()
  assert writer.write_shard(path, iter([(3, b"b"), (5, b"aa")]), ordered=True) == (2, 3) and path.exists()
