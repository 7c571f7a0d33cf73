"""Readers for real Twitter exports, one uniform record per tweet.

Formats (detected per file from its content, not its name, except `.csv`):
  v2       API v2 responses `{"data": [...], "includes": ..., "meta": ...}`, one per file or one per line.
  v1       API v1.1 statuses: a JSON array, `{"statuses": [...]}`, or one status per line.
  archive  the account archive `data/tweets.js` (`window.YTD.tweets.part0 = [{"tweet": {...}}, ...]`).
  jsonl    in-house dumps, one object per line with a `text` field (same code path as v1 lines).
  csv      in-house dumps with a header row that has a `text` column.
A file matching none of these raises `FormatError` naming the file.

Every tweet becomes a `Record` dict with the fields of `RECORD_FIELDS`. Bad records never raise: they are
counted in a `collections.Counter` under one of `SKIP_REASONS` and skipped.

Labels (`toxicity`, `spam`, `misinformation`: ints, -1 unknown; `topic`, `audience`: strings, "" unknown) are
read from a `labels` object on the tweet or from top-level keys / CSV columns of the same names.
`includes.tweets` of v2 responses are context only (quoted/replied-to tweets) and are not emitted.
"""

import collections
import csv
import datetime
import hashlib
import io
import json
import os
import re
from typing import Any, Generator, Iterator

from etils import epath

MAX_RECORD_BYTES = 1 << 20  # a line or a text this large is a broken export, not a tweet
SKIP_REASONS = ("malformed_json", "wrong_type", "missing_text", "invalid_utf8", "too_large")
LABEL_INTS = ("toxicity", "spam", "misinformation")
LABEL_STRS = ("topic", "audience")
RECORD_FIELDS = ("id", "text", "author_id", "lang", "created_at", "conversation_id", "reply_to_id",
                 "is_retweet") + LABEL_INTS + LABEL_STRS

Record = dict[str, Any]


class FormatError(ValueError):
  """A file that is none of the supported Twitter export formats."""


class _Skip(Exception):

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _id(value: Any, field: str) -> str:
  if value is None:
    return ""
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise _Skip("wrong_type")
  return str(value)


def _opt_str(value: Any) -> str:
  return value if isinstance(value, str) else ""


def _label_int(value: Any) -> int:
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int):
    return value
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    return int(value)
  return -1


_TIME_FORMATS = ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ", "%a %b %d %H:%M:%S %z %Y", "%Y-%m-%d %H:%M:%S")
_MONTHS = {m: i + 1 for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                                           "Nov", "Dec"))}
# The two forms the APIs write, parsed without strptime (its per-call cost was the largest single item in a build's
# profile); anything else, or a field out of range, goes through _TIME_FORMATS, which decide the result.
_V2_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]{1,6})?Z")
_V1_TIME = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (" + "|".join(_MONTHS) +
                      r") ([0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) \+0000 ([0-9]{4})")


def _api_time_fields(value: str) -> tuple[int, ...] | None:
  m = _V2_TIME.fullmatch(value)
  if m:
    return tuple(map(int, m.groups()))
  m = _V1_TIME.fullmatch(value)
  if m:
    month, day, hour, minute, second, year = m.groups()
    return int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second)
  return None


def _iso_time(value: Any) -> str:
  """ISO-8601 UTC (`2020-01-31T12:00:00Z`) from v2 ISO or v1.1 `Wed Oct 10 20:19:24 +0000 2018`; "" if unknown."""
  if not isinstance(value, str) or not value:
    return ""
  fields = _api_time_fields(value)
  if fields is not None:
    try:
      return datetime.datetime(*fields).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
      pass
  for fmt in _TIME_FORMATS:
    try:
      t = datetime.datetime.strptime(value, fmt)
    except ValueError:
      continue
    if t.tzinfo is not None:
      try:
        t = t.astimezone(datetime.timezone.utc).replace(tzinfo=None)
      except OverflowError:  # year 1 or 9999 shifted out of range
        return ""
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
  return ""


def tweet_record(obj: Any) -> Record:
  """One uniform record from a v2 tweet, a v1.1 status, an archive tweet or an in-house row; raises _Skip."""
  if not isinstance(obj, dict):
    raise _Skip("wrong_type")
  if isinstance(obj.get("tweet"), dict):  # archive element
    obj = obj["tweet"]
  text = obj.get("text")
  if "full_text" in obj:
    text = obj["full_text"]
  ext = obj.get("extended_tweet")
  if isinstance(ext, dict) and isinstance(ext.get("full_text"), str):
    text = ext["full_text"]
  note = obj.get("note_tweet")
  if isinstance(note, dict) and isinstance(note.get("text"), str):
    text = note["text"]  # v2: the untruncated long-tweet text
  if text is None:
    raise _Skip("missing_text")
  if not isinstance(text, str):
    raise _Skip("wrong_type")
  if not text.strip():
    raise _Skip("missing_text")
  try:
    n_bytes = len(text.encode("utf-8"))
  except UnicodeEncodeError:  # lone surrogates from \ud83d-style escapes cannot be UTF-8
    raise _Skip("invalid_utf8") from None
  if n_bytes >= MAX_RECORD_BYTES:
    raise _Skip("too_large")
  tweet_id = _id(obj.get("id_str", obj.get("id")), "id")
  if not tweet_id:  # in-house rows may have no id: a content hash keeps the split stable
    tweet_id = "h" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
  user = obj.get("user")
  author = obj.get("author_id")
  if author is None and isinstance(user, dict):
    author = user.get("id_str", user.get("id"))
  refs = obj.get("referenced_tweets")
  refs = [r for r in refs if isinstance(r, dict)] if isinstance(refs, list) else []
  reply_to = obj.get("in_reply_to_status_id_str", obj.get("in_reply_to_status_id", obj.get("reply_to_id")))
  for ref in refs:
    if ref.get("type") == "replied_to" and reply_to is None:
      reply_to = ref.get("id")
  is_retweet = (bool(obj.get("retweeted_status")) or any(r.get("type") == "retweeted" for r in refs)
                or text.startswith("RT @"))
  labels = obj.get("labels") if isinstance(obj.get("labels"), dict) else obj
  record = {
      "id": tweet_id,
      "text": text,
      "author_id": _id(author, "author_id"),
      "lang": _opt_str(obj.get("lang")),
      "created_at": _iso_time(obj.get("created_at")),
      "conversation_id": _id(obj.get("conversation_id"), "conversation_id"),
      "reply_to_id": _id(reply_to, "reply_to_id"),
      "is_retweet": is_retweet,
  }
  for k in LABEL_INTS:
    record[k] = _label_int(labels.get(k))
  for k in LABEL_STRS:
    record[k] = _opt_str(labels.get(k))
  return record


def _tweets_in(value: Any) -> list[Any]:
  """The tweet objects inside one parsed JSON value (a response, a status list, or a single tweet)."""
  if isinstance(value, list):
    return value
  if isinstance(value, dict):
    if "data" in value and ("includes" in value or "meta" in value or isinstance(value["data"], list)):
      data = value["data"]
      return data if isinstance(data, list) else [data]
    if isinstance(value.get("statuses"), list):
      return value["statuses"]
    return [value]
  return [value]  # a scalar line: counted as a wrong_type record


def _format_of(value: Any) -> str:
  if isinstance(value, dict) and "data" in value:
    return "v2"
  if isinstance(value, dict) and "text" not in value and "full_text" not in value and "statuses" not in value:
    return "unknown"
  return "v1"


def _emit(tweets: list[Any], stats: collections.Counter) -> Iterator[Record]:
  for tweet in tweets:
    stats["read"] += 1
    try:
      yield tweet_record(tweet)
    except _Skip as skip:
      stats[skip.reason] += 1


def line_records(line: bytes, stats: collections.Counter) -> Generator[Record, None, bool]:
  """Yields the records of one JSONL line (bad lines are counted, never raised); returns whether it was JSON."""
  if not line.strip():
    return False
  if len(line) >= MAX_RECORD_BYTES:
    stats["read"] += 1
    stats["too_large"] += 1
    return False
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError:
    stats["read"] += 1
    stats["invalid_utf8"] += 1
    return False
  try:
    value = json.loads(text)
  except ValueError:
    stats["read"] += 1
    stats["malformed_json"] += 1
    return False
  yield from _emit(_tweets_in(value), stats)
  return True


def _read_lines(data: bytes, path: str, stats: collections.Counter) -> Iterator[Record]:
  parsed_any = False
  for line in data.split(b"\n"):
    parsed_any |= yield from line_records(line, stats)
  if not parsed_any and data.strip():
    raise FormatError(f"{path}: not a Twitter export (no JSON line in it; expected API v2/v1.1 JSON or JSONL, "
                      "an archive tweets.js, or a CSV with a 'text' column)")


def csv_reader(text_lines, path: str) -> csv.DictReader:
  reader = csv.DictReader(text_lines)
  if not reader.fieldnames or "text" not in reader.fieldnames:
    raise FormatError(f"{path}: CSV without a 'text' column (columns: {reader.fieldnames})")
  return reader


def csv_row_record(row: dict[str | None, Any], stats: collections.Counter) -> Iterator[Record]:
  """The record of one CSV row (a dict from csv.DictReader over text decoded with surrogateescape)."""
  stats["read"] += 1
  row = {k: v for k, v in row.items() if k is not None}
  if any(isinstance(v, str) and any("\udc80" <= c <= "\udcff" for c in v) for v in row.values()):
    stats["invalid_utf8"] += 1
    return
  for k in LABEL_INTS:
    if row.get(k) == "":
      row[k] = None
  for k in ("id", "author_id", "conversation_id", "reply_to_id"):
    if row.get(k) == "":
      row[k] = None
  try:
    yield tweet_record(row)
  except _Skip as skip:
    stats[skip.reason] += 1


def _read_csv(data: bytes, path: str, stats: collections.Counter) -> Iterator[Record]:
  # surrogateescape keeps bad bytes visible per row instead of failing the whole file
  for row in csv_reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""), path):
    yield from csv_row_record(row, stats)


def detect_format(path: str, data: bytes) -> str:
  head = data[:4096].lstrip()
  if head.startswith(b"window.YTD."):
    return "archive"
  if str(path).endswith(".csv"):
    return "csv"
  if head[:1] not in (b"{", b"["):
    if b"text" in head.split(b"\n", 1)[0] and not head.startswith((b"<", b"%")):
      return "csv"
    if head:
      raise FormatError(f"{path}: not a Twitter export (starts with {head[:40]!r})")
  return "json"


def read_file(path: str | epath.Path, stats: collections.Counter) -> Iterator[Record]:
  """Yields the records of one export file; counts skips in `stats` (and `files/<format>`)."""
  path = epath.Path(path)
  data = path.read_bytes()
  kind = detect_format(str(path), data)
  if kind == "csv":
    stats["files/csv"] += 1
    yield from _read_csv(data, str(path), stats)
    return
  if kind == "archive":
    stats["files/archive"] += 1
    body = data.split(b"=", 1)[1] if b"=" in data else b""
    try:
      value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
      stats["read"] += 1
      stats["invalid_utf8"] += 1
      return
    except ValueError:
      stats["read"] += 1
      stats["malformed_json"] += 1
      return
    yield from _emit(value if isinstance(value, list) else [value], stats)
    return
  try:
    value = json.loads(data.decode("utf-8"))
  except ValueError:  # includes UnicodeDecodeError: fall back to one JSON value per line
    stats["files/jsonl"] += 1
    yield from _read_lines(data, str(path), stats)
    return
  fmt = _format_of(value)
  if fmt == "unknown" and not isinstance(value, list):
    raise FormatError(f"{path}: JSON that is not a Twitter export (keys: {sorted(value)[:8]})")
  stats[f"files/{fmt}"] += 1
  yield from _emit(_tweets_in(value), stats)


def list_inputs(inputs: list[str] | str) -> list[epath.Path]:
  """Files under the given files or directories, sorted so builds are deterministic."""
  if isinstance(inputs, str):
    inputs = [s for s in inputs.split(",") if s]
  files = []
  for item in inputs:
    p = epath.Path(item)
    if p.is_dir():
      for root, dirs, names in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(epath.Path(root) / n for n in sorted(names)
                     if not n.startswith(".") and n.endswith((".json", ".jsonl", ".js", ".csv", ".ndjson")))
    elif p.exists():
      files.append(p)
    else:
      raise FileNotFoundError(f"input not found: {p}")
  return files


def read_inputs(inputs: list[str] | str, stats: collections.Counter) -> Iterator[Record]:
  for path in list_inputs(inputs):
    yield from read_file(path, stats)
