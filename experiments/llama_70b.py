"""Llama 2 70B shape: 68.98B params, 64 heads / 8 kv heads."""

from tweetjax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.update(vocab_size=32_000, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                      mlp_dim=28_672, dtype="bfloat16", remat_policy="full")
  config.mesh.update(data=1, fsdp=-1, tensor=8)
  config.data.seq_len = 4096
  config.data.global_batch_size = 1024
  config.train.steps = 100_000
  config.lock()
  return config
