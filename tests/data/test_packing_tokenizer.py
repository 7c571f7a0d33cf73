"""Packing layout invariants, efficiency and long-document splitting; tokenizer golden round trip."""

import pathlib

import numpy as np
import pytest

from tweetjax.data import packing
from tweetjax.data.tokenizer import Tokenizer

FIX = pathlib.Path(__file__).parent / "fixtures"
BOS, EOS = 1, 2


def _tweet_docs(n, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.lognormal(3.3, 0.55, n), 1, 280).astype(int)  # ~10..80 tokens, like tweets
  return [rng.integers(5, 1000, k).tolist() for k in lengths]


def _check_layout(batch, docs):
  """Rebuild every document from the rows; checks segments, positions, targets and that nothing is lost."""
  L = batch["inputs"].shape[1]
  pieces = []
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    n_real = int((seg > 0).sum())
    assert (seg[n_real:] == 0).all() and (batch["weights"][r] == (seg > 0)).all()
    assert (batch["inputs"][r][n_real:] == 0).all() and (batch["positions"][r][n_real:] == 0).all()
    for s in np.unique(seg[seg > 0]):
      idx = np.nonzero(seg == s)[0]
      assert (np.diff(idx) == 1).all()  # contiguous
      np.testing.assert_array_equal(batch["positions"][r][idx], np.arange(len(idx)))  # restart at 0
      x, y = batch["inputs"][r][idx], batch["targets"][r][idx]
      np.testing.assert_array_equal(x[1:], y[:-1])  # targets are the next inputs, within the segment only
      pieces.append((x.tolist(), y.tolist()))
  # every document's (input, target) pairs appear exactly once, chunked in order
  want = sorted([tuple(d[i:i + 2]) for d in ([BOS] + doc + [EOS] for doc in docs) for i in range(len(d) - 1)])
  got = sorted((a, b) for x, y in pieces for a, b in zip(x, y))
  assert got == [tuple(p) for p in want]
  assert L == batch["targets"].shape[1]


def test_golden_layout():
  b = packing.pack([[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18]], 8, BOS, EOS)
  np.testing.assert_array_equal(b["inputs"], [[1, 9, 10, 11, 12, 13, 14, 15], [1, 5, 6, 7, 16, 17, 18, 0],
                                              [1, 8, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["targets"], [[9, 10, 11, 12, 13, 14, 15, 16], [5, 6, 7, 2, 17, 18, 2, 0],
                                               [8, 2, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["segment_ids"], [[1] * 8, [1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["positions"], [list(range(8)), [0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 0, 0, 0, 0, 0]])
  assert b["weights"].dtype == np.float32 and b["inputs"].dtype == np.int32
  assert b["segment_ids"].dtype == np.int32 and b["positions"].dtype == np.int32


def test_layout_invariants_and_efficiency_at_512():
  docs = _tweet_docs(4096)
  b = packing.pack(docs, 512, BOS, EOS)
  _check_layout(b, docs)
  assert packing.efficiency(b) >= 0.99, packing.efficiency(b)


def test_long_document_is_split_not_dropped():
  docs = [list(range(5, 5 + 1000)), [7, 8], list(range(5, 5 + 30))]
  b = packing.pack(docs, 64, BOS, EOS)
  _check_layout(b, docs)
  assert int(b["weights"].sum()) == sum(len(d) + 1 for d in docs)


def test_tokenizer_golden_round_trip():
  tok = Tokenizer(FIX / "tokenizer.model")
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (0, 1, 2, 3, 600)
  for i, sym in enumerate(["<url>", "@user", "<sep>", "<email>", "<phone>"]):
    assert tok.piece_to_id(sym) == 4 + i
  s = "the striker was amazing tonight <url> @user <sep> <email> <phone> 😀 naïve Ω"
  assert tok.encode(s) == [266, 417, 290, 269, 368, 356, 265, 4, 265, 5, 265, 6, 265, 7, 265, 8, 265, 249, 168, 161,
                           137, 389, 408, 204, 184, 544, 272, 265, 215, 178]
  texts = [s, "", "漢字とカタカナ", "tabs\tand  spaces", "🏳️‍🌈 zwj"]
  ids = tok.encode_batch(texts)
  assert all(tok.unk_id not in x for x in ids)  # byte fallback: nothing is unknown
  assert tok.decode_batch(ids)[:3] == texts[:3]
  assert tok.decode(tok.encode(texts[4])) == texts[4]


def test_missing_tokenizer_names_path(tmp_path):
  missing = tmp_path / "nope" / "tok.model"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    Tokenizer(missing)
