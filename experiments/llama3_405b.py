"""Llama 3 405B shape: 126 layers, d_model 16,384, 128 query / 8 kv heads of 128, SwiGLU 53,248, vocab 128,256
(untied), RoPE theta 500,000; 405.85B parameters by eval_shape.

Layout for a 16,384-GPU job (8 GPUs per node), outermost first: data 32 x stage 2 x fsdp 32 x tensor 8.
tensor=8 fills a node (heads 128/8, kv heads 8/8, mlp 53,248/8, vocab 128,256/8); stage and fsdp span nodes.
126 = 2 x 3^2 x 7 layers: a stage count must divide it and the device count, so on a power-of-two cluster the
pipeline has 2 stages; 21 circular repeats (3 layers per stage and repeat) take the bubble from 1/3 (GPipe, 2
microbatches) to (2 - 1) / (21 x 2 + 2 - 1) = 2.3%. The residual stream is split over `tensor` between layers
(see below). Dry-run of the 512-device replica: 61.4 GiB per device (XLA:CPU; analytic 34.0 GiB, 22.0 GiB with
flash attention), fits 80 GiB (benchmarks/RESULTS.md, with the other layouts tried).

The global batch is Llama 3's 16M tokens (2,048 rows of 8,192): 64 rows per 512-device data-parallel replica
(stage 2 x fsdp 32 x tensor 8, which holds the whole model), 1 row per batch shard (data x fsdp) in each of the
2 pipeline microbatches. benchmarks/RESULTS.md dry-runs that replica, whose per-device shapes are the job's:

  python tools/dryrun.py --config=experiments/llama3_405b.py --mesh=stage=2,fsdp=32,tensor=8 --global_batch=64
"""

from tweetjax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.update(vocab_size=128_256, d_model=16_384, num_layers=126, num_heads=128, num_kv_heads=8,
                      head_dim=128, mlp_dim=53_248, rope_theta=500_000.0, dtype="bfloat16", remat_policy="full")
  config.mesh.update(data=-1, stage=2, fsdp=32, tensor=8)  # data=32 on 16,384 GPUs
  # The residual stream between layers split over `tensor` too (d_model, Megatron-style sequence parallelism's
  # effect): remat keeps 1/8 of each layer input per device; the all-reduce after each block becomes a
  # reduce-scatter and the next block starts with an all-gather (benchmarks/RESULTS.md: XLA:CPU peak 129 -> 63 GiB).
  config.logical_axis_rules = [rule if rule[0] != "act_embed" else ["act_embed", "tensor"]
                               for rule in config.logical_axis_rules]
  config.data.seq_len = 8192
  config.data.global_batch_size = 2048
  config.train.pipeline_microbatches = 2
  config.train.pipeline_repeats = 21
  config.train.steps = 1_000_000
  config.lock()
  return config
