"""Byte-range reads of large line-oriented exports (JSONL, CSV), so one file can be read by many workers.

`plan(path, split_bytes)` cuts a file into ranges [start, end). A range owns the records whose first byte lies in
it, so the ranges of a file together read each record exactly once, and exactly as `formats.read_file` reads the
whole file (same per-line / per-row code, same counts):
  - JSONL: a record is a line. A file is JSONL when its first non-blank line is a JSON value and another non-blank
    line follows, which is exactly when the whole file does not parse as one JSON value (the test
    `formats.read_file` applies); other JSON files are read whole.
  - CSV: a record is a row; rows start after a line break outside quotes (RFC 4180, as Python's csv module writes
    them). A range learns whether it starts inside a quoted field from the number of `"` bytes before it
    (`count_quotes` of the earlier ranges, a cheap parallel pass) and skips to the next row start.
Archive files (`tweets.js`) and whole-value JSON files are one range each (`end` = None: read by `read_file`).
"""

import collections
import csv
import dataclasses
import io
import json
import os
from typing import Iterator

import numpy as np
from etils import epath

from tweetjax.data import formats

SPLIT_BYTES = 64 << 20  # default range size: large enough to amortize a task, small enough to spread a big file
_HEAD_BYTES = formats.MAX_RECORD_BYTES + 2  # enough to hold the first line of a JSONL file, or see it is too long
_QUOTE, _LF, _CR = ord('"'), ord("\n"), ord("\r")


@dataclasses.dataclass(frozen=True)
class Range:
  path: str
  kind: str  # "jsonl" | "csv" | "whole"
  start: int = 0
  end: int | None = None  # None: the whole file through formats.read_file
  index: int = 0  # position among the ranges of its file (0 counts the file in files/<format>)


def _is_jsonl(head: bytes) -> bool:
  lines = (line for line in head.split(b"\n"))
  first = next((line for line in lines if line.strip()), None)
  # One line is a whole JSON document, not parsed here: a v2 page is one ~60 KB line, and parsing each one cost the
  # driver ~5 s of a 2M-tweet build.
  if first is None or not any(line.strip() for line in lines):
    return False
  try:
    json.loads(first.decode("utf-8"))
  except ValueError:  # bad UTF-8, or not one JSON value
    return False
  return True


def _open(path: str):
  return epath.Path(path).open("rb")  # local files, or gs://... etc. where etils has the backend


def kind_of(path: str | os.PathLike) -> str:
  with _open(path) as f:
    head = f.read(_HEAD_BYTES)
  kind = formats.detect_format(str(path), head)
  if kind == "csv":
    return "csv"
  if kind == "json" and _is_jsonl(head[:head.rfind(b"\n") + 1] if len(head) == _HEAD_BYTES else head):
    return "jsonl"
  return "whole"


def plan(path: str | os.PathLike, split_bytes: int = SPLIT_BYTES) -> list[Range]:
  """The ranges of one file (one range unless it is a JSONL/CSV file larger than `split_bytes` > 0)."""
  path = os.fspath(path)
  kind = kind_of(path)
  size = epath.Path(path).stat().length
  if kind == "whole" or split_bytes <= 0 or size <= split_bytes:
    return [Range(path, "whole")]
  starts = list(range(0, size, split_bytes))
  return [Range(path, kind, s, min(s + split_bytes, size), i) for i, s in enumerate(starts)]


def count_quotes(rng: Range) -> int:
  """The number of `"` bytes in the range (CSV row starts depend on the quote parity before them)."""
  total = 0
  with _open(rng.path) as f:
    f.seek(rng.start)
    left = rng.end - rng.start
    while left > 0:
      chunk = f.read(min(left, 8 << 20))
      total += int(np.count_nonzero(np.frombuffer(chunk, np.uint8) == _QUOTE))
      left -= len(chunk)
  return total


def _first_line_start(f, start: int) -> int:
  """The first line start at or after `start` (a line starts at 0 or after a \\n)."""
  if start == 0:
    return 0
  f.seek(start - 1)
  f.readline()
  return f.tell()


def _read_jsonl(rng: Range, stats: collections.Counter) -> Iterator[formats.Record]:
  with _open(rng.path) as f:
    pos = _first_line_start(f, rng.start)
    f.seek(pos)
    while pos < rng.end:
      line = f.readline()
      if not line:
        break
      pos += len(line)
      yield from formats.line_records(line.rstrip(b"\n") if line.endswith(b"\n") else line, stats)


def _first_row_start(f, start: int, quotes_before: int) -> int:
  """The first CSV row start at or after `start`: after a \\n, \\r\\n or \\r outside quotes."""
  f.seek(start - 1)
  in_quotes = (quotes_before - (f.read(1) == b'"')) % 2 == 1  # parity at start - 1
  f.seek(start - 1)
  pos = start - 1
  while True:
    chunk = f.read(1 << 16)
    if not chunk:
      return pos
    for i, b in enumerate(chunk):
      here = pos + i
      if b == _QUOTE:
        in_quotes = not in_quotes
      elif not in_quotes and (b == _LF or b == _CR) and here + 1 >= start:
        if b == _CR:  # \r\n is one break: the row starts after the \n
          f.seek(here + 1)
          if f.read(1) == b"\n":
            return here + 2
        return here + 1
    pos += len(chunk)


class _LineOffsets:
  """Text lines of a binary file from `pos` on (csv module line semantics), remembering where each line starts."""

  def __init__(self, f, pos: int):
    f.seek(pos)
    self._text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    self.pos = self.line_start = pos

  def __iter__(self):
    return self

  def __next__(self) -> str:
    line = self._text.readline()
    if not line:
      raise StopIteration
    self.line_start = self.pos
    self.pos += len(line.encode("utf-8", "surrogateescape"))
    return line


def _read_csv(rng: Range, stats: collections.Counter, quotes_before: int) -> Iterator[formats.Record]:
  with _open(rng.path) as f:
    header_lines = _LineOffsets(f, 0)
    fieldnames = formats.csv_reader(header_lines, rng.path).fieldnames
    data_start = header_lines.pos
  with _open(rng.path) as f:
    pos = data_start if rng.start <= data_start else _first_row_start(f, rng.start, quotes_before)
    lines = _LineOffsets(f, pos)
    reader = csv.reader(lines)
    width = len(fieldnames)
    while lines.pos < rng.end:  # the csv reader pulls a row's lines only as it needs them
      row = next(reader, None)
      if row is None:
        break
      if not row:  # a blank line, skipped as csv.DictReader does
        continue
      d = dict(zip(fieldnames, row))
      if len(row) > width:
        d[None] = row[width:]
      for k in fieldnames[len(row):]:
        d[k] = None
      yield from formats.csv_row_record(d, stats)


def read(rng: Range, stats: collections.Counter, quotes_before: int = 0) -> Iterator[formats.Record]:
  """The records a range owns; `quotes_before`: `"` bytes before `rng.start` (CSV only)."""
  if rng.kind == "whole":
    yield from formats.read_file(epath.Path(rng.path), stats)
    return
  if rng.index == 0:
    stats[f"files/{rng.kind}"] += 1
  if rng.kind == "jsonl":
    yield from _read_jsonl(rng, stats)
  else:
    yield from _read_csv(rng, stats, quotes_before)
