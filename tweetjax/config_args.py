"""Parses the argument string of a parameterised config: `--config=experiments/scaling.py:quick,steps=200`.

Everything after the first ':' of `--config` is passed to `get_config(arg)` (and to `sweep(arg)`). `parse_arg`
turns it into a ConfigDict: `key=value` pairs separated by commas; a bare `key` means `key=True`. The defaults
given as keyword arguments fix the known keys and their types, so `steps=2OO` or a mistyped key is an error that
names the key, not a silently different experiment.

  def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", steps=100, quick=False)
    ...
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def parse_arg(arg: str | None, *, lazy: bool = False, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "k=v,k2=v2,flag" into a ConfigDict on top of `defaults`.

  With lazy=False (default) every key must be one of `defaults` and values are converted to the default's type.
  With lazy=True unknown keys are accepted and their values parsed as Python literals (strings otherwise).
  Commas inside brackets or quotes do not split: `sizes=(64,128),name='a,b'`.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  for item in split_top_level(arg or ""):
    key, sep, text = item.partition("=")
    key = key.strip()
    if not key.isidentifier():
      raise ValueError(f"config arg {arg!r}: {key!r} is not a valid key (expected key=value pairs separated by ',')")
    if key in defaults:
      value = _convert(text.strip(), defaults[key], key, arg) if sep else _bare(key, defaults[key], arg)
    elif lazy:
      value = _literal(text.strip()) if sep else True
    else:
      raise ValueError(f"config arg {arg!r}: unknown key {key!r}; known keys are {sorted(defaults)}")
    if key in defaults:
      result[key] = value
    else:
      with result.unlocked():
        result[key] = value
  return result


def split_top_level(text: str) -> list[str]:
  """Splits on commas that are not inside (), [], {} or quotes; drops empty items."""
  items, depth, quote, current = [], 0, "", []
  for char in text:
    if quote:
      quote = "" if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      items.append("".join(current))
      current = []
      continue
    current.append(char)
  items.append("".join(current))
  return [item.strip() for item in items if item.strip()]


def _bare(key: str, default: Any, arg: str | None) -> Any:
  if isinstance(default, bool):
    return True
  raise ValueError(f"config arg {arg!r}: key {key!r} needs a value ({key}=...); only boolean keys may be bare")


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _convert(text: str, default: Any, key: str, arg: str | None) -> Any:
  expected = type(default).__name__
  try:
    if isinstance(default, bool):
      if text.lower() in _TRUE:
        return True
      if text.lower() in _FALSE:
        return False
      raise ValueError(text)
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, str):
      value = _literal(text)
      return value if isinstance(value, str) else text
    if isinstance(default, (tuple, list)):
      value = ast.literal_eval(text)
      value = value if isinstance(value, (tuple, list)) else (value,)
      return type(default)(value)
    if default is None:
      return _literal(text)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"config arg {arg!r}: {key}={text!r} is not a valid {expected}") from e
  raise TypeError(f"config arg {arg!r}: key {key!r} has a default of unsupported type {expected}")
