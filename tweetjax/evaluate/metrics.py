"""Evaluation metrics in plain numpy: classification, retrieval, ranking, generation diversity, bits per byte.

Dims: N examples, C candidates (or index size), Q queries, K cut-off.
Every function takes host arrays and returns Python floats (or dicts of them) so results serialise to JSON as is.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def precision_recall_f1(labels_N: np.ndarray, predictions_N: np.ndarray) -> dict[str, float]:
  """Binary precision / recall / F1 of the positive class; 0 (not NaN) where a denominator is 0."""
  labels_N = np.asarray(labels_N).astype(bool)
  predictions_N = np.asarray(predictions_N).astype(bool)
  tp = float(np.sum(labels_N & predictions_N))
  fp = float(np.sum(~labels_N & predictions_N))
  fn = float(np.sum(labels_N & ~predictions_N))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1}


def roc_auc(labels_N: np.ndarray, scores_N: np.ndarray) -> float:
  """Area under the ROC curve = P(score of a random positive > score of a random negative), ties counting 1/2.

  Computed from mid-ranks (Mann-Whitney U), O(N log N). NaN when only one class is present.
  """
  labels_N = np.asarray(labels_N).astype(bool)
  scores_N = np.asarray(scores_N, np.float64)
  num_pos, num_neg = int(labels_N.sum()), int((~labels_N).sum())
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  order = np.argsort(scores_N, kind="mergesort")
  sorted_scores = scores_N[order]
  ranks = np.empty(len(scores_N), np.float64)
  # Mid-ranks: every member of a run of equal scores gets the mean of the run's 1-based ranks.
  boundaries = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1, len(sorted_scores)]
  for start, end in zip(boundaries[:-1], boundaries[1:]):
    ranks[order[start:end]] = (start + 1 + end) / 2.0
  u = ranks[labels_N].sum() - num_pos * (num_pos + 1) / 2.0
  return float(u / (num_pos * num_neg))


def rank_of_relevant(scores_QxC: np.ndarray, relevant_Q: np.ndarray) -> np.ndarray:
  """1-based rank of each query's relevant item; ties are broken pessimistically (equal scores rank above)."""
  scores_QxC = np.asarray(scores_QxC, np.float64)
  relevant_scores_Q = scores_QxC[np.arange(len(scores_QxC)), np.asarray(relevant_Q)]
  return np.sum(scores_QxC >= relevant_scores_Q[:, None], axis=1)


def recall_at_k(ranks_Q: np.ndarray, k: int) -> float:
  """Fraction of queries whose (single) relevant item is ranked within the top k."""
  return float(np.mean(np.asarray(ranks_Q) <= k))


def mean_reciprocal_rank(ranks_Q: np.ndarray) -> float:
  return float(np.mean(1.0 / np.asarray(ranks_Q, np.float64)))


def ndcg_at_k(scores_QxC: np.ndarray, gains_QxC: np.ndarray, k: int) -> float:
  """Mean NDCG@k with linear gains and log2(rank + 1) discounts; queries with no positive gain are skipped.

  Ties in the scores are broken by candidate order (stable sort on -score), so results are deterministic.
  """
  scores_QxC = np.asarray(scores_QxC, np.float64)
  gains_QxC = np.asarray(gains_QxC, np.float64)
  k = min(k, scores_QxC.shape[1])
  discounts_K = 1.0 / np.log2(np.arange(2, k + 2))
  order_QxC = np.argsort(-scores_QxC, axis=1, kind="stable")
  dcg_Q = np.sum(np.take_along_axis(gains_QxC, order_QxC, axis=1)[:, :k] * discounts_K, axis=1)
  ideal_Q = np.sum(-np.sort(-gains_QxC, axis=1)[:, :k] * discounts_K, axis=1)
  valid = ideal_Q > 0
  if not valid.any():
    return float("nan")
  return float(np.mean(dcg_Q[valid] / ideal_Q[valid]))


def hit_rate_at_k(scores_QxC: np.ndarray, gains_QxC: np.ndarray, k: int) -> float:
  """Fraction of queries with at least one positive-gain candidate in the top k (queries without one skipped)."""
  scores_QxC = np.asarray(scores_QxC, np.float64)
  gains_QxC = np.asarray(gains_QxC, np.float64)
  order_QxC = np.argsort(-scores_QxC, axis=1, kind="stable")[:, :k]
  hit_Q = np.any(np.take_along_axis(gains_QxC, order_QxC, axis=1) > 0, axis=1)
  valid = np.any(gains_QxC > 0, axis=1)
  return float(np.mean(hit_Q[valid])) if valid.any() else float("nan")


def distinct_n(texts: Sequence[str], n: int) -> float:
  """Distinct n-grams over all n-grams of whitespace tokens, pooled over `texts` (0 when there are none)."""
  total, unique = 0, set()
  for text in texts:
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    total += len(grams)
    unique.update(grams)
  return len(unique) / total if total else 0.0


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
  """Tokenizer-independent loss: nats / ln 2 / UTF-8 bytes of the text the nats were spent on."""
  if total_bytes <= 0:
    raise ValueError(f"bits_per_byte: total_bytes={total_bytes} must be positive")
  return float(total_nats / math.log(2) / total_bytes)


def utf8_bytes(texts: Iterable[str]) -> int:
  return sum(len(t.encode("utf-8")) for t in texts)


def best_threshold_f1(labels_N: np.ndarray, scores_N: np.ndarray) -> float:
  """The score threshold that maximises F1 (predict positive where score >= threshold); for calibrating on train."""
  labels_N = np.asarray(labels_N).astype(bool)
  scores_N = np.asarray(scores_N, np.float64)
  candidates = np.unique(scores_N)
  if not labels_N.any() or len(candidates) == 0:
    return float(np.inf)
  best, best_f1 = candidates[0], -1.0
  for t in candidates:
    f1 = precision_recall_f1(labels_N, scores_N >= t)["f1"]
    if f1 > best_f1:
      best, best_f1 = t, f1
  return float(best)
