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


# serialize writes the tf.train.Example wire format itself: filling a protobuf message field by field costs ~23 us a
# record in Python, ~40 s of a 2M-tweet build; this costs ~6 us. Example{features: 1} > Features{feature: 1, a map,
# its entries in key order as deterministic serialization writes them} > entry{key: 1, value: 2} > Feature
# {bytes_list: 1 | int64_list: 3} > {value: 1} (Int64List packed).
_INT64 = 1 << 63
_HEADS = 128  # text values shorter than this (in UTF-8 bytes) take a precomputed head


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


_LENGTHS = tuple(_varint(n) for n in range(1 << 14))


def _field(tag: bytes, payload: bytes) -> bytes:
  """A length-delimited field: tag, varint length, payload."""
  n = len(payload)
  return tag + (_LENGTHS[n] if n < len(_LENGTHS) else _varint(n)) + payload


def _text_entry(key_field: bytes, value: bytes) -> bytes:
  return _field(b"\x0a", key_field + _field(b"\x12", _field(b"\x0a", _field(b"\x0a", value))))


def _int_entry(key: str, key_field: bytes, value: int) -> bytes:
  if not -_INT64 <= value < _INT64:
    raise ValueError(f"feature {key!r}: {value} is out of the int64 range")
  return _field(b"\x0a", key_field + _field(b"\x12", _field(b"\x1a", _field(b"\x0a", _varint(value % (1 << 64))))))


@functools.cache
def _layout() -> tuple[tuple[str, bool, bytes, Any], ...]:
  """Per feature in key order: (key, is_text, its key field, heads by value length | entries of small ints)."""
  layout = []
  for key, is_text in sorted(_fields(), key=lambda f: f[0].encode("utf-8")):
    key_field = _field(b"\x0a", key.encode("utf-8"))
    if is_text:
      # the entry of an n-byte value is a head that depends only on n, then the value
      table = tuple(_text_entry(key_field, bytes(n))[:-n or None] for n in range(_HEADS))
    else:
      table = {x: _int_entry(key, key_field, x) for x in range(-1, 128)}
    layout.append((key, is_text, key_field, table))
  return tuple(layout)


def serialize(record: dict[str, Any]) -> bytes:
  """The tf.train.Example of a record, byte for byte what protobuf's deterministic serialization and TFDS's encoder
  (`tfds_serialize`, the reference of the tests) write, so every process and engine writes the same bytes."""
  parts = []
  for key, is_text, key_field, table in _layout():
    if is_text:
      value = record.get(key, "").encode("utf-8")
      parts.append(table[len(value)] + value if len(value) < _HEADS else _text_entry(key_field, value))
    else:
      x = record.get(key, 1) if key == "num_tweets" else record[key]
      entry = table.get(x)  # a hit means x == a small int, so int(x) is that int
      parts.append(_int_entry(key, key_field, int(x)) if entry is None else entry)
  return _field(b"\x0a", b"".join(parts))


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
