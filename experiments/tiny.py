"""Tiny model for tests and the demo: seconds per step on a CPU, shardable on every 8-device layout.

  --config=experiments/tiny.py
"""

from tweetjax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.update(vocab_size=1024, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16,
                      mlp_dim=256)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.data.seq_len = 128
  config.data.global_batch_size = 16
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 10
  config.train.steps = 100
  config.lock()
  return config


def sweep():
  """Example: `python tools/sweep.py --config=experiments/tiny.py --workdir=/tmp/tiny_sweep --parallel=2`."""
  from tweetjax.sweep import product, zip_
  return product({"optimizer.learning_rate": [1e-3, 3e-3]},
                 zip_({"model.d_model": [64, 128], "model.mlp_dim": [256, 512]}),
                 {"train.steps": [50]})
