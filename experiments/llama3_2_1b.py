"""Llama 3.2 1B shape (meta-llama/Llama-3.2-1B): 1,235,814,400 params, tied embeddings, 128,256-token vocab.

16 layers, d_model 2048, 32 query / 8 kv heads of 64, SwiGLU 8192, RoPE theta 500,000 with the Llama 3 frequency
scaling (factor 32, low/high frequency factors 1/4, original context 8192) that every Llama 3.1+ checkpoint uses.
Also the GPU benchmark model (experiments/llama_1b.py is this file).

  --config=experiments/llama3_2_1b.py
"""

from tweetjax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.update(vocab_size=128_256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                      mlp_dim=8192, rope_theta=500_000.0, rope_scaling="llama3", rope_scaling_factor=32.0,
                      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
                      tie_embeddings=True, dtype="bfloat16", remat_policy="dots_no_batch")
  config.mesh.update(data=1, fsdp=-1)
  config.data.seq_len = 4096
  config.data.global_batch_size = 64
  config.train.steps = 10_000
  config.lock()
  return config
