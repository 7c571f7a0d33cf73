"""Plumbing shared by the evaluation jobs: context (model, params, tokenizer), batched scoring/embedding, results.

Dims: N texts, B batch rows, L sequence length, D d_model, V vocab.

`TextScorer` is the one jitted forward every job uses: per row it returns the summed log-likelihood of the weighted
target tokens and the mean-pooled final hidden state over the pooled tokens. Sequences are sorted by length, cut
into batches of `config.eval.batch_size` rows, padded to a power-of-two length bucket (<= config.eval.max_len), so
a job compiles a handful of shapes whatever its data.

Results of job J at checkpoint step S go to `<workdir>/eval/J/S.json` (written atomically: a JSON file present
means a finished evaluation, which is what `--follow` uses to skip work already done) and to TensorBoard scalars
`eval/J/<metric>` under `<workdir>/tensorboard/eval/J`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from tweetjax.data import normalize
from tweetjax.data.tokenizer import Tokenizer
from tweetjax.parallel.rules import (axis_size, batch_sharding, host_to_global, mesh_axes_of, mesh_context,
                                     replicated)
from tweetjax.parallel.shard_map_ops import vocab_parallel_cross_entropy
from tweetjax.train.experiment import Experiment

_MIN_BUCKET = 16


@dataclasses.dataclass
class EvalContext:
  """Everything a job needs: the experiment (mesh, model), restored params, tokenizer and its config."""
  config: ml_collections.ConfigDict
  experiment: Experiment
  params: Any
  step: int
  tokenizer: Tokenizer
  workdir: str
  # Compiled helpers (scorer, eval step, sampler) shared across checkpoints by the runner.
  cache: dict[str, Any] = dataclasses.field(default_factory=dict)

  def cached(self, name: str, factory):
    if name not in self.cache:
      self.cache[name] = factory()
    return self.cache[name]

  @property
  def eval_config(self) -> ml_collections.ConfigDict:
    return self.config.eval

  @property
  def scorer(self) -> "TextScorer":
    return self.cached("scorer", lambda: TextScorer(self.experiment, self.tokenizer, int(self.eval_config.batch_size),
                                                    int(self.eval_config.max_len)))

  def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return self.scorer.loglikelihood(self.params, contexts, continuations)

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    return self.scorer.embed(self.params, texts)


def load_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  path = str(config.data.tokenizer_path)
  if not path:
    raise ValueError("config.data.tokenizer_path is empty: evaluation jobs read and write text, so they need the "
                     "SentencePiece model the checkpoint was trained with (--config.data.tokenizer_path=...)")
  tokenizer = Tokenizer(path)
  if tokenizer.vocab_size > int(config.model.vocab_size):
    raise ValueError(f"tokenizer {path} has {tokenizer.vocab_size} pieces but config.model.vocab_size is "
                     f"{config.model.vocab_size}")
  return tokenizer


def normalize_texts(config: ml_collections.ConfigDict, texts: Sequence[str]) -> list[str]:
  """The loader's normalization (config.data.normalize when set), so eval text looks like training text."""
  options = config.data.get("normalize", None) if hasattr(config.data, "get") else None
  options = options.to_dict() if hasattr(options, "to_dict") else options
  return normalize.normalize_batch(list(texts), normalize.NormalizeConfig.from_dict(options))


def checkpoint_steps(workdir: str) -> list[int]:
  """Complete checkpoint steps (orbax renames a finished save to its step number; temporaries never match)."""
  from tweetjax.train.checkpoint import checkpoints_dir  # pylint: disable=g-import-not-at-top
  directory = checkpoints_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if re.fullmatch(r"\d+", name) and os.path.isdir(os.path.join(directory, name)))


def restore_params(experiment: Experiment, workdir: str, step: int | None = None) -> tuple[Any, int]:
  """Params of checkpoint `step` (None: newest) placed on the experiment's mesh, and the step restored."""
  from tweetjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint under {checkpoint.checkpoints_dir(workdir)}")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint step {step} under {checkpoint.checkpoints_dir(workdir)}; "
                            f"there are {steps}")
  return checkpoint.restore_params(workdir, experiment.layout, step=step), step


def _bucket(length: int, max_len: int) -> int:
  return min(max_len, max(_MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(length, 1))))))


class TextScorer:
  """Batched log-likelihoods and pooled embeddings of token sequences, jitted on the experiment's mesh."""

  def __init__(self, experiment: Experiment, tokenizer: Tokenizer, batch_size: int, max_len: int):
    self.experiment, self.tokenizer, self.max_len = experiment, tokenizer, max_len
    shards = axis_size(experiment.mesh, mesh_axes_of("act_batch", experiment.rules))
    self.batch_size = -(-batch_size // shards) * shards
    self.truncated = 0  # continuations cut at max_len (reported by jobs that care)
    model, mesh, rules = experiment.model, experiment.mesh, experiment.rules

    def forward(params, batch):
      logits_BxLxV, hidden_BxLxD = model.apply({"params": params}, batch["inputs"], batch["positions"],
                                               batch["segment_ids"], return_hidden=True)
      loss_BxL, _ = vocab_parallel_cross_entropy(logits_BxLxV, batch["targets"], mesh, rules)
      ll_B = -jnp.sum(loss_BxL * batch["weights"], axis=1)
      pool_BxL = batch["pool"]
      pooled_BxD = jnp.einsum("bl,bld->bd", pool_BxL, hidden_BxLxD.astype(jnp.float32))
      pooled_BxD = pooled_BxD / jnp.maximum(jnp.sum(pool_BxL, axis=1, keepdims=True), 1.0)
      return ll_B, pooled_BxD

    rows = self._rows = batch_sharding(mesh)
    self._forward = jax.jit(forward, in_shardings=(experiment.layout.param_shardings, rows),
                            out_shardings=replicated(mesh))

  def _run(self, params: Any, sequences: list[list[int]], scored_from: list[int], pool_from: list[int]):
    """sequences: full token lists; targets at index >= scored_from count; pooled inputs at index >= pool_from."""
    n = len(sequences)
    ll_N = np.zeros(n, np.float64)
    pooled_NxD = np.zeros((n, self.experiment.model_config.d_model), np.float32)
    order = sorted(range(n), key=lambda i: len(sequences[i]))
    B = self.batch_size
    for start in range(0, n, B):
      idx = order[start:start + B]
      L = _bucket(max(len(sequences[i]) - 1 for i in idx), self.max_len)
      batch = {k: np.zeros((B, L), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
      batch["weights"] = np.zeros((B, L), np.float32)
      batch["pool"] = np.zeros((B, L), np.float32)
      batch["inputs"][:] = batch["targets"][:] = self.tokenizer.pad_id
      for row, i in enumerate(idx):
        seq = sequences[i]
        m = len(seq) - 1
        batch["inputs"][row, :m], batch["targets"][row, :m] = seq[:-1], seq[1:]
        batch["positions"][row, :m] = np.arange(m)
        batch["segment_ids"][row, :m] = 1
        batch["weights"][row, max(scored_from[i] - 1, 0):m] = 1.0
        batch["pool"][row, pool_from[i]:m] = 1.0
      with mesh_context(self.experiment.mesh, self.experiment.rules):
        global_batch = {k: host_to_global(v, self._rows) for k, v in batch.items()}
        ll_B, pooled_BxD = jax.device_get(self._forward(params, global_batch))
      ll_N[idx] = ll_B[:len(idx)]
      pooled_NxD[idx] = pooled_BxD[:len(idx)]
    return ll_N, pooled_NxD

  def loglikelihood(self, params: Any, contexts: Sequence[str], continuations: Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """log p(continuation + EOS | BOS + context) in nats, and the number of scored tokens, per pair.

    Contexts longer than the window lose their oldest tokens (BOS kept); a continuation that alone exceeds the
    window is cut at its end (counted in `self.truncated`).
    """
    if len(contexts) != len(continuations):
      raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    tok = self.tokenizer
    prefixes = [[tok.bos_id] + ids for ids in tok.encode_batch(list(contexts))]
    return self.score(params, prefixes, [ids + [tok.eos_id] for ids in tok.encode_batch(list(continuations))])

  def score(self, params: Any, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
            ) -> tuple[np.ndarray, np.ndarray]:
    """log p(continuation | prefix) of token-id sequences (the prefix starts with BOS), and the scored token counts.

    Windowing as in `loglikelihood`: a prefix loses its oldest tokens after the first, a continuation its end.
    """
    sequences, scored_from = [], []
    for prefix, cont in zip(prefixes, continuations):
      cont = list(cont)
      if len(cont) > self.max_len:
        cont = cont[:self.max_len]
        self.truncated += 1
      room = self.max_len + 1 - len(cont)  # >= 1: the model reads len(sequence) - 1 <= max_len inputs
      prefix = list(prefix[:1]) + list(prefix[max(1, len(prefix) + 1 - room):])
      sequences.append(prefix + cont)
      scored_from.append(len(prefix))
    ll_N, _ = self._run(params, sequences, scored_from, [len(s) for s in sequences])
    counts_N = np.array([len(s) - f for s, f in zip(sequences, scored_from)], np.int64)
    return ll_N, counts_N

  def embed(self, params: Any, texts: Sequence[str]) -> np.ndarray:
    """Mean of the final-norm hidden states over each text's tokens (BOS excluded; an empty text pools BOS)."""
    tok = self.tokenizer
    sequences, pool_from = [], []
    for ids in tok.encode_batch(list(texts)):
      seq = [tok.bos_id] + ids[:self.max_len - 1] + [tok.eos_id]  # EOS is only the last target, never pooled
      sequences.append(seq)
      pool_from.append(1 if ids else 0)
    _, pooled_NxD = self._run(params, sequences, [len(s) for s in sequences], pool_from)
    return pooled_NxD


# -- results ----------------------------------------------------------------------------------------------------


def results_dir(workdir: str, job: str) -> str:
  return os.path.join(workdir, "eval", job)


def results_path(workdir: str, job: str, step: int) -> str:
  return os.path.join(results_dir(workdir, job), f"{int(step)}.json")


def done_steps(workdir: str, job: str) -> set[int]:
  directory = results_dir(workdir, job)
  if not os.path.isdir(directory):
    return set()
  return {int(name[:-5]) for name in os.listdir(directory) if re.fullmatch(r"\d+\.json", name)}


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  return x


def write_results(workdir: str, job: str, step: int, metrics: dict[str, float], details: dict[str, Any] | None = None,
                  tensorboard: bool = True) -> str:
  """Writes `<workdir>/eval/<job>/<step>.json` atomically and the scalars to TensorBoard; returns the JSON path.

  Process 0 writes; the other processes of a multi-process job computed the same results and only return the path.
  """
  path = results_path(workdir, job, step)
  if jax.process_index() != 0:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  record = {"job": job, "step": int(step), "metrics": _jsonable(metrics), "details": _jsonable(details or {})}
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True, ensure_ascii=False)
  os.replace(tmp, path)
  if tensorboard:
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.warning("tensorboardX is not installed; eval scalars are only in %s", path)
    else:
      with SummaryWriter(os.path.join(workdir, "tensorboard", "eval", job)) as writer:
        for name, value in metrics.items():
          if isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value)):
            writer.add_scalar(f"eval/{job}/{name}", float(value), int(step))
  return path


def format_table(job: str, step: int, metrics: dict[str, float]) -> str:
  width = max([len(k) for k in metrics] + [6])
  lines = [f"{job} @ step {step}", f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
  for name, value in metrics.items():
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    lines.append(f"{name:<{width}}  {text}")
  return "\n".join(lines)
