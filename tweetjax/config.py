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
  return config
