"""Llama 3 / 3.1 8B shape (meta-llama/Llama-3.1-8B): 8,030,261,248 params, untied, 128,256-token vocab.

32 layers, d_model 4096, 32 query / 8 kv heads of 128, SwiGLU 14,336, RoPE theta 500,000 with the Llama 3.1
frequency scaling (factor 8, low/high frequency factors 1/4, original context 8192; Llama 3.0 has none:
--config.model.rope_scaling=none).

  --config=experiments/llama3_8b.py
"""

from tweetjax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.update(vocab_size=128_256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      mlp_dim=14_336, rope_theta=500_000.0, rope_scaling="llama3", rope_scaling_factor=8.0,
                      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
                      tie_embeddings=False, norm_eps=1e-5, dtype="bfloat16", remat_policy="dots_no_batch")
  config.mesh.update(data=1, fsdp=-1)
  config.data.seq_len = 8192
  config.data.global_batch_size = 256
  config.train.steps = 100_000
  config.lock()
  return config
