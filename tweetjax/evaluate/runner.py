"""Runs evaluation jobs against a workdir's checkpoints: once (one step) or as a continuous evaluator (`follow`).

A job is a module with `run(ctx) -> (metrics, details)`; JOBS maps names to them. The experiment (mesh, model,
jitted functions) is built once and reused for every checkpoint a follower evaluates.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tweetjax.evaluate import common
from tweetjax.train.experiment import Experiment, build_experiment

JOBS = ("perplexity", "flagging", "search", "adcopy", "personalization")


def job_fn(job: str) -> Callable:
  if job not in JOBS:
    raise ValueError(f"unknown eval job {job!r}; jobs are {list(JOBS)}")
  return importlib.import_module(f"tweetjax.evaluate.{job}").run


class Evaluator:
  """Evaluates checkpoints of one workdir with one config; keeps the compiled functions between checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, experiment: Experiment | None = None):
    self.config, self.workdir = config, os.path.abspath(workdir)
    self.experiment = experiment or build_experiment(config)
    self.tokenizer = common.load_tokenizer(config)
    self.cache: dict[str, Any] = {}

  def context(self, params: Any, step: int) -> common.EvalContext:
    return common.EvalContext(self.config, self.experiment, params, step, self.tokenizer, self.workdir, self.cache)

  def evaluate(self, job: str, step: int | None = None, params: Any = None, write: bool = True
               ) -> tuple[int, dict[str, float], dict[str, Any]]:
    """Runs `job` on checkpoint `step` (None: newest), or on given params (then `step` labels the results)."""
    fn = job_fn(job)
    if params is None:
      params, step = common.restore_params(self.experiment, self.workdir, step)
    step = int(step or 0)
    started = time.perf_counter()
    metrics, details = fn(self.context(params, step))
    details = {**details, "seconds": time.perf_counter() - started}
    if write:
      path = common.write_results(self.workdir, job, step, metrics, details)
      logging.info("eval %s step %d -> %s", job, step, path)
    return step, metrics, details


def follow(evaluator: Evaluator, job: str, *, poll_s: float = 30.0, idle_timeout_s: float = 0.0,
           last_step: int | None = None, on_result: Callable[[int, dict], None] | None = None,
           sleep: Callable[[float], None] = time.sleep) -> list[int]:
  """Evaluates every checkpoint not yet evaluated (no `<workdir>/eval/<job>/<step>.json`), oldest first, then
  waits for new ones. Returns the steps it evaluated when `last_step` has been evaluated (or exists already) or no
  new checkpoint appeared for `idle_timeout_s` (0: wait forever). Restart-safe: the JSON files are the memory.
  """
  evaluated: list[int] = []
  idle_since = time.monotonic()
  while True:
    done = common.done_steps(evaluator.workdir, job)
    todo = [s for s in common.checkpoint_steps(evaluator.workdir) if s not in done and s not in evaluated]
    finished = last_step is not None and last_step in done
    idle = not todo and bool(idle_timeout_s) and time.monotonic() - idle_since > idle_timeout_s
    step, stop = _agreed(todo[0] if todo else -1, finished or idle)
    if step >= 0:
      step, metrics, _ = evaluator.evaluate(job, step)
      evaluated.append(step)
      idle_since = time.monotonic()
      if on_result:
        on_result(step, metrics)
      continue
    if stop:
      if idle:
        logging.info("follow %s: no new checkpoint for %.0fs; stopping", job, idle_timeout_s)
      return evaluated
    sleep(poll_s)


def _agreed(step: int, stop: bool) -> tuple[int, bool]:
  """Process 0's choice of the next step (-1: none) and whether to stop, on every process.

  Evaluation is collective, so all processes must take the same step, and they may see a new checkpoint directory
  (or a result file) at slightly different times.
  """
  if jax.process_count() == 1:
    return step, stop
  agreed = multihost_utils.broadcast_one_to_all(np.array([step, int(stop)], np.int32))
  return int(agreed[0]), bool(agreed[1])
