"""Llama 3.2 1B shape (1.24B params): tied embeddings, 128k vocab, RoPE theta 500k. The GPU benchmark model."""

from tweetjax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.update(vocab_size=128_256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                      mlp_dim=8192, rope_theta=500_000.0, tie_embeddings=True, dtype="bfloat16",
                      remat_policy="dots_no_batch")
  config.mesh.update(data=1, fsdp=-1)
  config.data.seq_len = 4096
  config.data.global_batch_size = 64
  config.train.steps = 10_000
  config.lock()
  return config
