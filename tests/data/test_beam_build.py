"""The Beam engine (2 worker processes) keeps exactly the local engine's records, splits and counts."""

import collections
import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("apache_beam")

from tweetjax.data import builder, formats, pipeline, ranges, synthetic, threads, writer  # noqa: E402
from tweetjax.data import beam_build, beam_rounds, beam_shuffle  # noqa: E402

FIX = pathlib.Path(__file__).parent / "fixtures"
TOK = str(FIX / "tokenizer.model")
REPO = pathlib.Path(__file__).resolve().parents[2]
TWO_WORKERS = "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"
SPLIT_BYTES = 3000  # small ranges: the JSONL/CSV exports are read in many pieces
PARTITION_INPUT_BYTES = 400_000  # ~5 partitions per keyed round: duplicates, LSH pairs and threads cross them


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  d = tmp_path_factory.mktemp("raw")
  synthetic.generate(d / "synthetic", num_tweets=1500, seed=3)
  with open(d / "quoted.csv", "w", newline="") as f:  # rows with line breaks inside quotes, CRLF, blank lines
    w = csv.writer(f, lineterminator="\r\n")
    w.writerow(["id", "text", "lang", "created_at"])
    for i in range(300):
      text = f'thread "{i}" part one\nand two, with a comma\r\nthree' if i % 3 == 0 else f"plain row {i} here"
      w.writerow([str(9_000_000 + i), text, "en", f"2023-03-0{1 + i % 5}T00:00:00Z"])
      if i % 40 == 0:
        f.write("\r\n")
  return [str(d), str(FIX)]


def _both(raw, tmp_path_factory, config):
  out = tmp_path_factory.mktemp("engines")
  local = builder.build(raw, out / "local", config, tokenizer_path=TOK)
  with pytest.MonkeyPatch.context() as mp:  # the partition counts are fixed in the driver, when the pipeline is built
    mp.setattr(beam_build, "PARTITION_INPUT_BYTES", PARTITION_INPUT_BYTES)
    beam = builder.build(raw, out / "beam", config, tokenizer_path=TOK, engine="beam", beam_options=TWO_WORKERS,
                         split_bytes=SPLIT_BYTES)
  return out, local, beam


@pytest.fixture(scope="module")
def flat(raw, tmp_path_factory):
  return _both(raw, tmp_path_factory, builder.BuildConfig(validation_fraction=0.2))


@pytest.fixture(scope="module")
def joined(raw, tmp_path_factory):
  return _both(raw, tmp_path_factory, builder.BuildConfig(validation_fraction=0.2, join_threads=True))


def _same_build(out, local, beam):
  assert local.pop("engine") == "local" and beam.pop("engine") == "beam"
  assert beam.pop("cpu_seconds")["ids"] > 0  # the profile of the Beam build's steps
  assert not list(out.glob("**/" + beam_shuffle.DIRECTORY))  # the shuffle files are gone
  del local["seconds"], beam["seconds"]
  assert beam == local  # every count: read, skipped and dropped per reason, per split, per format, tokens
  local_shards = writer.shard_digests(out / "local")
  assert writer.shard_digests(out / "beam") == local_shards and local_shards  # byte-identical shards
  for split in builder.split_names(out / "local"):
    examples = pipeline.load_examples(str(out / "beam"), split)  # read back through tfds + array_record
    assert len(examples) == local["splits"][split]
    assert all(builder.split_of(e["id"], 0.2) == split for e in examples)
  assert json.loads((out / "beam" / builder.STATS_FILE).read_text())["engine"] == "beam"


def test_engines_keep_the_same_records(flat):
  out, local, beam = flat
  _same_build(out, local, beam)
  assert local["skipped"] == synthetic.CORRUPT_COUNTS  # the deliberately broken records, exactly
  assert min(local["dropped"][k] for k in ("retweet", "duplicate", "near_duplicate")) > 0
  assert set(local["files"]) == {"v2", "jsonl", "v1", "archive", "csv"}


def test_engines_join_the_same_threads(joined):
  out, local, beam = joined
  _same_build(out, local, beam)
  assert local["thread_merged"] > 100  # synthetic conversations (v2 ids and v1.1 reply chains) + the fixtures'


def test_keeper_is_the_oldest_copy():
  def rec(i, text, t):
    return {"id": i, "text": text, "author_id": "", "lang": "en", "created_at": t, "conversation_id": "",
            "reply_to_id": "", "is_retweet": False, "toxicity": -1, "spam": -1, "misinformation": -1, "topic": "",
            "audience": ""}
  a = "the same words posted again by a copy-paste account"
  b = "another tweet posted twice within the same second"
  recs = [rec("50", a, "2023-03-02T00:00:00Z"), rec("90", a, "2023-03-01T00:00:00Z"), rec("77", a, ""),
          rec("123", b, "2023-03-01T00:00:00Z"), rec("99", b, "2023-03-01T00:00:00Z")]
  for order in (recs, recs[::-1]):
    kept = builder.clean_records([dict(r) for r in order], builder.BuildConfig(), collections.Counter())
    assert sorted(r["id"] for r in kept) == ["90", "99"]  # the oldest; in the same second the smaller id


def test_ranges_read_exactly_what_whole_files_read(raw):
  for path in formats.list_inputs(raw):
    whole, parts = collections.Counter(), collections.Counter()
    expected = list(formats.read_file(path, whole))
    got, quotes = [], 0
    plan = ranges.plan(path, SPLIT_BYTES)
    for rng in plan:
      got += ranges.read(rng, parts, quotes)
      quotes += ranges.count_quotes(rng) if rng.kind == "csv" else 0
    assert (got, parts) == (expected, whole), path
    if path.name in ("quoted.csv", "stream.jsonl", "tweets.csv"):
      assert len(plan) > 3


def test_only_multi_line_json_files_are_split_as_jsonl(tmp_path):
  files = {"lines.jsonl": b'{"id": "1"}\n\n{"id": "2"}\n', "page.json": b'{"data": [{"id": "1"}]}\n',
           "pretty.json": b'{\n  "data": []\n}\n', "array.json": b'[{"id": "1"},\n {"id": "2"}]\n',
           "empty.json": b"\n\n"}
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  assert {n: ranges.kind_of(tmp_path / n) for n in files} == {
      "lines.jsonl": "jsonl", "page.json": "whole", "pretty.json": "whole", "array.json": "whole",
      "empty.json": "whole"}


def test_pointer_jumping_equals_the_chain_walk():
  # chains deeper than MAX_REPLY_DEPTH, a cycle, parents with and without conversation ids, missing parents
  depth = threads.MAX_REPLY_DEPTH + 5
  recs = [{"id": f"c{i}", "conversation_id": "", "reply_to_id": f"c{i - 1}" if i else ""} for i in range(depth)]
  recs += [{"id": "x", "conversation_id": "", "reply_to_id": "y"}, {"id": "y", "conversation_id": "", "reply_to_id": "x"}]
  recs += [{"id": "v2", "conversation_id": "root", "reply_to_id": ""},
           {"id": "a", "conversation_id": "", "reply_to_id": "v2"}, {"id": "b", "conversation_id": "", "reply_to_id": "a"},
           {"id": "orphan", "conversation_id": "", "reply_to_id": "gone"}]
  chained = [r for r in recs if not r["conversation_id"]]
  state = beam_rounds.parents(0, {"ids": [(r["id"], r["conversation_id"]) for r in recs],
                                  "requests": [(r["reply_to_id"], r["id"]) for r in chained if r["reply_to_id"]],
                                  "roots": [r["id"] for r in chained if not r["reply_to_id"]]}, None)
  for _ in range(threads.LOG2_MAX_REPLY_DEPTH):
    state = beam_rounds.jump(0, state, None)
  rooted = beam_rounds.attach(0, {"states": state["states"], "records": chained}, None)["rooted"]
  walk = dict(zip((r["id"] for r in recs), threads.conversation_roots(recs)))
  assert {r["id"]: root for root, r in rooted} == {r["id"]: walk[r["id"]] for r in chained}
  assert walk["b"] == "root" and walk["orphan"] == "orphan" and walk["c3"] == "c0"
  assert walk[f"c{depth - 1}"] == f"c{depth - 1 - threads.MAX_REPLY_DEPTH}"  # capped


def test_refuses_to_overwrite_and_a_failed_pipeline_leaves_nothing(flat, tmp_path):
  out, _, _ = flat
  with pytest.raises(builder.DatasetExistsError, match="--overwrite"):
    builder.build([str(FIX)], out / "beam", engine="beam", beam_options=TWO_WORKERS)
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "bad.csv").write_text("id,body\n1,no text column here\n")
  with pytest.raises(Exception, match="bad.csv: CSV without a 'text' column"):  # raised in a worker
    builder.build([str(FIX), str(tmp_path / "in")], tmp_path / "ds", engine="beam", beam_options=TWO_WORKERS)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.slow
def test_killed_pipeline_leaves_no_dataset(tmp_path):
  out = tmp_path / "ds"
  cmd = [sys.executable, str(REPO / "tools" / "build_dataset.py"), "--synthetic", "--num_tweets=4000",
         f"--output={out}", "--engine=beam", f"--beam_options={TWO_WORKERS}", "--split_bytes=20000"]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  deadline = time.time() + 120
  while time.time() < deadline and not list(tmp_path.glob(".ds.tmp-*/raw/corrupt")):
    time.sleep(0.05)
  time.sleep(2.0)  # the exports are written; the pipeline is running
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not out.exists() and not builder.is_complete(out)
  stale = list(tmp_path.glob(".ds.tmp-*"))
  assert stale and not any((p / builder.STATS_FILE).exists() for p in stale)
  builder.build([str(FIX)], out)  # the next build of the same output removes the dead build's temp directory
  assert builder.is_complete(out) and not list(tmp_path.glob(".ds.tmp-*"))


@pytest.mark.parametrize("join_threads", [False, True])
def test_ids_round_keeps_the_local_engines_record_per_id(tmp_path, join_threads):
  def rec(i, text, t, author):
    return {"id": i, "text": text, "author_id": author, "lang": "en", "created_at": t, "conversation_id": "",
            "reply_to_id": "", "is_retweet": False, "toxicity": -1, "spam": -1, "misinformation": -1, "topic": "",
            "audience": ""}
  recs = [rec("7", "one text", "2023-03-01T00:00:00Z", "b"), rec("7", "one text", "2023-03-01T00:00:00Z", "a"),
          rec("7", "one text", "2023-03-02T00:00:00Z", ""), rec("8", "zzz later text", "", "x"),
          rec("8", "aaa later text", "", "y"), rec("9", "alone", "2023-03-01T00:00:00Z", "")]
  config = builder.BuildConfig(join_threads=join_threads)
  stats = collections.Counter()
  want = builder.dedup_ids([dict(r) for r in recs], stats)
  # rank ties broken by text, then (same text) by the serialized example: author "a" wins over "b"
  assert sorted((r["id"], r["author_id"]) for r in want) == [("7", "a"), ("8", "y"), ("9", "")]
  buckets = beam_rounds.Buckets.for_input(1, config.validation_fraction)
  for order in (recs, recs[::-1]):
    cols = beam_build._ReadClean(config, buckets)._columns([dict(r) for r in order])
    beam_stats = collections.Counter()
    out = beam_rounds.ids(0, {"records": cols}, beam_stats, config=config, store_dir=str(tmp_path),
                          tokenizer_path=None)
    (payload,) = beam_shuffle.read_store(out["store"][0][1], "payload")  # in hash-key order
    by_hkey = sorted(want, key=lambda r: writer.hkey(builder.split_of(r["id"], config.validation_fraction),
                                                     r["id"]))
    assert payload == (by_hkey if join_threads else [writer.serialize(r) for r in by_hkey])
    assert beam_stats["duplicate_id"] == stats["duplicate_id"] == 3
