"""Paths from flags and configs, made absolute once where they enter.

A relative `--workdir=runs/x` or `--config.data.dataset_dir=data/tw` means "relative to the directory the command
was started in". Orbax refuses relative checkpoint paths, and child processes (sweep points, multi-process
launches) may start elsewhere, so every tool resolves its path flags and its config's path keys right after
parsing, and the config a run saves records the absolute paths.

Config keys holding paths are found by name: any string leaf called `*_dir`, `*_path`, `*_file` or listed in
EXTRA_PATH_KEYS, at any depth (also inside lists of ConfigDicts, e.g. data mixtures), and `*_files`, a
comma-separated list of paths (`data.sft.train_files`). A value that is empty, one of SPECIAL_VALUES (e.g.
`compilation_cache_dir="none"`) or a URL (`gs://...`) is left as it is.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import ml_collections

PATH_SUFFIXES = ("_dir", "_path", "_file")
PATH_LIST_SUFFIXES = ("_files",)  # comma-separated paths
EXTRA_PATH_KEYS = frozenset({"init_from"})
SPECIAL_VALUES = frozenset({"none"})  # compared lower-cased


def is_url(path: str) -> bool:
  """Whether `path` names a remote file system location (gs://, s3://, ...) rather than a local path."""
  return "://" in path


def absolute(path: str | None) -> str | None:
  """`path` relative to the current directory made absolute (`~` expanded); '', None and URLs unchanged."""
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def absolute_list(paths: Iterable[str]) -> list[str]:
  return [absolute(p) for p in paths]


def absolute_config_arg(config_arg: str) -> str:
  """`experiments/x.py[:arg]` with the file part made absolute (the argument after ':' is the config's own)."""
  path, sep, arg = config_arg.partition(":")
  return absolute(path) + sep + arg


def is_path_key(name: str) -> bool:
  return name.endswith(PATH_SUFFIXES + PATH_LIST_SUFFIXES) or name in EXTRA_PATH_KEYS


def _absolute_value(name: str, value: str) -> str:
  if name.endswith(PATH_LIST_SUFFIXES):
    return ",".join(absolute(p.strip()) for p in value.split(",") if p.strip())
  return absolute(value)


def resolve_config_paths(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Makes every path key of `config` absolute, in place (a locked config allows it: no key is added).

  Returns {dotted key: new value} for the keys that changed. Idempotent.
  """
  changed: dict[str, str] = {}

  def visit(node: Any, prefix: str) -> None:
    if isinstance(node, (ml_collections.ConfigDict, dict)):
      for name in list(node.keys()):
        value = node[name]
        key = f"{prefix}{name}"
        if isinstance(value, str):
          if is_path_key(str(name)) and value.lower() not in SPECIAL_VALUES:
            resolved = _absolute_value(str(name), value)
            if resolved != value:
              node[name] = resolved
              changed[key] = resolved
        else:
          visit(value, key + ".")
    elif isinstance(node, (list, tuple)):
      for i, item in enumerate(node):
        visit(item, f"{prefix[:-1]}[{i}].")

  visit(config, "")
  return changed


def absolute_override(key: str, value: Any) -> Any:
  """A `--config.<key>=<value>` override with a path value made absolute (other values unchanged)."""
  name = key.rsplit(".", 1)[-1]
  if isinstance(value, str) and is_path_key(name) and value.lower() not in SPECIAL_VALUES:
    return _absolute_value(name, value)
  return value


def resolve_path_flags(*holders) -> None:
  """Makes the values of absl string (or list) flags absolute, so every later `.value` reads the absolute path."""
  from absl import flags  # only tools parse flags

  for holder in holders:
    flag = flags.FLAGS[holder.name]
    value = flag.value
    if isinstance(value, (list, tuple)):
      flag.value = absolute_list(value)
    elif isinstance(value, str):
      flag.value = absolute(value)


def resolve_tool_paths(config: ml_collections.ConfigDict | None, *path_flags) -> None:
  """What every tool does first: its path flags and its config's path keys become absolute."""
  resolve_path_flags(*path_flags)
  if config is not None:
    resolve_config_paths(config)
