"""Training throughput of a mixture of experts vs the dense model with the same active FLOPs.

  python tools/bench_moe.py                       # experiments/tiny_moe.py vs experiments/tiny.py on one mesh
  python tools/bench_moe.py --steps=5 --rounds=5 --mesh=data=1,fsdp=2,expert=2,tensor=2

Both models run the same jitted train step on the same synthetic batches and mesh; the MoE's experts are sized so
that experts_per_token * expert_mlp_dim equals the dense mlp_dim. Timed windows alternate between the two models.
Prints median tokens/s of each, the per-round ratios, and the MoE's per-expert load and dropped fraction over the
timed steps. On a shared CPU the absolute numbers are noise; the ratio says what routing, dispatch and the
all-to-alls cost next to the dense MLP.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags, logging

_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timed window (after one warm-up step that compiles).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating (MoE window, dense window) rounds.")
_MESH = flags.DEFINE_string("mesh", "data=1,fsdp=2,expert=2,tensor=2", "Mesh axis sizes shared by both models.")
_DEVICES = flags.DEFINE_integer("fake_devices", 8, "On a CPU host: number of fake devices (XLA flag).")
_MOE_CONFIG = flags.DEFINE_string("moe_config", "experiments/tiny_moe.py", "MoE experiment config.")
_DENSE_CONFIG = flags.DEFINE_string("dense_config", "experiments/tiny.py", "Dense experiment config.")


def _load(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None)
  config.unlock()
  return config


class _Runner:
  """One model's compiled train step, state and batches; `window(n)` times n steps."""

  def __init__(self, config):
    from tweetjax.train.experiment import build_experiment
    from tweetjax.train.loop import make_train_iterator

    self.config = config
    experiment = build_experiment(config)
    self.state = experiment.init_state()
    self.step = experiment.train_step()
    self.batches = make_train_iterator(config, experiment)
    self.tokens_per_step = int(config.data.global_batch_size) * int(config.data.seq_len)
    self.history = []
    self.window(1)  # compile
    self.history = []

  def window(self, steps: int) -> float:
    import jax

    batches = [next(self.batches) for _ in range(steps)]
    jax.block_until_ready(batches)
    start = time.perf_counter()
    for batch in batches:
      self.state, metrics = self.step(self.state, batch)
      self.history.append(metrics)
    jax.block_until_ready(self.history[-1])
    return steps * self.tokens_per_step / (time.perf_counter() - start)

  def mean_metrics(self):
    import jax
    import numpy as np

    history = jax.device_get(self.history)
    return {k: float(np.mean([m[k] for m in history])) for k in history[0]}


def main(argv):
  del argv
  import jax

  mesh = {k: int(v) for k, v in (item.split("=") for item in _MESH.value.split(","))}
  moe_config, dense_config = _load(_MOE_CONFIG.value), _load(_DENSE_CONFIG.value)
  for config in (moe_config, dense_config):
    config.mesh.update(mesh)
  active = moe_config.model.experts_per_token * (moe_config.model.expert_mlp_dim or moe_config.model.mlp_dim)
  if active != dense_config.model.mlp_dim:
    logging.warning("active expert width %d != dense mlp_dim %d: FLOPs are not matched", active,
                    dense_config.model.mlp_dim)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh {mesh}")
  moe, dense = _Runner(moe_config), _Runner(dense_config)
  # Alternating short windows: load from other processes hits both models alike; medians drop the outliers.
  moe_tps, dense_tps = [], []
  for _ in range(_ROUNDS.value):
    moe_tps.append(moe.window(_STEPS.value))
    dense_tps.append(dense.window(_STEPS.value))
  ratios = [m / d for m, d in zip(moe_tps, dense_tps)]
  print(f"dense {_DENSE_CONFIG.value}: {statistics.median(dense_tps):,.0f} tokens/s (median of {_ROUNDS.value})")
  print(f"moe   {_MOE_CONFIG.value}: {statistics.median(moe_tps):,.0f} tokens/s (median of {_ROUNDS.value})")
  print(f"moe / dense per round: {' '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")
  moe_metrics = moe.mean_metrics()
  loads = [moe_metrics[f"moe/load_expert_{e}"] for e in range(moe_config.model.num_experts)]
  print("moe load per expert: " + " ".join(f"{x:.3f}" for x in loads)
        + f"  (max/mean {max(loads) * len(loads):.2f}), dropped fraction {moe_metrics['moe/dropped_fraction']:.3f}")


if __name__ == "__main__":
  # Fake devices must be requested before JAX initialises its CPU backend.
  import sys
  from tweetjax.perf import env  # pylint: disable=g-import-not-at-top
  count = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--fake_devices=")), "8")
  # A device count already in XLA_FLAGS wins; also sizes the CPU thread pool for the fake devices.
  env.setup_environment(fake_devices=int(count), distributed=False)
  app.run(main)
