"""The TFDS array_record layout both build engines write, record for record and byte for byte the same.

A split's records are ordered by the 128-bit TFDS hash of their id salted with the split name (what TFDS writers do),
and cut into `num_shards(count, bytes)` shards by ranges of that hash (`shard_of`), so a shard can be written by any
worker that holds its records, and concatenating the shards gives the hash order whatever wrote them. The
metadata (`dataset_info.json`, `features.json`) is TFDS's own, so `tfds.builder_from_directory(...)
.as_data_source()` reads the result and needs no TensorFlow.
"""

import functools
import hashlib
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_info, example_serializer, file_adapters, hashing, naming
from tensorflow_datasets.core import shuffle, splits as splits_lib
from tensorflow_datasets.proto import tf_example_pb2

NAME = "tweetjax_tweets"
VERSION = "1.0.0"
SPLITS = ("train", "validation")
SHARD_BYTES = 64 << 20  # at most this much serialized data per shard: a shard is held by one worker to sort it
MIN_SHARD_RECORDS = 1000  # so that no hash range (shard) comes out empty
DESCRIPTION = "Normalized, filtered, deduplicated tweets (tweetjax)."
_FORMAT = file_adapters.FileFormat.ARRAY_RECORD


def features() -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "id": text(), "text": text(), "author_id": text(), "lang": text(), "created_at": text(),
      "conversation_id": text(), "reply_to_id": text(),
      "is_retweet": tfds.features.Scalar(np.int32), "num_tweets": tfds.features.Scalar(np.int32),
      "toxicity": tfds.features.Scalar(np.int32), "spam": tfds.features.Scalar(np.int32),
      "misinformation": tfds.features.Scalar(np.int32), "topic": text(), "audience": text(),
  })


_INT_FIELDS = ("is_retweet", "num_tweets", "toxicity", "spam", "misinformation")


@functools.cache
def _fields() -> tuple[tuple[str, bool], ...]:
  return tuple((k, isinstance(f, tfds.features.Text)) for k, f in features().items())


def tfds_serialize(record: dict[str, Any]) -> bytes:
  """`serialize` through TFDS's generic feature encoder (10x slower; the reference the tests compare with)."""
  feats = features()
  ex = {k: record.get(k, "") for k in feats.keys()}
  ex["is_retweet"] = int(record["is_retweet"])
  ex["num_tweets"] = int(record.get("num_tweets", 1))
  serializer = example_serializer.ExampleSerializer(feats.get_serialized_info())
  return serializer.get_tf_example(feats.encode_example(ex)).SerializeToString(deterministic=True)


def serialize(record: dict[str, Any]) -> bytes:
  """The tf.train.Example of a record, built directly (TFDS's generic encoder costs ~0.3 ms a record).

  Serialized deterministically (map fields in key order), so every process writes the same bytes.
  """
  example = tf_example_pb2.Example()
  feature = example.features.feature
  for key, is_text in _fields():
    if is_text:
      feature[key].bytes_list.value.append(record.get(key, "").encode("utf-8"))
    elif key == "num_tweets":
      feature[key].int64_list.value.append(int(record.get(key, 1)))
    else:
      feature[key].int64_list.value.append(int(record[key]))
  return example.SerializeToString(deterministic=True)


@functools.cache
def _hasher(split: str) -> hashing.Hasher:
  return hashing.Hasher(split)


def hkey(split: str, tweet_id: str) -> int:
  return _hasher(split).hash_key(tweet_id)


def num_shards(count: int, num_bytes: int) -> int:
  return max(1, min(math.ceil(num_bytes / SHARD_BYTES), count // MIN_SHARD_RECORDS))


def shard_of(key: int, shards: int) -> int:
  return shuffle.get_bucket_number(hkey=key, num_buckets=shards)


def data_dir(root: str | os.PathLike) -> epath.Path:
  return epath.Path(root) / NAME / VERSION


def shard_digests(root: str | os.PathLike) -> dict[str, str]:
  """sha256 of every shard file of the dataset at `root`, by file name: two builds wrote the same bytes iff equal."""
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data_dir(root).glob("*.array_record-*"))}


def _template(root: str | os.PathLike, split: str) -> naming.ShardedFileTemplate:
  return naming.ShardedFileTemplate(data_dir=data_dir(root), dataset_name=NAME, split=split,
                                    filetype_suffix=_FORMAT.file_suffix)


def shard_path(root: str | os.PathLike, split: str, shard: int, shards: int) -> epath.Path:
  return _template(root, split).sharded_filepath(shard_index=shard, num_shards=shards)


def write_shard(path: epath.Path, examples: Iterable[tuple[int, bytes]], ordered: bool = False) -> tuple[int, int]:
  """Writes (hkey, serialized) pairs in hkey order; returns (records, bytes). Goes to a temp name first.

  `ordered`: the pairs come in hkey order already and are written as they come, never held all at once.
  """
  if not ordered:
    examples = sorted(examples, key=lambda e: e[0])
  totals = [0, 0, -1]  # records, bytes, last hkey

  def checked():
    for e in examples:
      if e[0] < totals[2]:
        raise ValueError(f"{path}: examples out of hash-key order ({e[0]} after {totals[2]})")
      totals[:] = totals[0] + 1, totals[1] + len(e[1]), e[0]
      yield e

  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.incomplete"
  file_adapters.ADAPTER_FOR_FORMAT[_FORMAT].write_examples(tmp, checked())
  tmp.rename(path)
  return totals[0], totals[1]


def write_split(root: str | os.PathLike, split: str, examples: Sequence[tuple[int, bytes]]) -> list[int]:
  """All shards of one split from its (hkey, serialized) pairs (the local engine); returns the shard lengths."""
  shards = num_shards(len(examples), sum(len(s) for _, s in examples))
  groups: list[list[tuple[int, bytes]]] = [[] for _ in range(shards)]
  for e in examples:
    groups[shard_of(e[0], shards)].append(e)
  return [write_shard(shard_path(root, split, i, shards), g)[0] for i, g in enumerate(groups)]


def write_metadata(root: str | os.PathLike, shard_lengths: dict[str, list[int]]) -> None:
  """dataset_info.json + features.json for the non-empty splits (`shard_lengths`: split -> records per shard)."""
  d = data_dir(root)
  d.mkdir(parents=True, exist_ok=True)
  identity = dataset_info.DatasetIdentity(name=NAME, version=tfds.core.Version(VERSION), data_dir=os.fspath(d),
                                          module_name="")
  info = dataset_info.DatasetInfo(builder=identity, features=features(), description=DESCRIPTION)
  info.set_file_format(_FORMAT)
  split_infos = []
  for split, lengths in sorted(shard_lengths.items()):
    if sum(lengths):
      size = sum(p.stat().length for p in _template(root, split).sharded_filepaths(len(lengths)))
      split_infos.append(splits_lib.SplitInfo(name=split, shard_lengths=list(lengths), num_bytes=size,
                                              filename_template=_template(root, split)))
  info.set_splits(splits_lib.SplitDict(split_infos))
  info.write_to_directory(d)
