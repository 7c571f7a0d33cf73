"""Sweep definitions: override dicts, their combinators, stable point names, and configs with overrides applied.

A config file defines, next to `get_config(arg)`, a `sweep()` (or `sweep(arg)`) that yields override dicts keyed
by dotted config paths:

  def sweep():
    yield from product(zip_({"model.d_model": [64, 128], "model.num_layers": [2, 4]}),
                       {"optimizer.learning_rate": [1e-3, 3e-3]})

Every point gets a name derived only from its overrides (sorted by key), so it is the same across runs, Python
versions and reorderings of the sweep, and it is its workdir's name: a sweep that grows keeps its finished points.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

import ml_collections

Overrides = dict[str, Any]
SweepLike = Mapping[str, Sequence[Any]] | Iterable[Mapping[str, Any]]

MAX_NAME_LEN = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def axis(key: str, values: Sequence[Any]) -> list[Overrides]:
  """One hyper-parameter over `values`: [{key: v} for v in values]."""
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise TypeError(f"sweep axis {key!r}: expected a list of values, got {values!r}")
  return [{key: value} for value in values]


def _as_points(sweep: SweepLike, combine) -> list[Overrides]:
  if isinstance(sweep, Mapping):
    return combine(*[axis(key, values) for key, values in sweep.items()])
  points = [dict(point) for point in sweep]
  for point in points:
    if not isinstance(point, Mapping):
      raise TypeError(f"sweep points must be dicts of overrides, got {point!r}")
  return points


def _merge(points: Sequence[Mapping[str, Any]]) -> Overrides:
  merged: Overrides = {}
  for point in points:
    clash = sorted(set(merged) & set(point))
    if clash:
      raise ValueError(f"sweep combines two values for the same key(s) {clash}: {list(points)}")
    merged.update(point)
  return merged


def product(*sweeps: SweepLike) -> list[Overrides]:
  """Cartesian product; a dict {key: values} is the product over its keys. The last sweep varies fastest."""
  parts = [_as_points(sweep, product) for sweep in sweeps]
  return [_merge(combo) for combo in itertools.product(*parts)]


def zip_(*sweeps: SweepLike) -> list[Overrides]:
  """Element-wise combination of equally long sweeps; a dict {key: values} zips its keys."""
  parts = [_as_points(sweep, zip_) for sweep in sweeps]
  lengths = [len(part) for part in parts]
  if len(set(lengths)) > 1:
    raise ValueError(f"zip_ of sweeps of different lengths {lengths}: {parts}")
  return [_merge(combo) for combo in zip(*parts)]


def chain(*sweeps: SweepLike) -> list[Overrides]:
  """Concatenation: all points of the first sweep, then all of the second, ..."""
  return [point for sweep in sweeps for point in _as_points(sweep, product)]


def format_value(value: Any) -> str:
  """The text of a value as `--config.key=<text>` expects it, and as it appears in point names."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)  # the shortest round-trip repr: identical on every Python >= 3.1
  if isinstance(value, str):
    return value
  return repr(value)


def canonical(overrides: Mapping[str, Any]) -> str:
  """A canonical text of the overrides (sorted keys, type-tagged values): the input of the name hash."""
  return json.dumps([[key, type(value).__name__, format_value(value)] for key, value in sorted(overrides.items())],
                    separators=(",", ":"))


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """The last component of each dotted key, or the full key where that last component is ambiguous."""
  last = [key.rsplit(".", 1)[-1] for key in keys]
  return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def point_name(overrides: Mapping[str, Any]) -> str:
  """Filesystem-safe name from the overrides, e.g. `d_model=64_learning_rate=0.003`.

  Keys are sorted; a name that had to be sanitised (unsafe characters) or shortened (> MAX_NAME_LEN) carries an
  8-hex hash of the canonical overrides, so distinct points never share a name.
  """
  if not overrides:
    return "default"
  keys = sorted(overrides)
  shorts = _short_keys(keys)
  raw = "_".join(f"{shorts[key]}={format_value(overrides[key])}" for key in keys)
  safe = _UNSAFE.sub("-", raw).strip(".-") or "point"
  digest = hashlib.sha1(canonical(overrides).encode()).hexdigest()[:8]
  if safe != raw or len(safe) > MAX_NAME_LEN:
    safe = f"{safe[:MAX_NAME_LEN - 9]}-{digest}"
  return safe


def name_points(points: Sequence[Mapping[str, Any]]) -> list[tuple[str, Overrides]]:
  """(name, overrides) for every point; duplicated points are an error naming both."""
  named, seen = [], {}
  for index, point in enumerate(points):
    name = point_name(point)
    if name in seen:
      raise ValueError(f"sweep points {seen[name]} and {index} have the same overrides/name {name!r}: {dict(point)}")
    seen[name] = index
    named.append((name, dict(point)))
  return named


def split_config_path(config_path: str) -> tuple[str, str | None]:
  """`experiments/x.py:arg` -> ("experiments/x.py", "arg"); without ':' the arg is None (as config_flags does)."""
  path, sep, arg = config_path.partition(":")
  return path, (arg if sep else None)


def load_module(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  name = "sweep_config_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(config_path: str) -> ml_collections.ConfigDict:
  """What `--config=<config_path>` gives tools/train.py: get_config(arg), locked."""
  path, arg = split_config_path(config_path)
  module = load_module(path)
  config = module.get_config(arg) if arg is not None else module.get_config()
  config.lock()
  return config


def load_sweep(config_path: str) -> list[tuple[str, Overrides]]:
  """The named points of the file's sweep(); sweep(arg) receives the config arg when it takes a parameter."""
  path, arg = split_config_path(config_path)
  module = load_module(path)
  sweep_fn = getattr(module, "sweep", None)
  if sweep_fn is None:
    raise ValueError(f"config file {path!r} defines no sweep(); add `def sweep(): yield {{...}}` next to get_config")
  takes_arg = bool(inspect.signature(sweep_fn).parameters)
  points = sweep_fn(arg) if takes_arg else sweep_fn()
  points = list(points or [])
  if not points:
    raise ValueError(f"{path}:sweep() yielded no points")
  for point in points:
    if not isinstance(point, Mapping):
      raise TypeError(f"{path}:sweep() yielded {point!r}; expected dicts of dotted config keys to values")
  return name_points(points)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of the (locked) config with dotted overrides set; unknown keys and wrong types name the key."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.lock()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise KeyError(f"override {key}={value!r}: config has no section {'.'.join(parents[:depth + 1])!r}")
      node = node[part]
    if leaf not in node:
      raise KeyError(f"override {key}={value!r}: config has no key {key!r}; known keys of "
                     f"{'.'.join(parents) or 'the config'}: {sorted(node.keys())}")
    try:
      node[leaf] = value
    except TypeError as e:
      raise TypeError(f"override {key}={value!r}: {e}") from e
  return config


def iter_override_flags(overrides: Mapping[str, Any]) -> Iterator[str]:
  for key, value in overrides.items():
    yield f"--config.{key}={format_value(value)}"
