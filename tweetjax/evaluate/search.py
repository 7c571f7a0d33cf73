"""Search job: query -> tweet retrieval with model embeddings; recall@1, recall@10 and MRR.

Embeddings are mean-pooled final hidden states, cosine similarity (`raw/*`), and, when search_train.jsonl exists and
config.eval.search_head_steps > 0, the same states through a contrastively trained linear head (`head/*`).

The index is exact and sharded: index rows are split over the mesh's batch axes, each shard scores the (replicated)
queries against its rows and keeps a local top-k, the k * shards candidates are gathered and merged into the global
top-k. The rank of each query's relevant item (for MRR) is a psum of per-shard counts of higher scores.
Dims: Q queries, N index rows, n rows per shard, E embedding dim, K cut-off.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tweetjax.evaluate import eval_sets
from tweetjax.evaluate import metrics as metrics_lib
from tweetjax.evaluate.common import EvalContext, normalize_texts
from tweetjax.evaluate.probe import ContrastiveHead, unit
from tweetjax.parallel.rules import BATCH_AXES, axis_size, host_to_global, replicated


@functools.partial(jax.jit, static_argnames=("k", "mesh"))
def _sharded_search(queries_QxE, index_NxE, valid_N, relevant_Q, *, k: int, mesh: Mesh):
  axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None

  def local(q_QxE, x_nxE, valid_n, relevant_Q):
    n = x_nxE.shape[0]
    offset = (jax.lax.axis_index(axes) * n) if axes else 0
    scores_Qxn = jnp.where(valid_n[None], q_QxE @ x_nxE.T, -jnp.inf)
    top_scores_QxK, top_local_QxK = jax.lax.top_k(scores_Qxn, k)
    top_ids_QxK = top_local_QxK + offset
    # The relevant item's score, from whichever shard holds it.
    ids_n = offset + jnp.arange(n)
    mine_Qxn = ids_n[None] == relevant_Q[:, None]
    relevant_score_Q = jnp.sum(jnp.where(mine_Qxn, scores_Qxn, 0.0), axis=1)
    if axes:
      relevant_score_Q = jax.lax.psum(relevant_score_Q, axes)
    # Pessimistic ties: every other item scoring >= the relevant one ranks above it (padding rows score -inf).
    higher_Q = jnp.sum((scores_Qxn >= relevant_score_Q[:, None]) & ~mine_Qxn, axis=1)
    if axes:
      higher_Q = jax.lax.psum(higher_Q, axes)
      top_scores_QxK = jax.lax.all_gather(top_scores_QxK, axes, axis=1, tiled=True)
      top_ids_QxK = jax.lax.all_gather(top_ids_QxK, axes, axis=1, tiled=True)
    merged_scores_QxK, pick_QxK = jax.lax.top_k(top_scores_QxK, k)
    return merged_scores_QxK, jnp.take_along_axis(top_ids_QxK, pick_QxK, axis=1), higher_Q + 1

  rows = P(axes) if axes else P()
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), rows, rows, P()), out_specs=(P(), P(), P()),
                       check_vma=False)(queries_QxE, index_NxE, valid_N, relevant_Q)


def exact_search(queries_QxE: np.ndarray, index_NxE: np.ndarray, relevant_Q: np.ndarray, k: int, mesh: Mesh
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(top-k scores [Q, K], top-k index ids [Q, K], 1-based rank of the relevant id [Q]) by inner product."""
  shards = axis_size(mesh, [a for a in BATCH_AXES if mesh.shape[a] > 1])
  N = index_NxE.shape[0]
  padded = -(-N // shards) * shards
  k = min(k, N, padded // shards)
  index = np.zeros((padded, index_NxE.shape[1]), np.float32)
  index[:N] = index_NxE
  valid = np.arange(padded) < N
  axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
  rows = NamedSharding(mesh, P(axes)) if axes else NamedSharding(mesh, P())
  everywhere = replicated(mesh)
  scores, ids, ranks = _sharded_search(host_to_global(np.asarray(queries_QxE, np.float32), everywhere),
                                       host_to_global(index, rows), host_to_global(valid, rows),
                                       host_to_global(np.asarray(relevant_Q, np.int32), everywhere), k=k, mesh=mesh)
  return tuple(np.asarray(jax.device_get(x)) for x in (scores, ids, ranks))


def _metrics(prefix: str, ranks_Q: np.ndarray) -> dict[str, float]:
  return {f"{prefix}/recall@1": metrics_lib.recall_at_k(ranks_Q, 1),
          f"{prefix}/recall@10": metrics_lib.recall_at_k(ranks_Q, 10),
          f"{prefix}/mrr": metrics_lib.mean_reciprocal_rank(ranks_Q)}


def run(ctx: EvalContext) -> tuple[dict[str, float], dict[str, Any]]:
  corpus, queries, train = eval_sets.read_search(eval_sets.data_dir_of(ctx.config))
  row_of = {doc["id"]: i for i, doc in enumerate(corpus)}
  relevant_Q = np.array([row_of[q["relevant_id"]] for q in queries])
  norm = lambda texts: normalize_texts(ctx.config, texts)
  index_NxD = ctx.embed(norm([d["text"] for d in corpus]))
  queries_QxD = ctx.embed(norm([q["query"] for q in queries]))
  mesh = ctx.experiment.mesh
  _, top_ids, ranks = exact_search(unit(queries_QxD), unit(index_NxD), relevant_Q, 10, mesh)
  results = _metrics("raw", ranks)
  details: dict[str, Any] = {"queries": len(queries), "index": len(corpus), "train_pairs": len(train),
                             "examples": [{"query": q["query"], "relevant": corpus[r]["text"],
                                           "top1": corpus[int(t[0])]["text"]}
                                          for q, r, t in list(zip(queries, relevant_Q, top_ids))[:3]]}
  steps = int(ctx.eval_config.search_head_steps)
  if train and steps > 0:
    head = ContrastiveHead.fit(ctx.embed(norm([p["query"] for p in train])), ctx.embed(norm([p["text"] for p in train])),
                               steps=steps, dim=int(ctx.eval_config.search_head_dim),
                               temperature=float(ctx.eval_config.search_temperature))
    _, _, head_ranks = exact_search(unit(head(queries_QxD)), unit(head(index_NxD)), relevant_Q, 10, mesh)
    results.update(_metrics("head", head_ranks))
  return results, details
