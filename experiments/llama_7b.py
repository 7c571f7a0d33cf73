"""Llama (1/2) 7B shape: 6.74B params."""

from tweetjax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.update(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                      mlp_dim=11_008, dtype="bfloat16", remat_policy="dots_no_batch")
  config.mesh.update(data=1, fsdp=-1)
  config.data.seq_len = 4096
  config.data.global_batch_size = 256
  config.train.steps = 100_000
  config.lock()
  return config
