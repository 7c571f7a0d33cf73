"""The training loop: resume or init, stream batches, step, log, evaluate, checkpoint, stop on preemption.

Exact resume: the state (params, optimizer state, step, skip count) and the data iterator's position are saved
together, the step is a pure function of (state, batch), and there is no other randomness (a stochastic layer
would fold the step into `jax.random.key(config.seed)`, which needs nothing saved). A run killed at any point
and restarted from its newest complete checkpoint therefore recomputes the same steps bit for bit on the same
backend and mesh, and metrics.jsonl is rewound to that checkpoint.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from tweetjax.config_check import check_config
from tweetjax.data.token_stream import TokenStreamIterator
from tweetjax.parallel import pipeline as pipeline_lib
from tweetjax.parallel.mesh import node_report
from tweetjax.parallel.rules import mesh_context
from tweetjax.train import flops as flops_lib
from tweetjax.train.checkpoint import CheckpointManager
from tweetjax.train.experiment import Experiment, build_experiment, topology_devices_per_node
from tweetjax.train.metrics import MetricsWriter, format_duration, summarize_window
from tweetjax.train.preemption import PreemptionWatcher
from tweetjax.train.profiling import StepProfiler, aot_compile, setup_compilation_cache

_EVAL_STREAM = 1  # synthetic validation: same Markov chain as training, documents drawn from another stream


class NonFiniteLossError(FloatingPointError):
  """Raised with config.train.nonfinite="stop" when a step's loss or gradient norm was NaN/Inf."""


def make_train_iterator(config: ml_collections.ConfigDict, experiment: Experiment):
  source = config.data.source
  if source == "synthetic":
    return TokenStreamIterator(int(config.seed), int(config.data.global_batch_size), int(config.data.seq_len),
                               int(config.model.vocab_size), experiment.mesh)
  if source == "tweets":
    from tweetjax.data import pipeline  # Imported lazily: the tweet loader pulls in grain and tfds.
    return pipeline.make_iterator(config, experiment.mesh, split="train")
  if source == "sft":
    from tweetjax.data import sft
    return sft.make_iterator(config, experiment.mesh, split="train")
  raise ValueError(f"config.data.source={source!r}: expected 'synthetic', 'tweets' or 'sft'")


def make_eval_iterator(config: ml_collections.ConfigDict, experiment: Experiment):
  """A fresh pass over the validation data (the same batches every time)."""
  if config.data.source == "synthetic":
    return TokenStreamIterator(int(config.seed), int(config.data.global_batch_size), int(config.data.seq_len),
                               int(config.model.vocab_size), experiment.mesh, stream=_EVAL_STREAM)
  if config.data.source == "sft":
    from tweetjax.data import sft
    return sft.make_iterator(config, experiment.mesh, split="validation")
  from tweetjax.data import pipeline
  return pipeline.make_iterator(config, experiment.mesh, split="validation")


def evaluate(experiment: Experiment, params: Any, eval_step, num_batches: int) -> dict[str, float]:
  config = experiment.config
  batches = make_eval_iterator(config, experiment)
  sums = None
  for _ in range(num_batches):
    try:
      batch = next(batches)
    except StopIteration:
      break
    aux = eval_step(params, batch)
    sums = aux if sums is None else jax.tree.map(jnp.add, sums, aux)
  if sums is None:
    return {}
  sums = jax.device_get(sums)
  tokens = max(float(sums["tokens"]), 1.0)
  return {"eval_loss": float(sums["ce_sum"]) / tokens, "eval_tokens": float(sums["tokens"])}


def _abstract_batch(batch: dict[str, jax.Array]) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}


def _peak_flops(config: ml_collections.ConfigDict, experiment: Experiment, cache_dir: str | None) -> float:
  configured = float(config.train.peak_flops_per_device)
  if configured > 0:
    return configured
  return flops_lib.peak_flops_per_device(experiment.mesh.devices.flat[0], str(config.model.dtype), cache_dir or "")


def _log_config_change(saved: dict[str, Any] | None, config: ml_collections.ConfigDict) -> None:
  if not saved:
    return
  current = config.to_dict()
  changed = sorted(f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
                   for section, values in current.items() if isinstance(values, dict) and section in saved
                   for key, value in values.items() if key in saved[section] and saved[section][key] != value)
  if changed:
    logging.warning("config differs from the checkpoint's:\n  %s", "\n  ".join(changed))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to config.train.steps (resuming from `workdir` if it holds a checkpoint); returns the last metrics."""
  check_config(config)  # every bad key in one error, before the watcher, the compilation cache or the mesh
  workdir = os.path.abspath(workdir)  # tools pass it absolute already; library callers may not
  # Watch for SIGTERM from the start: a preemption during start-up then stops after the first step, with a save.
  watcher = PreemptionWatcher(int(config.train.preemption_check_every))
  try:
    return _train(config, workdir, watcher)
  finally:
    watcher.close()


def _train(config: ml_collections.ConfigDict, workdir: str, watcher: PreemptionWatcher) -> dict[str, Any]:
  nonfinite_mode = str(config.train.nonfinite)
  cache_dir = setup_compilation_cache(str(config.train.compilation_cache_dir), workdir)
  experiment = build_experiment(config)
  mesh = experiment.mesh
  logging.info("mesh %s on %d devices (%s), %d processes", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind, jax.process_count())
  logging.info("%s", node_report(mesh, topology_devices_per_node(config)))
  if experiment.model.pipeline is not None and experiment.model.pipeline.stages > 1:
    logging.info("%s", pipeline_lib.describe(experiment.model.pipeline, len(jax.tree.leaves(
        experiment.layout.abstract_state.params["layers"])[0])))
  logging.info("sharding report:\n%s", experiment.sharding_report())

  checkpoints = CheckpointManager.from_config(workdir, config)
  batches = make_train_iterator(config, experiment)
  restored = checkpoints.restore_latest(experiment.layout)
  if restored is None and config.train.get("init_from"):
    from tweetjax.train import init_from  # pylint: disable=g-import-not-at-top
    logging.info("no checkpoint in %s: starting from config.train.init_from=%s", workdir, config.train.init_from)
    state, start_step = init_from.init_state(config, experiment), 0
  elif restored is None:
    logging.info("no checkpoint in %s: initialising from seed %d", workdir, int(config.seed))
    state, start_step = experiment.init_state(), 0
  else:
    _log_config_change(restored.config, config)
    state, start_step = restored.state, restored.step
    batches.set_state(restored.data_state)
    logging.info("resuming at step %d (data iterator state %s)%s", start_step, restored.data_state,
                 "; config.train.init_from is not read" if config.train.get("init_from") else "")
  total_steps = int(config.train.steps)
  metrics = MetricsWriter(workdir, start_step, tensorboard=bool(config.train.tensorboard))

  flops = flops_lib.flops_per_token(experiment.model_config, experiment.seq_len)
  peak = _peak_flops(config, experiment, cache_dir)
  tokens_per_step = int(config.data.global_batch_size) * experiment.seq_len
  logging.info("model FLOPs per token (train): %.4g (%s); peak %.4g FLOP/s per device", flops.train,
               {k: f"{v:.4g}" for k, v in flops.as_dict().items()}, peak)

  last: dict[str, Any] = {"step": start_step}
  if start_step >= total_steps:
    logging.info("step %d >= config.train.steps=%d: nothing to do", start_step, total_steps)
    checkpoints.close()
    metrics.close()
    return last

  # Compile ahead of time from the first batch's shapes: the log says whether the persistent cache served it.
  first_batch = next(batches)
  with mesh_context(mesh, experiment.rules):
    step_fn, compile_info = aot_compile(experiment.train_step().jitted, experiment.layout.abstract_state,
                                        _abstract_batch(first_batch))
  logging.info("train step: %s in %.1fs", compile_info.source, compile_info.seconds)
  xla_flops = flops_lib.compiled_flops(step_fn)
  if xla_flops:
    logging.info("XLA counts %.4g FLOPs per device per step (%.4g per token over the mesh; model count %.4g, "
                 "%.4g with dense attention; XLA counts a scanned layer stack's body once)", xla_flops,
                 xla_flops * mesh.size / tokens_per_step, flops.train, flops.train_dense_attention)
  eval_every, eval_step = int(config.train.eval_every), None
  if eval_every > 0:
    eval_step = experiment.eval_step()

  log_every = max(int(config.train.log_every), 1)
  profiler = StepProfiler(str(config.train.profile_steps), workdir)
  known_nonfinite = int(jax.device_get(state.nonfinite_steps))
  window: list[dict[str, jax.Array]] = []
  window_start, excluded_s = time.perf_counter(), 0.0
  batch, stopped_early = first_batch, False
  try:
    for step in range(start_step, total_steps):
      profiler.before_step(step)
      if batch is None:
        batch = next(batches)
      state, step_metrics = step_fn(state, batch)
      batch = None
      done = step + 1
      window.append(step_metrics)
      profiler.after_step(step, step_metrics)
      is_last = done == total_steps
      preempted = watcher.should_stop(done)
      saving = is_last or preempted or checkpoints.should_save(done)

      if done % log_every == 0 or is_last or preempted or saving:
        fetched = jax.device_get(window)
        elapsed = time.perf_counter() - window_start - excluded_s
        row = summarize_window(fetched)
        step_time = elapsed / len(fetched)
        tokens_per_s = tokens_per_step / step_time
        row.update(step_time_s=step_time, tokens_per_s=tokens_per_s,
                   mfu=flops_lib.mfu(flops.train, tokens_per_s, peak, mesh.size),
                   eta_s=step_time * (total_steps - done))
        bad_steps = [done - len(fetched) + i + 1 for i, m in enumerate(fetched) if int(m["nonfinite"])]
        if bad_steps:
          logging.error("non-finite loss or gradient norm at step(s) %s: update skipped (train.nonfinite=%s)",
                        bad_steps, nonfinite_mode)
          known_nonfinite += len(bad_steps)
          row["nonfinite_steps"] = known_nonfinite
          if nonfinite_mode == "stop":
            metrics.write(done, row)
            raise NonFiniteLossError(f"non-finite loss or gradient norm at step(s) {bad_steps}; stopping as "
                                     f"config.train.nonfinite='stop' (newest checkpoint: step "
                                     f"{checkpoints.latest_step()})")
        row["nonfinite_steps"] = known_nonfinite
        metrics.write(done, row)
        logging.info("step %d/%d loss %.4f grad_norm %.3f lr %.3e | %.0f tokens/s, %.3fs/step, MFU %.2f%%, ETA %s",
                     done, total_steps, row.get("loss", float("nan")), row.get("grad_norm", float("nan")),
                     row.get("learning_rate", float("nan")), tokens_per_s, step_time, 100 * row["mfu"],
                     format_duration(row["eta_s"]))
        last = {"step": done, **row}
        window, window_start, excluded_s = [], time.perf_counter(), 0.0

      if eval_step is not None and (done % eval_every == 0 or is_last):
        started = time.perf_counter()
        scores = evaluate(experiment, state.params, eval_step, int(config.train.eval_steps))
        if scores:
          metrics.write(done, scores)
          logging.info("step %d eval_loss %.4f over %d tokens", done, scores["eval_loss"], scores["eval_tokens"])
          last.update(scores)
        excluded_s += time.perf_counter() - started

      if saving:  # Its blocking part counts in the next window's step time: that is what checkpoints cost.
        checkpoints.save(done, state, batches.get_state(), config=config, force=is_last or preempted)
      if preempted and not is_last:
        logging.warning("preempted: stopping after step %d with a checkpoint", done)
        stopped_early = True
        break
  finally:
    profiler.stop()
    checkpoints.close()  # Waits for the background write of the last checkpoint.
    metrics.close()
  last["preempted"] = stopped_early
  return last
