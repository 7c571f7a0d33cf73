"""Personalization job: rank a user's candidate tweets by what the model expects them to engage with next.

A user is the mean pooled state (final hidden states, mean over tokens; `EvalContext.embed`) of their history
tweets, a candidate its own pooled state. Two scorers over personalization.jsonl (history + candidates with an
`engaged` flag):
  head (headline)  cosine of user and candidate through a linear ranking head trained on the frozen pooled states of
                   personalization_train.jsonl (other users, train tweets only) with a listwise softmax loss: each
                   training user's engaged candidates against their other candidates. Same procedure, data and seed
                   for every checkpoint, so differences come from the features. Needs personalization_train.jsonl
                   and config.eval.personalization_head_steps > 0 (also personalization_head_dim and
                   personalization_temperature);
  embedding        cosine of the raw states, both centred on the eval set's mean state (no training).
Reports NDCG@10 (linear gains: engaged = 1), hit-rate@1/@5 and, as a yardstick, the expected NDCG@10 of a random
ranking; `head/train_ndcg@10` is the head's fit on its own training users.
Dims: U users, C candidates per user, D d_model, E head dim.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tweetjax.evaluate import eval_sets
from tweetjax.evaluate import metrics as metrics_lib
from tweetjax.evaluate.common import EvalContext, normalize_texts
from tweetjax.evaluate.probe import Standardizer, fit_adam, unit


@dataclasses.dataclass(frozen=True)
class RankingHead:
  """A linear map of pooled states; score(user, candidate) = cosine of the mapped states."""
  standardize: Standardizer
  w_DxE: np.ndarray

  @classmethod
  def fit(cls, users_UxD: np.ndarray, candidates_UxCxD: np.ndarray, gains_UxC: np.ndarray, *, steps: int, dim: int,
          temperature: float, learning_rate: float = 3e-3, seed: int = 0) -> "RankingHead":
    U, C, D = candidates_UxCxD.shape
    standardize = Standardizer.fit(np.concatenate([users_UxD, candidates_UxCxD.reshape(U * C, D)]))
    users = jnp.asarray(standardize(users_UxD))
    cands = jnp.asarray(standardize(candidates_UxCxD.reshape(U * C, D))).reshape(U, C, D)
    engaged_U = gains_UxC.sum(1)
    # Listwise target: the engaged candidates share the probability mass; users with none do not count.
    target_UxC = jnp.asarray(gains_UxC / np.maximum(engaged_U, 1)[:, None], jnp.float32)
    counts_U = jnp.asarray(engaged_U > 0, jnp.float32)
    w = jax.random.normal(jax.random.key(seed), (D, dim)) / np.sqrt(D)

    def loss_fn(w):
      logits_UxC = jnp.einsum("ue,uce->uc", unit(users @ w), unit(cands @ w)) / temperature
      loss_U = optax.softmax_cross_entropy(logits_UxC, target_UxC)
      return jnp.sum(loss_U * counts_U) / jnp.maximum(jnp.sum(counts_U), 1.0)

    return cls(standardize, np.asarray(fit_adam(loss_fn, w, steps=steps, learning_rate=learning_rate)))

  def scores(self, users_UxD: np.ndarray, candidates_UxCxD: np.ndarray) -> np.ndarray:
    zu_UxE = unit(self.standardize(users_UxD) @ self.w_DxE)
    zc_UxCxE = unit(self.standardize(candidates_UxCxD) @ self.w_DxE)
    return np.einsum("ue,uce->uc", zu_UxE, zc_UxCxE)


def _ranking_metrics(prefix: str, scores_UxC: np.ndarray, gains_UxC: np.ndarray) -> dict[str, float]:
  return {f"{prefix}/ndcg@10": metrics_lib.ndcg_at_k(scores_UxC, gains_UxC, 10),
          f"{prefix}/hit@1": metrics_lib.hit_rate_at_k(scores_UxC, gains_UxC, 1),
          f"{prefix}/hit@5": metrics_lib.hit_rate_at_k(scores_UxC, gains_UxC, 5)}


def read_users(path: str) -> tuple[list[dict[str, Any]], int]:
  """The users of one personalization file and their (common) number of candidates."""
  users = eval_sets.read_jsonl(path, "personalization")
  num_candidates = {len(u["candidates"]) for u in users}
  if len(num_candidates) != 1:
    raise eval_sets.EvalSetError(f"{path}: every user needs the same number of candidates, got "
                                 f"{sorted(num_candidates)}")
  return users, num_candidates.pop()


def featurize(ctx: EvalContext, users: list[dict[str, Any]], C: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(user states [U, D], candidate states [U, C, D], gains [U, C]); every distinct text is embedded once."""
  history = [normalize_texts(ctx.config, u["history"]) for u in users]
  candidates = [normalize_texts(ctx.config, [c["text"] for c in u["candidates"]]) for u in users]
  unique = sorted({t for texts in history + candidates for t in texts})
  row = {t: i for i, t in enumerate(unique)}
  states_NxD = ctx.embed(unique)
  users_UxD = np.stack([states_NxD[[row[t] for t in texts]].mean(0) for texts in history])
  candidates_UxCxD = np.stack([states_NxD[[row[t] for t in texts]] for texts in candidates])
  gains_UxC = np.array([[c["engaged"] for c in u["candidates"]] for u in users], np.float64)
  return users_UxD, candidates_UxCxD, gains_UxC


def run(ctx: EvalContext) -> tuple[dict[str, float], dict[str, Any]]:
  data_dir = eval_sets.data_dir_of(ctx.config)
  users, C = read_users(os.path.join(data_dir, "personalization.jsonl"))
  users_UxD, cands_UxCxD, gains_UxC = featurize(ctx, users, C)
  # Centred: pooled states share a large common direction that would otherwise dominate every cosine.
  mean_D = np.concatenate([users_UxD, cands_UxCxD.reshape(-1, users_UxD.shape[1])]).mean(0)
  cosine_UxC = np.einsum("ud,ucd->uc", unit(users_UxD - mean_D), unit(cands_UxCxD - mean_D))
  results = _ranking_metrics("embedding", cosine_UxC, gains_UxC)
  details: dict[str, Any] = {"users": len(users), "candidates_per_user": C}

  train_path = os.path.join(data_dir, "personalization_train.jsonl")
  eval_config = ctx.eval_config
  steps = int(eval_config.personalization_head_steps)
  if os.path.exists(train_path) and steps > 0:
    train_users, train_C = read_users(train_path)
    train_features = featurize(ctx, train_users, train_C)
    head = RankingHead.fit(*train_features, steps=steps,
                           dim=int(eval_config.personalization_head_dim),
                           temperature=float(eval_config.personalization_temperature))
    results.update(_ranking_metrics("head", head.scores(users_UxD, cands_UxCxD), gains_UxC))
    # On its own training users: far above head/ndcg@10 means the features, not the head's fit, are the limit.
    results["head/train_ndcg@10"] = metrics_lib.ndcg_at_k(head.scores(*train_features[:2]), train_features[2], 10)
    details["train_users"] = len(train_users)

  rng = np.random.default_rng(0)
  random_ndcg = np.mean([metrics_lib.ndcg_at_k(rng.random(gains_UxC.shape), gains_UxC, 10) for _ in range(20)])
  results["random/ndcg@10"] = float(random_ndcg)
  return results, details
