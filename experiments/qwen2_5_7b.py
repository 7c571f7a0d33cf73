"""Qwen2.5 7B shape (Qwen/Qwen2.5-7B): 7,615,616,512 params, untied, 152,064-token vocab (151,643 + padding).

28 layers, d_model 3584, 28 query / 4 kv heads of 128, SwiGLU 18,944, biases on the q/k/v projections, RoPE theta
1,000,000 (no scaling), RMSNorm eps 1e-6. Tensor parallelism up to 4 (the kv heads).

  --config=experiments/qwen2_5_7b.py
"""

from tweetjax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.update(vocab_size=152_064, d_model=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                      mlp_dim=18_944, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=False, norm_eps=1e-6,
                      dtype="bfloat16", remat_policy="dots_no_batch")
  config.mesh.update(data=1, fsdp=-1)
  config.data.seq_len = 4096
  config.data.global_batch_size = 256
  config.train.steps = 100_000
  config.lock()
  return config
