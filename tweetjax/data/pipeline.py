"""Tweet loader: array_record split -> grain shuffle/repeat -> windows -> normalize+tokenize+pack -> global batches.

The GLOBAL row stream is a pure function of (dataset, split, shuffle_seed, pack_window, seq_len, tokenizer):
  1. record order: `grain.MapDataset.range(n).shuffle(seed).repeat(epochs)` (each epoch reshuffled),
  2. cut into windows of `pack_window` records; each window is tokenized and packed on its own (best-fit
     decreasing, `packing.pack`), giving a deterministic list of rows. The stored text is already normalized by the
     build; the loader normalizes it again only when `normalize` differs from the build's options (or the build
     predates the record of them, see `builder.stored_normalization`),
  3. global batch k = rows [k*B, (k+1)*B) of the concatenated windows.
Every process computes the same windows (tokenizing a window is cheap next to a train step) and keeps only its
own rows of each global batch, so the global batch sequence does not depend on the number of processes.
Iterator state is {"window", "row"}: resuming recomputes one window and continues exactly where it stopped.
With `config.data.mixture` (mixture.py) step 1 mixes several datasets by token weight; the rest is the same.

`config.data` keys used here (defaults in `DEFAULTS`): dataset_dir, tokenizer_path, seq_len, global_batch_size,
shuffle_seed, normalize (NormalizeConfig fields), pack_window, num_epochs (0 = forever), mixture.
Dims: B batch (global), b local batch, L sequence length.
"""

import json
from typing import Any, Iterator

from absl import logging
import grain
import jax
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

from tweetjax.data import builder, mixture, normalize, packing
from tweetjax.data.tokenizer import Tokenizer

DEFAULTS = {"pack_window": 4096, "num_epochs": 0, "mixture": ""}
_LOG_SHARES_EVERY = 16  # windows


def _decode(raw: bytes) -> dict[str, Any]:
  """tf.train.Example bytes -> {field: str | int} (tfds' generic decoder is ~20x slower for this schema)."""
  out = {}
  for k, f in tf_example_pb2.Example.FromString(raw).features.feature.items():
    if f.HasField("bytes_list"):
      out[k] = f.bytes_list.value[0].decode("utf-8") if f.bytes_list.value else ""
    else:
      out[k] = int(f.int64_list.value[0]) if f.int64_list.value else 0
  return out


class TweetSource:
  """Random access to one split: `texts(indices)` for the loader, `examples(indices)` with all metadata."""

  def __init__(self, dataset_dir: str, split: str):
    self._raw = builder.open_split(dataset_dir, split).data_source  # array_record, batched reads

  def __len__(self) -> int:
    return len(self._raw)

  def texts(self, indices) -> list[str]:
    parse = tf_example_pb2.Example.FromString
    return [parse(r).features.feature["text"].bytes_list.value[0].decode("utf-8")
            for r in self._raw.__getitems__(list(indices))]

  def examples(self, indices) -> list[dict[str, Any]]:
    return [_decode(r) for r in self._raw.__getitems__(list(indices))]


def load_examples(dataset_dir: str, split: str) -> list[dict[str, Any]]:
  """Every example of a split in file order, with its metadata (id, text, labels, topic, audience, ...)."""
  if split not in builder.split_names(dataset_dir):
    return []
  src = TweetSource(dataset_dir, split)
  return src.examples(range(len(src)))


class WindowRowIterator:
  """Global batches cut from a deterministic sequence of packed windows: this process's rows of each, as numpy dicts
  (the batch contract); checkpointable as {"window", "row"}.

  `windows[w]` must be a pure function of w (a grain MapDataset of packed windows), so resuming recomputes one window
  and continues exactly. A finite sequence ends with a last batch padded by empty rows.
  """

  def __init__(self, windows, seq_len: int, global_batch_size: int, pad_id: int, local_rows: slice | None = None):
    self.windows, self.seq_len, self.global_batch_size, self.pad_id = windows, seq_len, global_batch_size, pad_id
    self.local_rows = local_rows or slice(0, global_batch_size)
    self._window, self._row = 0, 0
    self._rows: dict[str, np.ndarray] | None = None
    self._rows_window = -1

  def _entered(self, w: int, rows: dict[str, np.ndarray]) -> None:
    """Called once per window when the iterator first reads it (per-window statistics)."""

  def _window_rows(self, w: int) -> dict[str, np.ndarray] | None:
    if w >= len(self.windows):
      return None
    if self._rows_window != w:
      self._rows, self._rows_window = self.windows[w], w
      self._entered(w, self._rows)
    return self._rows

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts, need = [], self.global_batch_size
    w, r = self._window, self._row
    while need:
      rows = self._window_rows(w)
      if rows is None:
        if need == self.global_batch_size:
          raise StopIteration
        parts.append(packing.empty_rows(need, self.seq_len, self.pad_id))  # finite pass: pad
        break
      take = min(need, len(rows["inputs"]) - r)
      parts.append({k: rows[k][r:r + take] for k in packing.BATCH_KEYS})
      need -= take
      r += take
      if r == len(rows["inputs"]):
        w, r = w + 1, 0
    self._window, self._row = w, r
    return {k: np.concatenate([p[k] for p in parts])[self.local_rows] for k in packing.BATCH_KEYS}

  def get_state(self) -> dict[str, int]:
    return {"window": self._window, "row": self._row}

  def set_state(self, state: dict[str, int] | bytes | str) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    self._window, self._row = int(state["window"]), int(state["row"])


def record_order(num_records: int, *, shuffle: bool, shuffle_seed: int, num_epochs: int | None):
  """Record indices 0..n-1, shuffled with a seed (each epoch reshuffled), repeated num_epochs times (None: forever):
  what `.batch(pack_window).map(pack)` turns into a WindowRowIterator's windows."""
  order = grain.MapDataset.range(num_records)
  if shuffle:
    order = order.shuffle(seed=shuffle_seed)
  return order.repeat(num_epochs or None)


class PackedBatchIterator(WindowRowIterator):
  """The tweet loader: windows of tweets (of one split, or a mixture of datasets), normalized when needed,
  tokenized and packed."""

  def __init__(self, dataset_dir: str, tokenizer: Tokenizer | str, seq_len: int, global_batch_size: int, *,
               split: str = "train", shuffle: bool = True, shuffle_seed: int = 0, num_epochs: int | None = None,
               normalize_config: normalize.NormalizeConfig | dict | None = None, pack_window: int = 4096,
               local_rows: slice | None = None, sources: list[mixture.Source] | None = None):
    self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    self.normalize_config = normalize.NormalizeConfig.from_dict(normalize_config)
    dirs = [s.dataset_dir for s in sources] if sources else [dataset_dir]
    self.source_names = [s.name for s in sources] if sources else [dataset_dir]
    self.sources = [TweetSource(d, split) for d in dirs]
    for d, src in zip(dirs, self.sources):
      if len(src) == 0:
        raise ValueError(f"split {split!r} of {d} is empty")
    self.source = self.sources[0]
    # Normalizing again with the build's own options would cost most of the loader's CPU time, and would not always
    # be a no-op (normalize.py names the exceptions): the model should see the text the tokenizer was trained on.
    self._renormalize = []
    for d in dirs:
      built = builder.stored_normalization(d)
      self._renormalize.append(built != self.normalize_config)
      if self._renormalize[-1]:
        logging.info("tweet loader: normalizing %s/%s again with %s (the build used %s)", d, split,
                     self.normalize_config, built or "unrecorded options")
    self.renormalize = any(self._renormalize)
    if sources:
      means = [mixture.mean_tokens(self._texts(i, range(min(len(src), mixture.MEAN_SAMPLE))), self.tokenizer)
               for i, src in enumerate(self.sources)]
      props = mixture.proportions([s.weight for s in sources], means)
      for s, src, m, p in zip(sources, self.sources, means, props):
        logging.info("mixture %s: %s/%s, %d records, %.1f tokens/doc, token weight %.3g -> %.4f of documents",
                     s.name, s.dataset_dir, split, len(src), m, s.weight, p)
      order = mixture.mixed_order([len(src) for src in self.sources], props, shuffle=shuffle,
                                  shuffle_seed=shuffle_seed, num_epochs=num_epochs or None)
    else:
      order = record_order(len(self.source), shuffle=shuffle, shuffle_seed=shuffle_seed, num_epochs=num_epochs)
    self._tokens_S = np.zeros(len(self.sources), np.int64)  # tokens per source in the windows entered so far
    super().__init__(order.batch(pack_window).map(self._pack_window), seq_len, global_batch_size,
                     self.tokenizer.pad_id, local_rows)

  def _texts(self, source: int, indices) -> list[str]:
    texts = self.sources[source].texts(indices)
    return normalize.normalize_batch(texts, self.normalize_config) if self._renormalize[source] else texts

  def _pack_window(self, items: np.ndarray) -> dict[str, np.ndarray]:
    """A window of record indices (one source) or of (source, index) pairs (a mixture) -> packed rows."""
    source_W, index_W = (items[:, 0], items[:, 1]) if items.ndim == 2 else (np.zeros_like(items), items)
    texts: list[str] = [""] * len(index_W)
    for s in np.unique(source_W).tolist():
      at = np.flatnonzero(source_W == s)
      for i, t in zip(at.tolist(), self._texts(s, index_W[at].tolist())):
        texts[i] = t
    tok = self.tokenizer
    ids = tok.encode_batch(texts)
    rows = packing.pack(ids, self.seq_len, tok.bos_id, tok.eos_id, tok.pad_id)
    rows["source_tokens"] = np.bincount(source_W, weights=[len(x) + 2 for x in ids],
                                        minlength=len(self.sources)).astype(np.int64)
    return rows

  def _entered(self, w: int, rows: dict[str, np.ndarray]) -> None:
    self._tokens_S += rows["source_tokens"]
    if len(self.sources) > 1 and w % _LOG_SHARES_EVERY == 0:
      logging.info("mixture: realised token shares after %d windows: %s", w + 1, self.token_shares())

  def token_shares(self) -> dict[str, float]:
    """Each source's share of the tokens in the windows this iterator has entered (since it was made)."""
    total = max(int(self._tokens_S.sum()), 1)
    return {n: round(int(t) / total, 4) for n, t in zip(self.source_names, self._tokens_S)}


def iterate_packed_batches(dataset_dir: str, tokenizer: Tokenizer | str, seq_len: int, batch_size: int, *,
                           split: str = "validation", shuffle: bool = False, shuffle_seed: int = 0,
                           num_epochs: int | None = 1, normalize_config=None, pack_window: int = 4096,
                           process_index: int = 0, process_count: int = 1) -> PackedBatchIterator:
  """Numpy batches without a mesh (eval jobs); one pass over `split` by default, last batch padded."""
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
  per = batch_size // process_count
  return PackedBatchIterator(dataset_dir, tokenizer, seq_len, batch_size, split=split, shuffle=shuffle,
                             shuffle_seed=shuffle_seed, num_epochs=num_epochs, normalize_config=normalize_config,
                             pack_window=pack_window, local_rows=slice(process_index * per, (process_index + 1) * per))


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int, seq_len: int) -> slice:
  """The contiguous global rows held by this process's devices under `sharding`."""
  idx = sharding.addressable_devices_indices_map((global_batch_size, seq_len))
  starts = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop) for s in idx.values()})
  lo, hi = starts[0][0], max(e for _, e in starts)
  covered = sum(e - s for s, e in starts)
  if covered != hi - lo:
    raise ValueError(f"this process's batch rows are not contiguous under {sharding}: {starts}")
  return slice(lo, hi)


class GlobalBatchIterator:
  """Wraps a WindowRowIterator: yields dicts of global `jax.Array`s sharded with `batch_sharding(mesh)`."""

  def __init__(self, local: WindowRowIterator, sharding: jax.sharding.Sharding):
    self.local, self.sharding = local, sharding

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = next(self.local)
    shape = (self.local.global_batch_size, self.local.seq_len)
    return {k: jax.make_array_from_process_local_data(self.sharding, v, shape) for k, v in batch.items()}

  def get_state(self) -> dict[str, int]:
    return self.local.get_state()

  def set_state(self, state) -> None:
    self.local.set_state(state)


def make_iterator(config, mesh: jax.sharding.Mesh, split: str = "train") -> GlobalBatchIterator:
  """The training iterator for `config.data.source == "tweets"` (see module docstring for the keys)."""
  from tweetjax.parallel.rules import batch_sharding  # pylint: disable=g-import-not-at-top
  data = config.data
  get = lambda k: data.get(k, DEFAULTS.get(k)) if hasattr(data, "get") else getattr(data, k, DEFAULTS.get(k))
  sharding = batch_sharding(mesh)
  B, L = int(data.global_batch_size), int(data.seq_len)
  local = PackedBatchIterator(
      data.dataset_dir, data.tokenizer_path, L, B, split=split, shuffle=split == "train",
      shuffle_seed=int(data.shuffle_seed), num_epochs=int(get("num_epochs")) or None,
      normalize_config=get("normalize"), pack_window=int(get("pack_window")),
      local_rows=process_rows(sharding, B, L), sources=mixture.parse(str(get("mixture"))) or None)
  return GlobalBatchIterator(local, sharding)
