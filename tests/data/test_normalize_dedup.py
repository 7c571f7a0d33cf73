"""Normalization golden cases, PII scrub, options, and exact/near dedup counts."""

import collections

import numpy as np
import pytest

from tweetjax.data import builder, dedup, formats
from tweetjax.data.normalize import NormalizeConfig, normalize, normalize_batch

GOLDEN = [
    ("RT @bob: fish &amp; chips &lt;3 https://t.co/AbC123xyz", "RT @user: fish & chips <3 <url>"),
    ("  many\n\n spaces\t here  ", "many spaces here"),
    ("cafe\u0301 😀🔥 #Tag", "café 😀🔥 #Tag"),
    ("write to jane.doe+x@mail.example.co.uk now", "write to <email> now"),
    ("call (555) 123-4567 or +44 20 7946 0958 or 555.123.4567 or 5551234567", "call <phone> or <phone> or <phone> or <phone>"),
    ("score 3-1 on 2023-10-05, id 1234567890123456789, £20", "score 3-1 on 2023-10-05, id 1234567890123456789, £20"),
    ("see www.example.com/@alice and medium.com/@bob", "see <url> and medium.com/@user"),
    ("ctrl\x07chars\x00gone", "ctrlcharsgone"),
    # edges of the fast paths: URL case (and U+017F, which re.IGNORECASE folds to s), mention boundaries, Unicode
    # digits, whitespace that only appears after unescaping, numbers that are not phones
    ("HTTPS://Example.com/x, WwW.x.org and http\u017f://y.io", "<url> <url> and <url>"),
    ('www.x/http://y,HTTP://Www.z "http://q"<WWW.r>https:// www.', '<url> "<url>"<<url>>https:// www.'),
    ("@a x.@b c@d @@e (@f) @abcdefghijklmnopq", "@user x.@b c@d @@e (@user) @abcdefghijklmnopq"),
    ("call \u0665\u0665\u0665-\u0661\u0662\u0663-\u0664\u0665\u0666\u0667 or \uff15\uff15\uff15\uff11\uff12\uff13\uff14\uff15\uff16\uff17",
     "call <phone> or <phone>"),
    ("a&nbsp;&nbsp;b\r\n\u3000c&#12;d\x0b e\u2028", "a b c d e"),
    ("id+555-123-4567 x5551234567 555-123-45678 +1 2 3", "id+555-123-4567 x5551234567 555-123-45678 <phone>"),
]


@pytest.mark.parametrize("raw,want", GOLDEN)
def test_golden(raw, want):
  assert normalize(raw) == want
  assert normalize(want) == want  # fixed point


def test_batch_equals_single():
  raws = [r for r, _ in GOLDEN] + ["", "&#0;", "a\x00b"]
  assert normalize_batch(raws) == [normalize(r) for r in raws]


def test_ascii_patterns_equal_unicode_patterns():
  # An all-ASCII batch uses the re.ASCII patterns; "&eacute;" turns the batch non-ASCII after unescaping, so the
  # same texts then go through the Unicode patterns.
  raws = [r for r, _ in GOLDEN if r.isascii()] + ["x_1@a-b.io 555 123 4567\t+1 (20) 7946", "www.a\x1cb http://c d"]
  for config in (NormalizeConfig(), NormalizeConfig(urls="remove", collapse_whitespace=False)):
    assert normalize_batch(raws + ["&eacute;"], config)[:-1] == normalize_batch(raws, config)


def test_options():
  raw = "@bob see https://t.co/x1 &amp; mail a@b.com"
  assert normalize(raw, NormalizeConfig(urls="keep", mentions="keep", scrub_pii=False)) == \
      "@bob see https://t.co/x1 & mail a@b.com"
  assert normalize(raw, NormalizeConfig(urls="remove", unescape_html=False)) == "@user see &amp; mail <email>"
  assert NormalizeConfig.from_dict({"urls": "keep"}).urls == "keep"
  with pytest.raises(ValueError, match="unknown normalize options"):
    NormalizeConfig.from_dict({"url": "keep"})
  with pytest.raises(ValueError):
    NormalizeConfig(urls="drop")


def _rec(i, text, **kw):
  r = {"id": str(i), "text": text, "author_id": "", "lang": "en", "created_at": "", "conversation_id": "",
       "reply_to_id": "", "is_retweet": False, "toxicity": -1, "spam": -1, "misinformation": -1, "topic": "",
       "audience": ""}
  r.update(kw)
  return r


BASE = ["the striker scored twice in the derby and the crowd went wild tonight",
        "new compiler release fixes the kernel bug we hit last week, upgrade now",
        "ramen and dumplings for brunch again because nothing beats a rainy sunday",
        "heatwave warning for the whole weekend so stay hydrated and find some shade"]


def test_dedup_counts():
  recs = [_rec(i, t) for i, t in enumerate(BASE)]
  recs += [_rec(10, BASE[0]), _rec(11, BASE[1] + "  "), _rec(12, BASE[2].replace("ramen", "Ramen", 1) + "!!")]
  recs += [_rec(13, BASE[3] + " 🔥"), _rec(14, "RT @x: " + BASE[0], is_retweet=True), _rec(15, "short", lang="fr")]
  recs += [_rec(3, "same id as an earlier tweet but other text entirely, should be dropped")]
  stats = collections.Counter()
  kept = builder.clean_records([dict(r) for r in recs], builder.BuildConfig(langs=("en",)), stats)
  assert [r["id"] for r in kept] == ["0", "1", "2", "3"]
  assert (stats["duplicate"], stats["near_duplicate"], stats["retweet"], stats["lang"], stats["duplicate_id"]) == \
      (2, 2, 1, 1, 1)
  stats = collections.Counter()
  kept = builder.clean_records([dict(r) for r in recs], builder.BuildConfig(dedup_near=False, keep_retweets=True),
                               stats)
  assert len(kept) == 8 and stats["duplicate"] == 2 and stats["near_duplicate"] == 0


def test_minhash_deterministic_and_estimates_jaccard():
  a, b = BASE[0], BASE[0].replace("twice", "three times")
  s1 = dedup.MinHasher(num_perm=256)([a, b, BASE[1]])
  s2 = dedup.MinHasher(num_perm=256)([a, b, BASE[1]])
  np.testing.assert_array_equal(s1, s2)
  est = (s1[0] == s1[1]).mean()
  assert abs(est - dedup.jaccard(a, b)) < 0.1
  assert (s1[0] == s1[2]).mean() < 0.1
  recs = [_rec(i, t) for i, t in enumerate([a, b, BASE[1], "x", a + "!!", "y"])]
  assert dedup.near_duplicates(recs, dedup.NearDuplicateLSH()) == {dedup.rank(recs[4])}  # a + "!!" -> a


def test_bucket_rule_is_order_and_partition_independent():
  rng = np.random.default_rng(0)
  buckets_M = rng.integers(0, 40, 600).astype(np.uint64)
  ranks_M = [dedup.rank({"id": f"{i % 7}x{i}", "created_at": f"2023-03-0{1 + i % 3}T00:00:0{i % 10}Z" if i % 5 else ""})
             for i in rng.integers(0, 300, 600)]
  as_str = dict(zip(dedup.rank_bytes(ranks_M).tolist(), ranks_M))
  pairs = {(as_str[m], as_str[r]) for m, r in dedup.bucket_pairs(buckets_M, dedup.rank_bytes(ranks_M))}
  members = collections.defaultdict(set)
  for b, r in zip(buckets_M.tolist(), ranks_M):
    members[b].add(r)
  want = {(m, min(rs)) for rs in members.values() for m in rs if m != min(rs)}  # each bucket's smallest rank
  assert pairs == want
  perm = rng.permutation(600)
  parts = [perm[buckets_M[perm] % 3 == p] for p in range(3)]  # buckets split over 3 partitions, shuffled
  assert {(as_str[m], as_str[r]) for i in parts
          for m, r in dedup.bucket_pairs(buckets_M[i], dedup.rank_bytes([ranks_M[j] for j in i]))} == pairs
  assert dedup.rank_bytes(ranks_M).argsort(kind="stable").tolist() == sorted(range(600), key=ranks_M.__getitem__)


def _bucket_pairs_by_lexsort(buckets_M, ranks_M):
  """The rule as one sort by (bucket, rank): the representative is each bucket's first entry."""
  order_M = np.lexsort((ranks_M, buckets_M))
  b_M, r_M = buckets_M[order_M], ranks_M[order_M]
  starts_M = np.ones(len(b_M), bool)
  starts_M[1:] = b_M[1:] != b_M[:-1]
  rep_M = np.maximum.accumulate(np.where(starts_M, np.arange(len(b_M)), 0))
  members = np.flatnonzero(~starts_M & (r_M != r_M[rep_M]))
  return set(zip(order_M[members].tolist(), order_M[rep_M[members]].tolist()))


@pytest.mark.parametrize("seed", range(4))
def test_bucket_pairs_match_a_full_sort_where_rank_prefixes_tie(seed):
  rng = np.random.default_rng(seed)
  m = 5000
  buckets_M = rng.integers(0, 300, m).astype(np.uint64)
  # few times and ids sharing long prefixes: most 8-byte prefixes tie; repeated ranks tie in full
  ranks = [dedup.rank({"id": f"17{i:013d}"[:int(rng.integers(3, 16))], "created_at":
                       "" if i % 11 == 0 else f"2023-03-01T00:00:0{i % 3}Z"}) for i in rng.integers(0, 2000, m)]
  ranks_M = dedup.rank_bytes(ranks)
  member, rep = dedup.bucket_pair_indices(buckets_M, ranks_M)
  assert set(zip(member.tolist(), rep.tolist())) == _bucket_pairs_by_lexsort(buckets_M, ranks_M)
  assert len(member) == len(set(member.tolist())) > 1000  # each member once, and many pairs
  # a full tie with the representative is no pair; the earliest of equal smallest ranks represents the bucket
  assert not (ranks_M[member] == ranks_M[rep]).any()
  assert dedup.bucket_pair_indices(buckets_M[:1], ranks_M[:1])[0].size == 0


@pytest.mark.parametrize("num_perm,bands", [(64, 16), (48, 12)])  # 48: a sketch word only partly used
def test_sketch_test_never_rules_out_a_similar_pair(num_perm, bands):
  rng = np.random.default_rng(num_perm)
  lsh = dedup.NearDuplicateLSH(threshold=0.7, num_perm=num_perm, bands=bands)
  a_MxP = rng.integers(0, 2**32, (600, num_perm), dtype=np.uint32)
  b_MxP = a_MxP.copy()
  change_MxP = rng.random((600, num_perm)) < rng.random((600, 1))  # each row agrees on a different share
  high_only_M = np.arange(600) % 2 == 0  # these rows change only above the sketch's bits
  new_MxP = rng.integers(0, 2**32, (600, num_perm), dtype=np.uint32)
  new_MxP[high_only_M] = (new_MxP[high_only_M] & ~np.uint32(3)) | (a_MxP[high_only_M] & np.uint32(3))
  b_MxP[change_MxP] = new_MxP[change_MxP]
  may_M = lsh.may_be_similar(lsh.sketches(a_MxP), lsh.sketches(b_MxP))
  similar_M = lsh.similar(a_MxP, b_MxP)
  low_agree_M = np.count_nonzero((a_MxP & 3) == (b_MxP & 3), axis=1)
  np.testing.assert_array_equal(may_M, low_agree_M >= 0.7 * num_perm)
  assert not (similar_M & ~may_M).any()
  assert similar_M.sum() > 50 and (may_M & ~similar_M).sum() > 50 and (~may_M).sum() > 50
