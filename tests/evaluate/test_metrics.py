"""Metric functions against hand-computed cases."""

import math

import numpy as np
import pytest

from tweetjax.evaluate import metrics


def test_precision_recall_f1():
  # tp = 2 (idx 0, 4), fp = 1 (idx 2), fn = 1 (idx 1)
  out = metrics.precision_recall_f1([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
  assert out == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
  # precision 1/3, recall 1/1: f1 = 2 * (1/3) / (4/3) = 0.5
  assert metrics.precision_recall_f1([0, 1, 0], [1, 1, 1])["f1"] == pytest.approx(0.5)
  assert metrics.precision_recall_f1([0, 0], [0, 0]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_roc_auc():
  # Pairs (pos, neg): (0.35, 0.1) yes, (0.35, 0.4) no, (0.8, 0.1) yes, (0.8, 0.4) yes -> 3/4.
  assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
  # A tie counts 1/2: (0.9 vs 0.9) .5, (0.9 vs 0.1) 1, (0.2 vs 0.9) 0, (0.2 vs 0.1) 1 -> 2.5/4.
  assert metrics.roc_auc([1, 0, 1, 0], [0.9, 0.9, 0.2, 0.1]) == pytest.approx(0.625)
  assert metrics.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
  assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))


def test_retrieval_ranks():
  scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
  ranks = metrics.rank_of_relevant(scores, np.array([2, 0]))
  np.testing.assert_array_equal(ranks, [2, 1])
  assert metrics.recall_at_k(ranks, 1) == 0.5 and metrics.recall_at_k(ranks, 2) == 1.0
  assert metrics.mean_reciprocal_rank(ranks) == pytest.approx((1 / 2 + 1) / 2)
  # Ties rank pessimistically: the relevant item shares the top score with another.
  np.testing.assert_array_equal(metrics.rank_of_relevant(np.array([[0.5, 0.5]]), np.array([0])), [2])


def test_ndcg_and_hit_rate():
  scores = np.array([[0.9, 0.8, 0.7, 0.6]])
  gains = np.array([[0, 1, 0, 1]])
  # DCG@3 = 1/log2(3); ideal = 1 + 1/log2(3).
  assert metrics.ndcg_at_k(scores, gains, 3) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
  # DCG@4 adds 1/log2(5).
  assert metrics.ndcg_at_k(scores, gains, 4) == pytest.approx(
      (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
  assert metrics.ndcg_at_k(np.array([[0.1, 0.2]]), np.array([[0, 1]]), 10) == pytest.approx(1.0)
  assert metrics.hit_rate_at_k(scores, gains, 1) == 0.0 and metrics.hit_rate_at_k(scores, gains, 2) == 1.0
  # A query without any positive is skipped, not counted as a miss.
  assert metrics.ndcg_at_k(np.vstack([scores, scores]), np.vstack([gains, [0, 0, 0, 0]]), 3) == pytest.approx(
      metrics.ndcg_at_k(scores, gains, 3))


def test_distinct_n_and_bits_per_byte():
  texts = ["a b a b", "a b c"]
  assert metrics.distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b a b a b c
  assert metrics.distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
  assert metrics.distinct_n(["one"], 2) == 0.0
  assert metrics.utf8_bytes(["é", "ab"]) == 4
  assert metrics.bits_per_byte(16 * math.log(2), 8) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="total_bytes=0"):
    metrics.bits_per_byte(1.0, 0)
