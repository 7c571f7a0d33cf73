"""Personalization job: rank a user's candidate tweets by what the model expects them to engage with next.

Two scorers over personalization.jsonl (history of tweets + candidates with an `engaged` flag):
  likelihood (headline)  PMI of the candidate with the history: log p(candidate | history) - log p(candidate), the
                         history being the user's tweets joined with " <sep> " in one context; subtracting the
                         unconditional term removes the bias towards short or generic tweets;
  embedding              cosine similarity of the candidate's pooled state to the mean pooled state of the history
                         (both centred on the eval set's mean state).
Reports NDCG@10 (linear gains: engaged = 1), hit-rate@1/@5 and, as a yardstick, the expected NDCG@10 of a random
ranking.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tweetjax.evaluate import eval_sets
from tweetjax.evaluate import metrics as metrics_lib
from tweetjax.evaluate.common import EvalContext, normalize_texts

SEPARATOR = " <sep> "


def _ranking_metrics(prefix: str, scores_UxC: np.ndarray, gains_UxC: np.ndarray) -> dict[str, float]:
  return {f"{prefix}/ndcg@10": metrics_lib.ndcg_at_k(scores_UxC, gains_UxC, 10),
          f"{prefix}/hit@1": metrics_lib.hit_rate_at_k(scores_UxC, gains_UxC, 1),
          f"{prefix}/hit@5": metrics_lib.hit_rate_at_k(scores_UxC, gains_UxC, 5)}


def run(ctx: EvalContext) -> tuple[dict[str, float], dict[str, Any]]:
  users = eval_sets.read_jsonl(os.path.join(eval_sets.data_dir_of(ctx.config), "personalization.jsonl"),
                               "personalization")
  num_candidates = {len(u["candidates"]) for u in users}
  if len(num_candidates) != 1:
    raise eval_sets.EvalSetError(f"personalization.jsonl: every user needs the same number of candidates, got "
                                 f"{sorted(num_candidates)}")
  C = num_candidates.pop()
  norm = lambda texts: normalize_texts(ctx.config, texts)
  histories = [SEPARATOR.join(norm(u["history"])) + SEPARATOR.rstrip() for u in users]
  candidates = norm([c["text"] for u in users for c in u["candidates"]])
  gains_UxC = np.array([[c["engaged"] for c in u["candidates"]] for u in users], np.float64)

  contexts = [h for h in histories for _ in range(C)]
  conditional, _ = ctx.loglikelihood(contexts, candidates)
  unconditional, _ = ctx.loglikelihood([""] * len(candidates), candidates)
  pmi_UxC = (conditional - unconditional).reshape(len(users), C)
  results = _ranking_metrics("likelihood", pmi_UxC, gains_UxC)

  history_emb = ctx.embed([t for u in users for t in norm(u["history"])])
  sizes = [len(u["history"]) for u in users]
  starts = np.cumsum([0] + sizes)
  cand_emb = ctx.embed(candidates)
  # Centred: pooled states share a large common direction that would otherwise dominate every cosine.
  mean_D = np.concatenate([history_emb, cand_emb]).mean(0)
  history_emb, cand_emb = history_emb - mean_D, cand_emb - mean_D
  user_UxD = np.stack([history_emb[a:b].mean(0) for a, b in zip(starts[:-1], starts[1:])])
  cand_UxCxD = cand_emb.reshape(len(users), C, -1)
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)
  cosine_UxC = np.einsum("ud,ucd->uc", unit(user_UxD), unit(cand_UxCxD))
  results.update(_ranking_metrics("embedding", cosine_UxC, gains_UxC))

  rng = np.random.default_rng(0)
  random_ndcg = np.mean([metrics_lib.ndcg_at_k(rng.random(gains_UxC.shape), gains_UxC, 10) for _ in range(20)])
  results["random/ndcg@10"] = float(random_ndcg)
  return results, {"users": len(users), "candidates_per_user": C}
