"""Builds the tweet dataset: read exports -> normalize -> filter -> dedup -> threads -> TFDS array_record splits.

Layout of a built dataset directory (`config.data.dataset_dir`):
  <dir>/tweetjax_tweets/1.0.0/   TFDS files (`*.array_record-*`, dataset_info.json, features.json)
  <dir>/build_stats.json         counts (read, kept, dropped by reason, per split, per format) and the options
                                 (`normalize_version` + `config.normalize`: how the stored text is normalized);
                                 written last, so its presence marks a complete dataset
  <dir>/raw/                     the generated exports, for `--synthetic` builds only
Reading needs no TensorFlow: `tfds.builder_from_directory(...).as_data_source()` (see `open_split`).

The train/validation split is by a SHA-256 hash of the tweet id (thread root id for joined threads), so it is
stable across runs, machines and Python versions and a thread never straddles splits.
"""

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils
from etils import epath

from tweetjax.data import dedup, formats, threads
from tweetjax.data import normalize as normalize_lib

NAME = "tweetjax_tweets"
VERSION = "1.0.0"
STATS_FILE = "build_stats.json"
FILTER_REASONS = ("retweet", "lang", "too_short", "too_long", "duplicate_id", "duplicate", "near_duplicate")
_BATCH = 2048


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """Filtering options of a build (flags of tools/build_dataset.py)."""
  normalize: normalize_lib.NormalizeConfig = normalize_lib.NormalizeConfig()
  keep_retweets: bool = False
  dedup_exact: bool = True
  dedup_near: bool = True
  near_threshold: float = 0.7  # estimated Jaccard of 5-char shingles at which a tweet is a near-duplicate
  langs: tuple[str, ...] = ()  # keep only these `lang` codes; empty keeps all ("und"/"" included)
  min_chars: int = 2  # after normalization
  max_chars: int = 10_000
  join_threads: bool = False
  validation_fraction: float = 0.02


def split_of(tweet_id: str, validation_fraction: float) -> str:
  h = int.from_bytes(hashlib.sha256(b"tweetjax/split/" + tweet_id.encode("utf-8")).digest()[:8], "big")
  return "validation" if h < validation_fraction * 2.0**64 else "train"


def clean_records(records: Iterable[formats.Record], config: BuildConfig, stats: collections.Counter,
                  progress: Callable[[collections.Counter], None] | None = None) -> list[formats.Record]:
  """Normalizes and filters a record stream; drop counts go into `stats` under FILTER_REASONS."""
  exact = dedup.ExactDuplicateFilter() if config.dedup_exact else None
  near = dedup.NearDuplicateFilter(config.near_threshold) if config.dedup_near else None
  seen_ids: set[str] = set()
  langs = set(config.langs)
  kept: list[formats.Record] = []

  def flush(batch):
    texts = normalize_lib.normalize_batch([r["text"] for r in batch], config.normalize)
    survivors = []
    for r, t in zip(batch, texts):
      r["text"] = t
      if r["is_retweet"] and not config.keep_retweets:
        reason = "retweet"
      elif langs and r["lang"] not in langs:
        reason = "lang"
      elif len(t) < config.min_chars:
        reason = "too_short"
      elif len(t) > config.max_chars:
        reason = "too_long"
      elif r["id"] in seen_ids:
        reason = "duplicate_id"
      else:
        seen_ids.add(r["id"])
        survivors.append(r)
        continue
      stats[reason] += 1
    for name, filt in (("duplicate", exact), ("near_duplicate", near)):
      if filt is not None and survivors:
        keep = filt.keep([r["text"] for r in survivors])
        stats[name] += int((~keep).sum())
        survivors = [r for r, k in zip(survivors, keep) if k]
    kept.extend(survivors)
    if progress:
      progress(stats)

  batch = []
  for r in records:
    batch.append(r)
    if len(batch) == _BATCH:
      flush(batch)
      batch = []
  flush(batch)
  return kept


def _features() -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "id": text(), "text": text(), "author_id": text(), "lang": text(), "created_at": text(),
      "conversation_id": text(), "reply_to_id": text(),
      "is_retweet": tfds.features.Scalar(np.int32), "num_tweets": tfds.features.Scalar(np.int32),
      "toxicity": tfds.features.Scalar(np.int32), "spam": tfds.features.Scalar(np.int32),
      "misinformation": tfds.features.Scalar(np.int32), "topic": text(), "audience": text(),
  })


class TweetsBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS builder over records already cleaned in memory (`records_by_split`)."""
  name = NAME
  VERSION = tfds.core.Version(VERSION)

  # tfds locates checksum files from the builder's source path through `importlib_resources`, a package it does
  # not install; this builder downloads nothing, so it has no source path to report.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, records_by_split: dict[str, list[formats.Record]] | None = None, **kwargs):
    self._records_by_split = records_by_split or {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=_features(),
                                 description="Normalized, filtered, deduplicated tweets (tweetjax).")

  def _split_generators(self, dl_manager):
    del dl_manager
    # tfds refuses empty splits; an absent split reads as empty (see `split_names`)
    return {s: self._generate_examples(recs) for s, recs in self._records_by_split.items() if recs}

  def _generate_examples(self, records):
    keys = _features().keys()
    for r in records:
      ex = {k: r.get(k, "") for k in keys}
      ex["is_retweet"] = int(r["is_retweet"])
      ex["num_tweets"] = int(r.get("num_tweets", 1))
      yield r["id"], ex


class DatasetExistsError(FileExistsError):
  pass


def is_complete(dataset_dir: str | os.PathLike) -> bool:
  return (epath.Path(dataset_dir) / STATS_FILE).exists()


def open_split(dataset_dir: str | os.PathLike, split: str):
  """The random-access array_record data source of one split (records are dicts of bytes/ints)."""
  d = epath.Path(dataset_dir)
  if not is_complete(d):
    raise FileNotFoundError(f"no complete tweet dataset at {d} (missing {STATS_FILE}); build it with "
                            "tools/build_dataset.py")
  builder = tfds.builder_from_directory(str(d / NAME / VERSION))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} is empty or absent in {d} (splits: {sorted(builder.info.splits)})")
  return builder.as_data_source(split=split)


def split_names(dataset_dir: str | os.PathLike) -> list[str]:
  """The non-empty splits of a built dataset."""
  return sorted(tfds.builder_from_directory(str(epath.Path(dataset_dir) / NAME / VERSION)).info.splits)


def build(inputs: Sequence[str] | str, output_dir: str | os.PathLike, config: BuildConfig = BuildConfig(), *,
          overwrite: bool = False, tokenizer_path: str | None = None,
          generate: Callable[[epath.Path], Any] | None = None,
          progress: Callable[[collections.Counter], None] | None = None) -> dict[str, Any]:
  """Builds a dataset into `output_dir` atomically and returns the stats that are written next to it.

  `generate(raw_dir)` (the `--synthetic` path) writes exports into `<output_dir>/raw` first; `inputs` then
  defaults to that directory. The build goes to a sibling temp directory renamed into place at the end.
  """
  out = epath.Path(output_dir)
  if out.exists() and any(out.iterdir()) and not overwrite:
    what = "a complete dataset" if is_complete(out) else "files (not a complete dataset)"
    raise DatasetExistsError(f"{out} already holds {what}; pass --overwrite to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
  tmp.mkdir()
  try:
    if generate is not None:
      generate(tmp / "raw")
      inputs = inputs or [str(tmp / "raw")]
    stats = collections.Counter()
    t0 = time.time()
    records = clean_records(formats.read_inputs(inputs, stats), config, stats, progress)
    if config.join_threads:
      records, merged = threads.join_threads(records)
      stats["thread_merged"] += merged
    by_split = {"train": [], "validation": []}
    for r in records:
      r.setdefault("num_tweets", 1)
      by_split[split_of(r["id"], config.validation_fraction)].append(r)
    tfds.disable_progress_bar()
    TweetsBuilder(records_by_split=by_split, data_dir=str(tmp), file_format="array_record").download_and_prepare()
    shutil.rmtree(tmp / "downloads", ignore_errors=True)
    result = summarize(stats, by_split, config, time.time() - t0)
    if tokenizer_path:
      from tweetjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
      tok = tokenizer_lib.Tokenizer(tokenizer_path)
      for split, recs in by_split.items():
        result["tokens"][split] = int(sum(len(x) + 2 for x in tok.encode_batch([r["text"] for r in recs])))
    (tmp / STATS_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
    if out.exists():
      old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
      out.rename(old)
      tmp.rename(out)
      shutil.rmtree(old)
    else:
      tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return result


def summarize(stats: collections.Counter, by_split: dict[str, list], config: BuildConfig,
              seconds: float) -> dict[str, Any]:
  skipped = {k: stats.get(k, 0) for k in formats.SKIP_REASONS}
  dropped = {k: stats.get(k, 0) for k in FILTER_REASONS}
  return {
      "read": stats.get("read", 0),
      "kept": sum(len(v) for v in by_split.values()),
      "splits": {k: len(v) for k, v in by_split.items()},
      "skipped": skipped,
      "dropped": dropped,
      "thread_merged": stats.get("thread_merged", 0),
      "files": {k.split("/", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("files/")},
      "tokens": {},
      "seconds": round(seconds, 2),
      "config": {**dataclasses.asdict(config), "langs": list(config.langs)},
      "normalize_version": normalize_lib.VERSION,
  }


def stored_normalization(dataset_dir: str | os.PathLike) -> normalize_lib.NormalizeConfig | None:
  """The normalization the build applied to the stored text; None where this code may normalize differently (a build
  by another `normalize.VERSION`, or one that predates the record), so the loader must normalize again."""
  path = epath.Path(dataset_dir) / STATS_FILE
  try:
    stats = json.loads(path.read_text())
    if stats.get("normalize_version") != normalize_lib.VERSION:
      return None
    return normalize_lib.NormalizeConfig.from_dict(stats["config"]["normalize"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{path}: cannot read the build's normalization options (expected JSON with "
                     f"config.normalize = NormalizeConfig fields): {e!r}") from e


def format_table(result: dict[str, Any]) -> str:
  rows = [("read", result["read"]), ("kept", result["kept"])]
  rows += [(f"  {k}", v) for k, v in result["splits"].items()]
  rows += [(f"skipped: {k}", v) for k, v in result["skipped"].items()]
  rows += [(f"dropped: {k}", v) for k, v in result["dropped"].items()]
  rows += [("threads: tweets merged", result["thread_merged"])]
  rows += [(f"files: {k}", v) for k, v in result["files"].items()]
  rows += [(f"tokens: {k}", v) for k, v in result["tokens"].items()]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v:>10,}" for k, v in rows)
