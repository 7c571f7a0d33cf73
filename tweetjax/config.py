"""The default experiment config; every file in experiments/ starts from `base_config()` and overrides it.

Configs are ml_collections.ConfigDicts, locked before they are returned so that a mistyped override
(`--config.model.num_layer=4`) fails instead of silently adding a key.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from tweetjax.model.config import ModelConfig
from tweetjax.parallel.rules import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Architecture: the fields of tweetjax.model.config.ModelConfig, documented there.
  config.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))

  # Mesh axis sizes; their product must equal the device count; one axis may be -1 (= all remaining devices).
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
  # Logical axis name -> mesh axes (or None). The only place that decides placement.
  config.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"  # "synthetic": learnable random-token stream; "tweets": the tweet loader
  config.data.seq_len = 128
  config.data.global_batch_size = 16
  config.data.dataset_dir = ""
  config.data.tokenizer_path = ""
  config.data.shuffle_seed = 0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3e-4
  config.optimizer.schedule = "cosine"  # cosine | linear | constant (after linear warmup)
  config.optimizer.warmup_steps = 100
  config.optimizer.decay_steps = 0  # 0: decay over train.steps
  config.optimizer.end_learning_rate_ratio = 0.1
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 1.0  # 0 disables clipping

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1000
  config.train.microbatches = 1  # gradient accumulation inside the jitted step
  config.train.z_loss_weight = 1e-4
  config.train.log_every = 10

  # --- Training loop: checkpoints, preemption, metrics, profiling (tweetjax/train/loop.py) ---
  config.train.nonfinite = "skip"  # NaN/Inf loss or grad norm: "skip" the update (counted) | "stop" the run
  config.train.eval_every = 0  # validation loss every N steps (0: off); synthetic data uses the seed + 1 stream
  config.train.eval_steps = 4  # batches per validation pass
  config.train.profile_steps = ""  # "START,STOP": jax.profiler trace of those steps into <workdir>/profile; "N": N steps
  config.train.compilation_cache_dir = ""  # "": <workdir>/../jax_cache; "none": no persistent compilation cache
  config.train.peak_flops_per_device = 0.0  # MFU denominator; 0: from the device kind (CPU: a measured matmul)
  config.train.preemption_check_every = 1  # steps between the multi-host agreement on a SIGTERM stop
  config.train.tensorboard = True  # event files in <workdir>/tensorboard (metrics.jsonl is always written)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 500  # async save every N steps (0: only at the end and on preemption)
  config.checkpoint.max_to_keep = 3  # the newest k checkpoints are kept ...
  config.checkpoint.keep_every_steps = 0  # ... plus every step divisible by M, forever (0: none)
  config.checkpoint.async_save = True  # write in the background; the step loop waits only for device->host copies
  # --- end training loop ---
  return config
