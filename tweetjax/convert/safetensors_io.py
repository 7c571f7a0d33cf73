"""Streaming access to (sharded) safetensors checkpoints, the Hugging Face layout.

Reading opens one file per tensor slice and copies only the requested block, so host memory holds one block at a
time however large the checkpoint. Writing buffers at most one shard (`max_shard_size` bytes) before it goes to
disk. Only safetensors and JSON are ever read: never pickle.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Sequence

import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointFileError(ValueError):
  """A safetensors checkpoint that is incomplete, inconsistent or not what the config describes."""


class SafetensorsReader:
  """Tensor name -> file map of an HF model directory (sharded with an index, or one file)."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        index = json.load(f)
      if "weight_map" not in index:
        raise CheckpointFileError(f"{index_path}: no 'weight_map' key")
      self.files = {name: os.path.join(model_dir, file) for name, file in index["weight_map"].items()}
      absent = sorted({f for f in self.files.values() if not os.path.exists(f)})
      if absent:
        raise CheckpointFileError(f"{index_path} names shard files that do not exist: {absent}")
    else:
      paths = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
      if not paths:
        found = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else "(not a directory)"
        raise CheckpointFileError(
            f"{model_dir}: no {INDEX_FILE} and no *.safetensors files (found {found}); only safetensors weights "
            "are read (pickled .bin/.pt files are never loaded): re-save with save_pretrained(safe_serialization=True)")
      self.files = {}
      for path in paths:
        with safe_open(path, framework="numpy") as f:
          for name in f.keys():
            if name in self.files:
              raise CheckpointFileError(f"tensor {name} is in both {self.files[name]} and {path}")
            self.files[name] = path
    self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

  def names(self) -> set[str]:
    return set(self.files)

  def _file(self, name: str) -> str:
    try:
      return self.files[name]
    except KeyError:
      raise CheckpointFileError(f"{self.model_dir}: no tensor named {name!r}") from None

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self._meta:
      with safe_open(self._file(name), framework="numpy") as f:
        s = f.get_slice(name)
        self._meta[name] = (tuple(s.get_shape()), s.get_dtype())
    return self._meta[name][0]

  def read(self, name: str, index: Sequence[slice] | None = None) -> np.ndarray:
    """The block `index` (one slice per axis, or everything) of tensor `name`, copied out of the file."""
    with safe_open(self._file(name), framework="numpy") as f:
      if index is None:
        return f.get_tensor(name)
      return np.ascontiguousarray(f.get_slice(name)[tuple(index)])


class ShardedWriter:
  """Writes tensors into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_size` bytes plus the
  index (one `model.safetensors` and no index when everything fits in one shard), as save_pretrained does."""

  def __init__(self, out_dir: str, max_shard_size: int, metadata: dict[str, str] | None = None):
    if max_shard_size <= 0:
      raise ValueError(f"max_shard_size={max_shard_size}: expected a positive number of bytes")
    self.out_dir = out_dir
    self.max_shard_size = int(max_shard_size)
    self.metadata = {"format": "pt", **(metadata or {})}  # transformers refuses files without format=pt
    self._buffer: dict[str, np.ndarray] = {}
    self._buffer_bytes = 0
    self._shards: list[list[str]] = []
    self.total_size = 0
    os.makedirs(out_dir, exist_ok=True)

  def _temp_name(self, i: int) -> str:
    return os.path.join(self.out_dir, f".shard-{i:05d}.safetensors.tmp")

  def add(self, name: str, array: np.ndarray) -> None:
    if any(name in shard for shard in self._shards) or name in self._buffer:
      raise ValueError(f"tensor {name} written twice")
    if self._buffer and self._buffer_bytes + array.nbytes > self.max_shard_size:
      self.flush()
    self._buffer[name] = np.ascontiguousarray(array)
    self._buffer_bytes += array.nbytes
    self.total_size += array.nbytes

  def flush(self) -> None:
    if not self._buffer:
      return
    write_safetensors(self._temp_name(len(self._shards)), self._buffer, self.metadata)
    self._shards.append(list(self._buffer))
    self._buffer, self._buffer_bytes = {}, 0

  def close(self) -> dict[str, Any]:
    """Renames the shards to their final names and writes the index; returns the index dict."""
    self.flush()
    n = len(self._shards)
    weight_map = {}
    for i, names in enumerate(self._shards):
      final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      os.replace(self._temp_name(i), os.path.join(self.out_dir, final))
      weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
    if n > 1:
      with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return index


_DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """Writes one safetensors file straight from the arrays (safetensors' own save_file first copies every tensor
  into one bytes buffer, tripling host memory per shard)."""
  header: dict[str, Any] = {"__metadata__": metadata}
  offset = 0
  for name, array in tensors.items():
    if array.dtype.name not in _DTYPE_CODES:
      raise ValueError(f"tensor {name}: dtype {array.dtype} cannot be written to safetensors")
    header[name] = {"dtype": _DTYPE_CODES[array.dtype.name], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the format aligns the data section to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)


def parse_size(size: str | int) -> int:
  """'5GB', '500MB', '10KiB' or a byte count -> bytes (decimal units as transformers uses; KiB/MiB/GiB binary)."""
  if isinstance(size, int):
    return size
  text = str(size).strip().upper()
  units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
  for unit, factor in units.items():
    if text.endswith(unit):
      return int(float(text[:-len(unit)]) * factor)
  return int(text)
