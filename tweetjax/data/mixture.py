"""Weighted mixtures of built datasets (`config.data.mixture`) in the tweet loader, with grain's mixing.

  config.data.mixture = "tweets=/data/tweets:0.6,threads=/data/threads:0.3,replies=/data/replies:0.1"

Each entry is `name=dataset_dir:weight` (`name=` optional: the directory's name). Weights are shares of TOKENS: a
source whose documents are long (joined threads) is drawn less often per document than one of short tweets, so that
its share of the tokens the model sees is its weight. The loader turns them into document proportions with each
source's mean tokens per document (`mean_tokens`, the run's tokenizer over the first `MEAN_SAMPLE` records of the
split, which the build stores in hash order, i.e. a fixed random sample), and mixes by
`grain.MapDataset.mix(sources, proportions)`: a deterministic interleaving in which any prefix holds each source in
proportion (up to grain's integer rounding: the smallest proportion is scaled to 100).

Each source is its own `range(n).shuffle(seed_i).repeat(epochs)`, with `seed_i` derived from (shuffle_seed, i), so
the mixed record order is a pure function of the config, and the loader's windows / iterator state / process
independence (pipeline.py) carry over unchanged. The realised token share of each source is logged as the loader
goes (`PackedBatchIterator.token_shares`).
"""

import dataclasses
import functools
import os
from typing import Sequence

import grain
import numpy as np

MEAN_SAMPLE = 1024


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  dataset_dir: str
  weight: float


def parse(spec: str) -> list[Source]:
  """`config.data.mixture` -> sources; errors name the key and the entry."""
  sources = []
  for entry in (e.strip() for e in spec.split(",")):
    if not entry:
      continue
    name, _, rest = entry.partition("=") if "=" in entry.split(":", 1)[0] else ("", "", entry)
    path, sep, weight = rest.rpartition(":")
    try:
      w = float(weight)
    except ValueError:
      w = -1.0
    if not sep or not path or not w > 0:
      raise ValueError(f"config.data.mixture entry {entry!r}: expected 'name=dataset_dir:weight' with a weight > 0")
    sources.append(Source(name or os.path.basename(os.path.normpath(path)), path, w))
  names = [s.name for s in sources]
  if len(set(names)) != len(names):
    raise ValueError(f"config.data.mixture: source names must differ, got {names}")
  return sources


def mean_tokens(texts: Sequence[str], tokenizer) -> float:
  return float(np.mean([len(ids) + 2 for ids in tokenizer.encode_batch(list(texts))])) if texts else 1.0


def proportions(weights: Sequence[float], mean_tokens_per_doc: Sequence[float]) -> list[float]:
  """Document proportions that give token shares `weights` (normalized to sum to 1)."""
  p = np.asarray(weights, np.float64) / np.asarray(mean_tokens_per_doc, np.float64)
  return (p / p.sum()).tolist()


def source_seed(shuffle_seed: int, index: int) -> int:
  return int(np.random.SeedSequence([shuffle_seed, index]).generate_state(1, np.uint32)[0])


def _tag(source: int, index) -> np.ndarray:
  return np.array([source, index], np.int64)


def mixed_order(sizes: Sequence[int], props: Sequence[float], *, shuffle: bool, shuffle_seed: int,
                num_epochs: int | None) -> grain.MapDataset:
  """MapDataset of int64[2] (source, record index): each source shuffled and repeated, then mixed."""
  parts = []
  for i, n in enumerate(sizes):
    order = grain.MapDataset.range(n)
    if shuffle:
      order = order.shuffle(seed=source_seed(shuffle_seed, i))
    parts.append(order.repeat(num_epochs).map(functools.partial(_tag, i)))
  return grain.MapDataset.mix(parts, weights=list(props))
