"""The CPU benchmark shape: ~56M params (d_model 512, 8 layers, 8 heads / 4 kv heads, mlp 1408, vocab 32k untied)."""

from tweetjax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.update(vocab_size=32_000, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                      mlp_dim=1408, logits_chunk=1024,  # tiled LM head + loss: no [4096, 32000] logits
                      # Blocks of 64: packed tweets mask more whole block pairs, which are skipped; the step was
                      # 1.01-1.09x block 128's on AVX2 and AVX512-BF16 CPUs, fp32 and bf16 (benchmarks/RESULTS.md).
                      attention_block_size=64)
  config.mesh.update(data=-1)
  config.data.seq_len = 512
  config.data.global_batch_size = 8
  config.optimizer.learning_rate = 1e-3
  config.train.steps = 1000
  config.lock()
  return config
