"""The training loop: build the experiment, place the state, stream batches, step, log."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from tweetjax.data.token_stream import TokenStreamIterator
from tweetjax.train.experiment import Experiment, build_experiment


def make_train_iterator(config: ml_collections.ConfigDict, experiment: Experiment):
  source = config.data.source
  if source == "synthetic":
    return TokenStreamIterator(int(config.seed), int(config.data.global_batch_size), int(config.data.seq_len),
                               int(config.model.vocab_size), experiment.mesh)
  if source == "tweets":
    from tweetjax.data import pipeline  # Imported lazily: the tweet loader pulls in grain and tfds.
    return pipeline.make_iterator(config, experiment.mesh, split="train")
  raise ValueError(f"config.data.source={source!r}: expected 'synthetic' or 'tweets'")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains for config.train.steps and returns the last logged metrics."""
  os.makedirs(workdir, exist_ok=True)
  experiment = build_experiment(config)
  logging.info("mesh %s on %d devices (%s)", dict(experiment.mesh.shape), experiment.mesh.size,
               jax.devices()[0].device_kind)
  logging.info("sharding report:\n%s", experiment.sharding_report())
  state = experiment.init_state()
  train_step = experiment.train_step()
  batches = make_train_iterator(config, experiment)
  total_steps = int(config.train.steps)
  log_every = max(int(config.train.log_every), 1)
  last: dict[str, Any] = {}
  window_start = time.perf_counter()
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as metrics_file:
    for step in range(int(state.step), total_steps):
      state, metrics = train_step(state, next(batches))
      if (step + 1) % log_every == 0 or step + 1 == total_steps:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - window_start
        steps_in_window = (step + 1) % log_every or log_every
        tokens_per_s = steps_in_window * config.data.global_batch_size * config.data.seq_len / elapsed
        last = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}, "tokens_per_s": tokens_per_s,
                "step_time_s": elapsed / steps_in_window}
        logging.info("step %d loss %.4f grad_norm %.3f lr %.2e tokens/s %.0f", step + 1, last["loss"],
                     last["grad_norm"], last["learning_rate"], tokens_per_s)
        metrics_file.write(json.dumps(last) + "\n")
        metrics_file.flush()
        window_start = time.perf_counter()
  return last
