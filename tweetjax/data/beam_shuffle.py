"""A shuffle through files for the Beam build: the bulk bytes go to files, the runner moves only references.

A keyed round of beam_build.py scatters its input into `partitions` keys. Here a producer (`Scatter`) packs each
partition's items into blobs and writes them to *run files* in the round's directory, one run per ~`RUN_BYTES` of
packed data a bundle produced, the blobs of one partition contiguous in the run; it emits one small element per
(partition, run): `(partition, (path, offset, length))`. The runner's GroupByKey then groups references, not data
(the Python runners keep every stage boundary in the driver and hand a worker its share of a stage as one bundle,
so data there would grow with the input), and a round's consumer reads the spans of its partition (`read`). A
worker holds one partition and its producer buffers at a time, whatever the input size.

Exact under retries: run files get fresh names (uuid4), and a consumer reads only the spans that were emitted, so
the files of a failed or retried bundle are never read. Everything lives under one directory inside the build's
temporary directory (`directory`), removed when the build ends (`remove`); a killed build leaves it inside the
dot-named temp directory, which the next build of the same output removes. Paths go through etils epath, so the
files may live on gs:// for cluster runners.

Items of a channel are either a list of Python objects (routed by a key function) or *columns*: a tuple of
equal-length numpy arrays whose first is the partition key (uint64; the partition is key % partitions).
Stores (`write_store`/`read_store`): one file of named blobs a round writes for a partition and later rounds read
in part (for example the serialized examples of a partition, read once by the final write).

Blobs are pickles, zstd-compressed where asked only when the directory is remote (gs://, ...): on a local disk the
bytes cost page cache, not network, and zstd cost ~4 us a record (timed per blob, the ids round's columns and
stores), ~8 of the ~350 CPU-s of a 2M-tweet build.
"""

import collections
import ctypes
import functools
import pickle
import struct
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Sequence

import apache_beam as beam
from apache_beam.transforms import window
from etils import epath
import numpy as np
import zstandard

from tweetjax import paths

# A producer's buffers are bounded in total, not per partition: the partition count grows with the input, so a
# per-partition allowance would let a worker's memory grow with it (64 MiB / 32 MiB let the workers' peak RSS grow
# by a third from 200k to 2M tweets, tools/bench_data.py). Small unpacked buffers also pack faster: with 16 MiB of
# records buffered (estimated by length) the records' scatter took 11.4 CPU-s at 2M tweets, with ~3 MiB 9.3.
RUN_BYTES = 8 << 20  # packed bytes a producer bundle buffers before it writes a run file
PACK_BYTES = 256 << 10  # (estimated) bytes of one partition's items packed into one blob
BUFFER_BYTES = 4 << 20  # (estimated) bytes of unpacked items a producer holds before it packs all of them
OBJECT_BYTES = 1024  # estimated size of one Python object item (a record dict) in memory
SMALL_OBJECT_BYTES = 64  # an int, or a str/bytes item besides its characters (header, pointer, allocator)
DIRECTORY = ".beam-shuffle"  # inside the build's temporary directory
_FRAME = struct.Struct("<Q")

Ref = tuple[str, int, int]  # (path, offset, length) of a partition's span in a run file


CPU_NAMESPACE = "tweetjax.cpu_us"  # Beam counters: CPU microseconds of each step, summed over workers


def count_cpu(step: str, t0: float) -> None:
  """Adds the calling thread's CPU time since `t0` (time.thread_time()) to the counter of `step`."""
  beam.metrics.Metrics.counter(CPU_NAMESPACE, step).inc(int((time.thread_time() - t0) * 1e6))


@functools.cache
def _malloc_trim():
  try:
    return ctypes.CDLL(None).malloc_trim  # glibc
  except (OSError, AttributeError):
    return None


def release_memory() -> None:
  """Hands the allocator's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

  A worker frees one partition's records, blobs and arrays before it takes the next, but glibc keeps most of that
  heap, fragmented, in the process: measured at 2M tweets, a worker's RSS after the read stage stayed ~100 MiB above
  its 200k level, and every later round started from there. Called where a step has just freed its data (~1 ms).
  """
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


def directory(root: str) -> epath.Path:
  return epath.Path(root) / DIRECTORY


def remove(root: str) -> None:
  d = directory(root)
  if d.exists():
    d.rmtree()


# ---- chunks: lists of objects, or columns


def is_columns(chunk) -> bool:
  return isinstance(chunk, tuple)


def size(chunk) -> int:
  return len(chunk[0]) if is_columns(chunk) else len(chunk)


def take(chunk, idx: np.ndarray):
  return tuple(c[idx] for c in chunk) if is_columns(chunk) else [chunk[i] for i in idx.tolist()]


def concat(parts: Sequence) -> Any:
  if not parts:
    return None
  if is_columns(parts[0]):
    return tuple(np.concatenate(cols) for cols in zip(*parts))
  return [item for part in parts for item in part]


def chunks(items, n: int) -> Iterable:
  total = size(items)
  for i in range(0, total, n):
    yield tuple(c[i:i + n] for c in items) if is_columns(items) else items[i:i + n]


def objects(seq: Sequence) -> np.ndarray:
  """A 1-D object array of `seq`'s items (np.array would turn a list of tuples into a 2-D array)."""
  return np.fromiter(seq, dtype=object, count=len(seq))


def _object_row_bytes(column) -> np.ndarray:
  """Estimated bytes of each item of a column of Python objects: str/bytes by their length, ints at
  SMALL_OBJECT_BYTES, anything else (records) at OBJECT_BYTES."""
  n = len(column)
  if n and isinstance(column[0], (str, bytes)):
    try:
      return np.fromiter(map(len, column), np.int64, n) + SMALL_OBJECT_BYTES
    except TypeError:  # a mixed column
      pass
  return np.full(n, SMALL_OBJECT_BYTES if n and isinstance(column[0], int) else OBJECT_BYTES, np.int64)


def _row_bytes(chunk) -> np.ndarray:
  """Estimated bytes in memory of each row: an object column's nbytes counts only its pointers, not the objects."""
  if not is_columns(chunk):
    return _object_row_bytes(chunk)
  total = np.zeros(size(chunk), np.int64)
  for c in chunk:
    total += _object_row_bytes(c) if c.dtype == object else c.nbytes // max(1, len(c))
  return total


# ---- blobs


_codecs = threading.local()  # zstd contexts, made once per thread (a context is not thread-safe)


def _compressor() -> zstandard.ZstdCompressor:
  if not hasattr(_codecs, "compressor"):
    _codecs.compressor = zstandard.ZstdCompressor(level=1)
  return _codecs.compressor


def _decompressor() -> zstandard.ZstdDecompressor:
  if not hasattr(_codecs, "decompressor"):
    _codecs.decompressor = zstandard.ZstdDecompressor()
  return _codecs.decompressor


def pack(obj: Any, compress: bool) -> bytes:
  data = pickle.dumps(obj, protocol=5)
  return b"z" + _compressor().compress(data) if compress else b"p" + data


def unpack(blob: bytes) -> Any:
  kind, data = blob[:1], memoryview(blob)[1:]
  return pickle.loads(_decompressor().decompress(data) if kind == b"z" else data)


def _read_span(path: str, offset: int, length: int) -> bytes:
  with epath.Path(path).open("rb") as f:
    f.seek(offset)
    data = f.read(length)
  if len(data) != length:
    raise IOError(f"{path}: expected {length} bytes at offset {offset}, got {len(data)} (truncated shuffle file)")
  return data


def _frames(data: bytes) -> Iterable[bytes]:
  view, pos = memoryview(data), 0
  while pos < len(view):
    (n,) = _FRAME.unpack_from(view, pos)
    yield bytes(view[pos + _FRAME.size:pos + _FRAME.size + n])
    pos += _FRAME.size + n


def read_parts(refs: Iterable[Ref]) -> Iterable[Any]:
  """The items of one partition from the spans its producers emitted, one packed blob at a time (any order:
  rounds do not depend on it)."""
  for ref in sorted(refs):
    for blob in _frames(_read_span(*ref)):
      yield unpack(blob)


def read(refs: Iterable[Ref]) -> Any:
  """All the items of one partition (read_parts), as one chunk."""
  return concat(list(read_parts(refs)))


# ---- producers


class Scatter(beam.DoFn):
  """Chunks of items -> run files in `round_dir`; emits (partition, Ref) for each partition a run holds."""

  def __init__(self, label: str, round_dir: str, partitions: int, key_fn: Callable[[Any], int] | None,
               compress: bool):
    """`compress`: zstd the blobs, when `round_dir` is remote (`paths.is_url`)."""
    self._label, self._dir, self._partitions, self._key_fn = label, round_dir, partitions, key_fn
    self._compress = compress and paths.is_url(round_dir)

  def start_bundle(self):
    self._items: dict[int, list] = collections.defaultdict(list)  # unpacked, per partition
    self._item_bytes: dict[int, int] = collections.defaultdict(int)
    self._blobs: dict[int, list[bytes]] = collections.defaultdict(list)  # packed, per partition
    self._buffered = self._packed = 0
    self._made_dir = False

  def _pack(self, p: int) -> None:
    blob = pack(concat(self._items.pop(p)), self._compress)
    self._buffered -= self._item_bytes.pop(p)
    self._blobs[p].append(blob)
    self._packed += len(blob)

  def _pack_all(self) -> None:
    for p in list(self._items):
      self._pack(p)

  def _write_run(self) -> Iterable[tuple[int, Ref]]:
    self._pack_all()
    if not self._blobs:
      return
    d = epath.Path(self._dir)
    if not self._made_dir:
      d.mkdir(parents=True, exist_ok=True)
      self._made_dir = True
    path = d / f"{uuid.uuid4().hex}.run"
    refs, offset = [], 0
    with path.open("wb") as f:
      for p in sorted(self._blobs):
        start = offset
        for blob in self._blobs[p]:
          f.write(_FRAME.pack(len(blob)))
          f.write(blob)
          offset += _FRAME.size + len(blob)
        refs.append((p, (str(path), start, offset - start)))
    self._blobs.clear()
    self._packed = 0
    release_memory()
    yield from refs

  def process(self, chunk):
    t0 = time.thread_time()
    if size(chunk):
      yield from self._add(chunk)
    count_cpu(self._label, t0)

  def _add(self, chunk):
    keys_N = chunk[0] if self._key_fn is None else np.fromiter(map(self._key_fn, chunk), np.uint64, len(chunk))
    part_N = (keys_N % np.uint64(self._partitions)).astype(np.min_scalar_type(self._partitions))
    order_N = np.argsort(part_N, kind="stable")  # a radix sort for small integer types
    counts_P = np.bincount(part_N, minlength=self._partitions)
    weights_P = np.bincount(part_N, weights=_row_bytes(chunk), minlength=self._partitions)  # once a chunk
    ends_P = np.cumsum(counts_P)
    by_part = take(chunk, order_N)  # one gather per column, then views of contiguous slices
    for p in np.flatnonzero(counts_P).tolist():
      start, end = int(ends_P[p] - counts_P[p]), int(ends_P[p])
      # views, not copies (the pack concatenates them anyway): a view keeps its whole chunk alive, but every chunk
      # adds its full weight to `_buffered`, so `_pack_all` frees them all within BUFFER_BYTES plus one chunk
      piece = tuple(c[start:end] for c in by_part) if is_columns(by_part) else by_part[start:end]
      weight = int(weights_P[p])
      self._items[p].append(piece)
      self._item_bytes[p] += weight
      self._buffered += weight
      if self._item_bytes[p] >= PACK_BYTES:
        self._pack(p)
    if self._buffered >= BUFFER_BYTES:
      self._pack_all()
    if self._packed >= RUN_BYTES:
      yield from self._write_run()

  def finish_bundle(self):
    t0 = time.thread_time()
    refs = list(self._write_run())
    count_cpu(self._label, t0)
    for ref in refs:
      yield window.GlobalWindows.windowed_value(ref)


def scatter(pcoll, label: str, root: str, partitions: int, key_fn: Callable[[Any], int] | None = None,
            compress: bool = False):
  """(partition, Ref) elements of `pcoll`'s chunks, written under the shuffle directory of `root`."""
  round_dir = str(directory(root) / label.replace("/", "."))
  return pcoll | label >> beam.ParDo(Scatter(label, round_dir, partitions, key_fn, compress))


# ---- stores


StoreRef = tuple[str, dict[str, tuple[int, int]]]  # (path, {blob name: (offset, length)})


def write_store(store_dir: str, name: str, blobs: dict[str, Any], compress: Sequence[str] = ()) -> StoreRef:
  """Writes named objects to one new file `<store_dir>/<name>-<uuid>`; returns where each is. The blobs named in
  `compress` are compressed when the store is remote (`paths.is_url`)."""
  compress = compress if paths.is_url(store_dir) else ()
  d = epath.Path(store_dir)
  d.mkdir(parents=True, exist_ok=True)
  path = d / f"{name}-{uuid.uuid4().hex}"
  index, offset = {}, 0
  with path.open("wb") as f:
    for key, obj in blobs.items():
      blob = pack(obj, key in compress)
      f.write(blob)
      index[key] = (offset, len(blob))
      offset += len(blob)
  return str(path), index


def read_store(ref: StoreRef, *names: str) -> list[Any]:
  path, index = ref
  return [unpack(_read_span(path, *index[n])) for n in names]
