"""Dataset build (synthetic + fixtures), hash split, loader resume, process independence, global jax batches."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

from tweetjax.data import builder, normalize, pipeline, synthetic, writer
from tweetjax.data.tokenizer import Tokenizer

from tests.helpers import assert_batches_equal, next_batches

FIX = pathlib.Path(__file__).parent / "fixtures"
TOK = str(FIX / "tokenizer.model")
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp("ds") / "tweets"
  stats = builder.build([], out, builder.BuildConfig(validation_fraction=0.2), tokenizer_path=TOK,
                        generate=lambda raw: synthetic.generate(raw, num_tweets=1500, seed=3))
  return str(out), stats


def test_build_counts_add_up(dataset):
  path, stats = dataset
  on_disk = json.loads((pathlib.Path(path) / builder.STATS_FILE).read_text())
  assert on_disk == stats
  assert stats["read"] == (stats["kept"] + sum(stats["skipped"].values()) + sum(stats["dropped"].values())
                           + stats["thread_merged"])
  assert stats["skipped"] == synthetic.CORRUPT_COUNTS  # the deliberately broken records, exactly
  assert stats["dropped"]["retweet"] > 0 and stats["dropped"]["duplicate"] > 0
  assert stats["dropped"]["near_duplicate"] > 0
  assert set(stats["files"]) == {"v2", "jsonl", "v1", "archive", "csv"}
  assert stats["tokens"]["train"] > 10 * stats["splits"]["train"]
  assert stats["splits"]["train"] + stats["splits"]["validation"] == stats["kept"] > 1000


def test_examples_carry_metadata_and_split_by_hash(dataset):
  path, stats = dataset
  val = pipeline.load_examples(path, "validation")
  assert len(val) == stats["splits"]["validation"]
  for ex in val:
    assert builder.split_of(ex["id"], 0.2) == "validation"
    assert ex["toxicity"] in (-1, 0, 1) and ex["spam"] in (-1, 0, 1) and ex["misinformation"] in (-1, 0, 1)
    assert isinstance(ex["topic"], str) and isinstance(ex["audience"], str) and ex["text"]
  assert {ex["topic"] for ex in val} > {"", "sports", "tech"}
  assert any(ex["reply_to_id"] for ex in val) and all("&amp;" not in ex["text"] for ex in val)


def test_hash_split_golden():
  golden = {"1700000000000000001": "train", "1700000000000000004": "validation",
            "1600000000000000003": "validation", "9001": "validation", "h0123456789abcdef": "train", "1": "train",
            "2": "validation", "3": "train", "4": "validation", "5": "validation", "6": "train", "7": "validation"}
  assert {i: builder.split_of(i, 0.5) for i in golden} == golden
  assert 1900 < sum(builder.split_of(str(i), 0.02) == "validation" for i in range(100_000)) < 2100


def test_refuses_to_overwrite_and_is_atomic(dataset, tmp_path):
  path, _ = dataset
  with pytest.raises(builder.DatasetExistsError, match="--overwrite"):
    builder.build([str(FIX)], path)

  def crash(raw):
    raise RuntimeError("disk full")
  target = tmp_path / "new"
  with pytest.raises(RuntimeError):
    builder.build([], target, generate=crash)
  assert not target.exists() and list(tmp_path.iterdir()) == []
  stats = builder.build([str(FIX)], target, builder.BuildConfig(join_threads=True))
  assert stats["thread_merged"] == 2  # v2 reply -> its root, v1.1 reply chain -> its root
  stats2 = builder.build([str(FIX)], target, overwrite=True)
  assert stats2["thread_merged"] == 0 and builder.is_complete(target)
  joined = [e for e in pipeline.load_examples(str(target), "train") + pipeline.load_examples(str(target),
                                                                                              "validation")]
  assert len(joined) == stats2["kept"]


def test_threads_joined_in_time_order(tmp_path):
  builder.build([str(FIX)], tmp_path / "t", builder.BuildConfig(join_threads=True, validation_fraction=0.0))
  ex = {e["id"]: e for e in pipeline.load_examples(str(tmp_path / "t"), "train")}
  thread = ex["1700000000000000001"]
  assert thread["num_tweets"] == 2 and thread["toxicity"] == 1
  assert thread["text"] == "Loving the new stadium & the crowd! <url> @user <sep> @user totally agree, best crowd ever"


def test_loader_normalizes_only_where_the_build_did_not(tmp_path):
  texts = ["I &amp;lt;3 this", "  call +1 2 3 now  ", "@bob says hi", "plain text tweet"]  # first: not a fixed point
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
  path = str(tmp_path / "ds")
  stats = builder.build([str(tmp_path / "in.jsonl")], path, builder.BuildConfig(
      normalize=normalize.NormalizeConfig(mentions="keep"), validation_fraction=0.0, dedup_near=False))
  assert stats["normalize_version"] == normalize.VERSION and stats["kept"] == 4
  assert builder.stored_normalization(path) == normalize.NormalizeConfig(mentions="keep")
  stored = pipeline.TweetSource(path, "train").texts(range(4))
  assert sorted(stored) == ["@bob says hi", "I &lt;3 this", "call <phone> now", "plain text tweet"]
  tok = Tokenizer(TOK)

  def loaded(options):
    it = pipeline.iterate_packed_batches(path, tok, 64, 4, split="train", normalize_config=options)
    return it.renormalize, sorted(tok.decode(b["inputs"][r][b["segment_ids"][r] == s][1:])  # [1:]: BOS
                                  for b in it for r in range(4) for s in range(1, b["segment_ids"][r].max() + 1))

  assert loaded({"mentions": "keep"}) == (False, sorted(stored))  # the build's text, as the tokenizer saw it
  assert loaded(None) == (True, ["@user says hi", "I <3 this", "call <phone> now", "plain text tweet"])
  on_disk = json.loads((pathlib.Path(path) / builder.STATS_FILE).read_text())
  del on_disk["normalize_version"]  # a build from before the record: normalize again
  (pathlib.Path(path) / builder.STATS_FILE).write_text(json.dumps(on_disk))
  assert builder.stored_normalization(path) is None and loaded({"mentions": "keep"})[0]
  (pathlib.Path(path) / builder.STATS_FILE).write_text("{not json")
  with pytest.raises(ValueError, match="build_stats.json: cannot read the build's normalization options"):
    pipeline.iterate_packed_batches(path, tok, 64, 4, split="train")


def test_loader_resume_equals_uninterrupted(dataset):
  path, _ = dataset
  kw = dict(split="train", shuffle=True, shuffle_seed=7, num_epochs=None, pack_window=200)
  full = next_batches(pipeline.iterate_packed_batches(path, TOK, 64, 8, **kw), 12)
  it = pipeline.iterate_packed_batches(path, TOK, 64, 8, **kw)
  next_batches(it, 5)
  state = json.dumps(it.get_state())  # JSON-serializable
  resumed = pipeline.iterate_packed_batches(path, TOK, 64, 8, **kw)
  resumed.set_state(state)
  assert_batches_equal(full[5:], next_batches(resumed, 7))
  assert any((full[0]["inputs"] != b["inputs"]).any() for b in full[1:])
  other_seed = next(pipeline.iterate_packed_batches(path, TOK, 64, 8, **{**kw, "shuffle_seed": 8}))
  assert (other_seed["inputs"] != full[0]["inputs"]).any()


def test_global_batches_do_not_depend_on_process_count(dataset):
  path, _ = dataset
  kw = dict(split="train", shuffle=True, shuffle_seed=1, num_epochs=None, pack_window=300)
  one = next_batches(pipeline.iterate_packed_batches(path, TOK, 64, 8, **kw), 6)
  two = [next_batches(pipeline.iterate_packed_batches(path, TOK, 64, 8, process_index=p, process_count=2, **kw), 6)
         for p in range(2)]
  assert_batches_equal(one, [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*two)])


def test_finite_pass_pads_last_batch(dataset):
  path, stats = dataset
  batches = list(pipeline.iterate_packed_batches(path, TOK, 128, 4, split="validation"))
  real = sum(int(b["weights"].sum()) for b in batches)
  assert real == stats["tokens"]["validation"] - stats["splits"]["validation"]  # one BOS/EOS pair -> one pair less
  assert all(b["inputs"].shape == (4, 128) for b in batches)


def test_make_iterator_global_sharded_arrays(dataset):
  path, _ = dataset
  mesh = jax.make_mesh((4, 2, 1, 1), ("data", "fsdp", "expert", "tensor"))
  config = ml_collections.ConfigDict({"data": {
      "source": "tweets", "dataset_dir": path, "tokenizer_path": TOK, "seq_len": 64, "global_batch_size": 16,
      "shuffle_seed": 3, "pack_window": 4096, "num_epochs": 0, "normalize": {"urls": "token"}}})
  it = pipeline.make_iterator(config, mesh)
  batch = next(it)
  want = next(pipeline.iterate_packed_batches(path, TOK, 64, 16, split="train", shuffle=True, shuffle_seed=3,
                                              num_epochs=None))
  for k, v in batch.items():
    assert isinstance(v, jax.Array) and v.shape == (16, 64)
    assert v.sharding.spec[0] == ("data", "fsdp", "expert")
    np.testing.assert_array_equal(np.asarray(v), want[k])
  assert batch["weights"].dtype == np.float32 and batch["inputs"].dtype == np.int32
  assert it.get_state() == {"window": 0, "row": 16}


@pytest.mark.slow
def test_cli_synthetic_build_then_refuse(tmp_path):
  out = tmp_path / "ds"
  cmd = [sys.executable, str(REPO / "tools" / "build_dataset.py"), "--synthetic", "--num_tweets=300",
         f"--output={out}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "skipped: malformed_json" in first.stdout and (out / "raw" / "v1" / "statuses.json").exists()
  second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert second.returncode == 1 and "--overwrite" in second.stderr


def test_direct_serialization_equals_tfds_encoder(dataset):
  path, _ = dataset
  examples = pipeline.load_examples(path, "validation")[:200]
  examples += [{**examples[0], "text": "", "topic": "", "num_tweets": 3, "toxicity": -1}]
  long_text = "é🙂 tweet " * 20  # past the precomputed heads (128 bytes), and multi-byte characters
  examples += [{**examples[0], "text": long_text, "topic": "x" * 127, "audience": "y" * 128},
               {**examples[0], "text": "z" * 20_000, "is_retweet": True, "spam": 127, "misinformation": 128,
                "toxicity": -2},
               {k: v for k, v in examples[0].items() if k != "num_tweets"}]
  for ex in examples:
    assert writer.serialize(ex) == writer.tfds_serialize(ex)


def _protobuf_serialize(record):
  example = tf_example_pb2.Example()
  for key, is_text in writer._fields():
    value = example.features.feature[key]
    if is_text:
      value.bytes_list.value.append(record.get(key, "").encode("utf-8"))
    else:
      value.int64_list.value.append(int(record.get(key, 1)))
  return example.SerializeToString(deterministic=True)


def test_direct_serialization_covers_int64_and_rejects_beyond():
  base = {"id": "1", "text": "t", "is_retweet": 0}
  for x in (-(1 << 63), -129, -1, 0, 1, 300, (1 << 63) - 1):
    record = {**base, "toxicity": x, "spam": x, "misinformation": "7" if x else 0.0}
    assert writer.serialize(record) == _protobuf_serialize(record), x
  with pytest.raises(ValueError, match="'spam'.*int64"):
    writer.serialize({**base, "toxicity": 0, "spam": 1 << 63, "misinformation": 0})
