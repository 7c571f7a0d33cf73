"""Export readers on hand-written fixtures, format errors, and a 10,000-record corruption fuzz."""

import collections
import json
import pathlib
import random

import pytest

from tweetjax.data import formats

FIX = pathlib.Path(__file__).parent / "fixtures"


def _read(name):
  stats = collections.Counter()
  return {r["id"]: r for r in formats.read_file(FIX / name, stats)}, stats


def test_v2_response_retweet_quote_reply_note_tweet():
  recs, stats = _read("v2_response.json")
  assert stats["files/v2"] == 1 and stats["read"] == 5 and len(recs) == 5
  plain = recs["1700000000000000001"]
  assert plain["author_id"] == "11" and plain["lang"] == "en" and plain["created_at"] == "2023-11-08T10:00:00Z"
  assert (plain["toxicity"], plain["topic"], plain["audience"]) == (0, "sports", "fans")
  assert recs["1700000000000000002"]["is_retweet"]
  assert not recs["1700000000000000003"]["is_retweet"]  # a quote is the quoting user's own text
  reply = recs["1700000000000000004"]
  assert reply["reply_to_id"] == "1700000000000000001" and reply["conversation_id"] == "1700000000000000001"
  assert (reply["toxicity"], reply["spam"], reply["topic"]) == (1, -1, "")
  assert recs["1700000000000000005"]["text"].endswith("full text only in note_tweet.")


def test_v2_jsonl_and_v1():
  recs, stats = _read("v2_stream.jsonl")
  assert stats["files/jsonl"] == 1 and set(recs) == {"1700000000000000101", "1700000000000000102"}
  recs, stats = _read("v1_statuses.json")
  assert stats["files/v1"] == 1 and len(recs) == 4
  assert recs["1600000000000000001"]["text"].endswith("extended_tweet full_text.")
  assert recs["1600000000000000001"]["created_at"] == "2018-10-10T20:19:24Z"
  assert recs["1600000000000000001"]["author_id"] == "31"
  assert recs["1600000000000000002"]["is_retweet"]
  assert recs["1600000000000000003"]["reply_to_id"] == "1600000000000000001"
  recs, _ = _read("v1_search.json")
  assert recs["1600000000000000010"]["lang"] == "de"


def test_archive_csv_jsonl():
  recs, stats = _read("archive/data/tweets.js")
  assert stats["files/archive"] == 1 and len(recs) == 2
  assert recs["1500000000000000001"]["text"] == "My first tweet from the archive &lt;3"  # unescaped later
  assert recs["1500000000000000002"]["is_retweet"] and recs["1500000000000000001"]["toxicity"] == -1
  recs, stats = _read("inhouse.csv")
  assert stats["files/csv"] == 1
  assert recs["9001"]["spam"] == 1 and recs["9001"]["topic"] == "food"
  assert recs["9002"]["text"] == "Multi-line\ntext, with a comma" and recs["9002"]["toxicity"] == -1
  recs, _ = _read("inhouse.jsonl")
  assert recs["9101"]["toxicity"] == 1 and len(recs) == 2
  no_id = [r for r in recs.values() if r["text"] == "a row without an id"][0]
  assert no_id["id"].startswith("h") and len(no_id["id"]) == 17


def test_read_inputs_directory_walks_all_fixtures():
  stats = collections.Counter()
  recs = list(formats.read_inputs([str(FIX)], stats))
  assert len(recs) == 5 + 2 + 4 + 1 + 2 + 2 + 2 and stats["read"] == len(recs)


@pytest.mark.parametrize("content,name", [(b"hello world\nnot a tweet\n", "notes.txt"),
                                          (b"\x89PNG\r\n\x1a\n\x00\x00", "image.json"),
                                          (b'{"foo": 1}', "config.json"),
                                          (b"a,b\n1,2\n", "table.csv")])
def test_unknown_file_is_an_error_naming_it(tmp_path, content, name):
  p = tmp_path / name
  p.write_bytes(content)
  with pytest.raises(formats.FormatError, match=name):
    list(formats.read_file(p, collections.Counter()))


def _fuzz_lines(n, seed=0):
  """n corrupted-or-valid JSONL lines and the exact count per reason they must produce."""
  rng = random.Random(seed)
  lines, want = [], collections.Counter()
  for i in range(n):
    good = {"id": str(i), "text": f"tweet number {i} " + rng.choice(["ok", "😀", "café", "\u3042"]),
            "lang": "en"}
    raw = json.dumps(good, ensure_ascii=rng.random() < 0.5).encode()
    kind = rng.choice(["valid", "malformed_json", "wrong_type", "missing_text", "invalid_utf8"]
                      if i % 2000 else ["too_large"])
    if kind == "malformed_json":
      chars = raw.decode()  # cut on a character boundary: a cut inside UTF-8 would be invalid_utf8 instead
      line = chars[:rng.randrange(1, len(chars) - 1)].encode() if rng.random() < 0.7 else raw.replace(b'"text"', b"text", 1)
      if rng.random() < 0.2:
        line = b"{" + line
    elif kind == "wrong_type":
      bad = rng.choice([{"id": str(i), "text": 12345}, {"id": str(i), "text": ["a"]},
                        {"id": str(i), "text": {"t": 1}}, {"id": [1], "text": "x"}, 42, "just a string", True,
                        {"id": str(i), "text": "x", "author_id": {"a": 1}}])
      line = json.dumps(bad).encode()
    elif kind == "missing_text":
      line = json.dumps(rng.choice([{"id": str(i)}, {"id": str(i), "text": None}, {"id": str(i), "text": ""},
                                    {"id": str(i), "text": "  \n "}])).encode()
    elif kind == "invalid_utf8":
      if rng.random() < 0.8:
        cut = raw.index(b"tweet") + 3
        line = raw[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]) + raw[cut:]
      else:
        line = b'{"id": "%d", "text": "lone \\ud83d surrogate"}' % i
    elif kind == "too_large":
      line = json.dumps({"id": str(i), "text": "x" * (1 << 20)}).encode()
    else:
      line = raw
    lines.append(line)
    want[kind] += 1
  return lines, want


def test_fuzz_10k_corrupted_records_exact_counts(tmp_path):
  lines, want = _fuzz_lines(10_000)
  p = tmp_path / "fuzz.jsonl"
  p.write_bytes(b"\n".join(lines) + b"\n")
  stats = collections.Counter()
  kept = list(formats.read_file(p, stats))  # must not raise
  assert len(kept) == want["valid"]
  assert stats["read"] == 10_000
  for reason in formats.SKIP_REASONS:
    assert stats[reason] == want[reason], reason
  assert sum(want[r] for r in formats.SKIP_REASONS) > 5000


def test_api_times_parse_as_strptime_does(monkeypatch):
  rng = random.Random(0)
  cases = ["2020-02-29T00:00:00Z", "2021-02-29T00:00:00Z", "2020-01-31T12:00:00Z ", "2020-1-31T12:00:00Z",
           "2020-01-31 12:00:00", "Wed Oct 10  20:19:24 +0000 2018", "wed oct 10 20:19:24 +0000 2018",
           "Mon Jan 01 00:00:00 +0130 0001", "Fri Dec 31 23:59:59 -0100 9999", "\u0662\u0660\u0662\u0660-01-31T12:00:00Z"]
  for _ in range(1500):
    y, mo, d = rng.choice([0, 1, 999, 2020, 9999]), rng.randint(0, 13), rng.randint(0, 32)
    h, mi, s = rng.randint(0, 25), rng.randint(0, 61), rng.randint(0, 62)
    frac = rng.choice(["", ".0", ".000", ".123456", ".1234567", "."])
    cases.append(f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}Z")
    wd, mon, tz = rng.choice(["Mon", "Wed", "Xyz"]), rng.choice(["Jan", "Feb", "Oct", "Foo"]), rng.choice(
        ["+0000", "+0000", "-0500"])
    cases.append(f"{wd} {mon} {d:02d} {h:02d}:{mi:02d}:{s:02d} {tz} {y:04d}")
  got = [formats._iso_time(c) for c in cases]
  monkeypatch.setattr(formats, "_api_time_fields", lambda value: None)  # strptime alone
  assert got == [formats._iso_time(c) for c in cases]
  assert sum(map(bool, got)) > 500 and got[:2] == ["2020-02-29T00:00:00Z", ""]
