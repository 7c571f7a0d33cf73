"""Decode speed with and without the KV cache: generated tokens per second for the same prompts and model.

  python tools/bench_decode.py --config=experiments/tiny.py [--batch=8 --prompt_len=32 --new_tokens=64 --repeats=3]
      [--workdir=DIR]  (restore a checkpoint; default: freshly initialised params, same speed)

Greedy decoding with EOS disabled, so both variants generate exactly batch x new_tokens tokens. Compilation is
excluded (one warm-up call each); the best of --repeats is reported. Timings on a shared or loaded machine are noisy.
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from tweetjax.evaluate import common
from tweetjax.model.decode import SamplingConfig, Sampler
from tweetjax.train.experiment import build_experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Restore params from here (default: random init).")
_BATCH = flags.DEFINE_integer("batch", 8, "Prompts per batch.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per variant (best is reported).")


def main(argv):
  del argv
  config = _CONFIG.value
  experiment = build_experiment(config)
  if _WORKDIR.value:
    params, _ = common.restore_params(experiment, _WORKDIR.value)
  else:
    params = experiment.init_state().params
  rng = np.random.default_rng(0)
  prompts = [[1] + rng.integers(4, config.model.vocab_size, _PROMPT_LEN.value - 1).tolist()
             for _ in range(_BATCH.value)]
  sampling = SamplingConfig(max_new_tokens=_NEW.value, temperature=0.0, eos_id=-1)
  sampler = Sampler(experiment.model, experiment.mesh, experiment.rules)
  rates = {}
  for use_cache in (True, False):
    sampler.generate(params, prompts, sampling, use_cache=use_cache)  # compile
    best = float("inf")
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      out = sampler.generate(params, prompts, sampling, use_cache=use_cache)
      best = min(best, time.perf_counter() - start)
    tokens = sum(len(row) for row in out.tokens)
    rates[use_cache] = tokens / best
    print(f"{'with KV cache' if use_cache else 'no cache (full recompute)':<28} {tokens} tokens in {best:.3f}s: "
          f"{rates[use_cache]:10.1f} tokens/s")
  print(f"speed-up of the KV cache: {rates[True] / rates[False]:.2f}x  (mesh {dict(experiment.mesh.shape)}, "
        f"batch {_BATCH.value}, prompt {_PROMPT_LEN.value}, new {_NEW.value}, {jax.devices()[0].device_kind})")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
