"""Builds the tweet dataset: read exports -> normalize -> filter -> dedup -> threads -> TFDS array_record splits.

Two engines apply the same rules, written once as plain functions (formats/ranges, normalize, `clean_batch` here,
dedup, threads, writer), and keep exactly the same records in the same order, with the same counts:
  local  (default): this module, every record in one process's memory; fine up to a few million tweets.
  beam:  tweetjax/data/beam_build.py, an Apache Beam pipeline of keyed rounds, for any runner.
Steps, in order: per-record normalization and filters (retweet, lang, too_short, too_long); `duplicate_id` (one
record per id: the smallest `dedup.id_rank`); exact duplicates (one record per normalized text: the smallest
`dedup.rank`, i.e. the oldest (created_at, id)); near duplicates (`dedup` docstring); thread joining (`threads`).

Layout of a built dataset directory (`config.data.dataset_dir`):
  <dir>/tweetjax_tweets/1.0.0/   TFDS files (`*.array_record-*`, dataset_info.json, features.json), see writer.py
  <dir>/build_stats.json         counts (read, kept, dropped by reason, per split, per format) and the options
                                 (`normalize_version` + `config.normalize`: how the stored text is normalized);
                                 written last, so its presence marks a complete dataset
  <dir>/raw/                     the generated exports, for `--synthetic` builds only
Reading needs no TensorFlow: `tfds.builder_from_directory(...).as_data_source()` (see `open_split`).

The train/validation split is by a SHA-256 hash of the tweet id (thread root id for joined threads), so it is
stable across runs, machines and Python versions and a thread never straddles splits.
"""

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

from tweetjax.data import dedup, formats, threads, writer
from tweetjax.data import normalize as normalize_lib

NAME, VERSION = writer.NAME, writer.VERSION
STATS_FILE = "build_stats.json"
FILTER_REASONS = ("retweet", "lang", "too_short", "too_long", "duplicate_id", "duplicate", "near_duplicate")
ENGINES = ("local", "beam")
BATCH = 2048  # records normalized together (normalize_batch amortizes its regex passes over a batch)


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


def clean_batch(batch: list[formats.Record], config: BuildConfig, stats: collections.Counter) -> list[formats.Record]:
  """Normalizes a batch of records and applies the per-record filters; drops are counted in `stats`."""
  texts = normalize_lib.normalize_batch([r["text"] for r in batch], config.normalize)
  kept = []
  for r, t in zip(batch, texts):
    r["text"] = t
    if r["is_retweet"] and not config.keep_retweets:
      reason = "retweet"
    elif config.langs and r["lang"] not in config.langs:
      reason = "lang"
    elif len(t) < config.min_chars:
      reason = "too_short"
    elif len(t) > config.max_chars:
      reason = "too_long"
    else:
      kept.append(r)
      continue
    stats[reason] += 1
  return kept


def text_key(r: formats.Record) -> bytes:
  return dedup.text_key(r["text"])


def id_rank(r: formats.Record) -> tuple[str, str, bytes]:
  return dedup.id_rank(dedup.rank(r), r["text"], writer.serialize(r))


def dedup_ids(records: Iterable[formats.Record], stats: collections.Counter) -> list[formats.Record]:
  kept, dropped = dedup.keep_smallest(records, key=lambda r: r["id"], order=id_rank)
  stats["duplicate_id"] += dropped
  return kept


def dedup_exact(records: Iterable[formats.Record], stats: collections.Counter) -> list[formats.Record]:
  kept, dropped = dedup.keep_smallest(records, key=text_key, order=dedup.rank)
  stats["duplicate"] += dropped
  return kept


def clean_records(records: Iterable[formats.Record], config: BuildConfig, stats: collections.Counter,
                  progress: Callable[[collections.Counter], None] | None = None) -> list[formats.Record]:
  """The local engine's cleaning: per-record filters batch by batch, then the dedup rounds over all records."""
  cleaned: list[formats.Record] = []
  batch: list[formats.Record] = []
  for r in records:
    batch.append(r)
    if len(batch) == BATCH:
      cleaned += clean_batch(batch, config, stats)
      batch = []
      if progress:
        progress(stats)
  cleaned += clean_batch(batch, config, stats)
  cleaned = dedup_ids(cleaned, stats)
  if config.dedup_exact:
    cleaned = dedup_exact(cleaned, stats)
  if config.dedup_near:
    near = dedup.near_duplicates(cleaned, dedup.NearDuplicateLSH(config.near_threshold))
    stats["near_duplicate"] += len(near)
    cleaned = [r for r in cleaned if dedup.rank(r) not in near]
  if progress:
    progress(stats)
  return cleaned


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


_TMP_TAG = ".tmp-"


def _remove_stale_temps(out: epath.Path) -> None:
  """Temp directories of builds whose process is gone (killed): never complete, so safe to remove."""
  for p in out.parent.glob(f".{out.name}{_TMP_TAG}*"):
    pid = p.name[len(out.name) + len(_TMP_TAG) + 1:].split("-", 1)[0]
    if pid.isdigit() and int(pid) != os.getpid():
      try:
        os.kill(int(pid), 0)
      except ProcessLookupError:
        shutil.rmtree(p, ignore_errors=True)
      except PermissionError:
        pass


@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike, overwrite: bool) -> Iterator[epath.Path]:
  """A temp directory next to `output_dir`, renamed into place when the body succeeds, removed when it fails.

  Refuses to replace a non-empty `output_dir` unless `overwrite`. A killed build leaves only a dot-named temp
  directory without build_stats.json (removed by the next build of the same output).
  """
  out = epath.Path(output_dir)
  if out.exists() and any(out.iterdir()) and not overwrite:
    what = "a complete dataset" if is_complete(out) else "files (not a complete dataset)"
    raise DatasetExistsError(f"{out} already holds {what}; pass --overwrite to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_temps(out)
  tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}-{time.time_ns()}"
  tmp.mkdir()
  try:
    yield tmp
    if not (tmp / STATS_FILE).exists():
      raise RuntimeError(f"build into {tmp} finished without {STATS_FILE}")
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


def _build_local(inputs, root: epath.Path, config: BuildConfig, tokenizer_path: str | None,
                 progress) -> tuple[collections.Counter, dict[str, int], dict[str, int]]:
  stats = collections.Counter()
  records = clean_records(formats.read_inputs(inputs, stats), config, stats, progress)
  if config.join_threads:
    records, merged = threads.join_threads(records)
    stats["thread_merged"] += merged
  by_split: dict[str, list[formats.Record]] = {s: [] for s in writer.SPLITS}
  for r in records:
    by_split[split_of(r["id"], config.validation_fraction)].append(r)
  lengths = {}
  for split, recs in by_split.items():
    if recs:
      lengths[split] = writer.write_split(root, split, [(writer.hkey(split, r["id"]), writer.serialize(r))
                                                        for r in recs])
  writer.write_metadata(root, lengths)
  tokens = {}
  if tokenizer_path:
    from tweetjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    tok = tokenizer_lib.Tokenizer(tokenizer_path)
    for split, recs in by_split.items():
      tokens[split] = int(sum(len(x) + 2 for x in tok.encode_batch([r["text"] for r in recs])))
  return stats, {k: len(v) for k, v in by_split.items()}, tokens


def build(inputs: Sequence[str] | str, output_dir: str | os.PathLike, config: BuildConfig = BuildConfig(), *,
          overwrite: bool = False, tokenizer_path: str | None = None,
          generate: Callable[[epath.Path], Any] | None = None,
          progress: Callable[[collections.Counter], None] | None = None,
          engine: str = "local", beam_options: str = "", split_bytes: int | None = None) -> dict[str, Any]:
  """Builds a dataset into `output_dir` atomically and returns the stats that are written next to it.

  `generate(raw_dir)` (the `--synthetic` path) writes exports into `<output_dir>/raw` first; `inputs` then
  defaults to that directory. `engine`: "local" or "beam" (then `beam_options`, a Beam command line such as
  "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing", and `split_bytes`, the
  size of the byte ranges large JSONL/CSV files are read in; see beam_build.py).
  """
  if engine not in ENGINES:
    raise ValueError(f"engine={engine!r}: expected one of {ENGINES}")
  with staged_output(output_dir, overwrite) as tmp:
    if generate is not None:
      generate(tmp / "raw")
      inputs = inputs or [str(tmp / "raw")]
    t0 = time.time()
    if engine == "beam":
      from tweetjax.data import beam_build  # pylint: disable=g-import-not-at-top
      stats, splits, tokens = beam_build.run(inputs, tmp, config, beam_options=beam_options,
                                             tokenizer_path=tokenizer_path, split_bytes=split_bytes)
    else:
      stats, splits, tokens = _build_local(inputs, tmp, config, tokenizer_path, progress)
    result = summarize(stats, splits, config, time.time() - t0)
    result["tokens"] = tokens
    result["engine"] = engine
    if engine == "beam":  # CPU seconds per pipeline step, summed over workers (a profile of the build)
      result["cpu_seconds"] = {k.split("/", 1)[1]: round(v / 1e6, 2) for k, v in sorted(stats.items())
                               if k.startswith(beam_build.CPU_PREFIX)}
    (tmp / STATS_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
  return result


def summarize(stats: collections.Counter, splits: dict[str, int], config: BuildConfig,
              seconds: float) -> dict[str, Any]:
  skipped = {k: stats.get(k, 0) for k in formats.SKIP_REASONS}
  dropped = {k: stats.get(k, 0) for k in FILTER_REASONS}
  return {
      "read": stats.get("read", 0),
      "kept": sum(splits.values()),
      "splits": dict(splits),
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
