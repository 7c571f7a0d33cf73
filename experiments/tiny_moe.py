"""Tiny mixture of experts for tests, the demo and tools/bench_moe.py: experiments/tiny.py with 8 experts, top-2.

Each expert has half of tiny's MLP width, so with 2 active experts per token the active FLOPs match tiny's dense
model (plus the D x E router). Mesh (fsdp=2, expert=2, tensor=2): every MoE code path (FSDP-gathered expert
weights, all-to-all over 'expert', psum over 'tensor') runs on 8 devices.

  --config=experiments/tiny_moe.py            (every layer MoE)
  --config=experiments/tiny_moe.py:moe_every=2  (layers 2, 4: MoE; 1, 3: dense; scanned as 2 groups of 2)
"""

from tweetjax.config import base_config
from tweetjax.config_args import parse_arg


def get_config(arg=None):
  moe_every = parse_arg(arg, moe_every=1).moe_every
  config = base_config()
  config.model.update(vocab_size=1024, d_model=64, num_layers=2 * moe_every, num_heads=8, num_kv_heads=4,
                      head_dim=16, mlp_dim=256, num_experts=8, experts_per_token=2, moe_every=moe_every,
                      expert_mlp_dim=128, capacity_factor=1.25, router_aux_loss_weight=0.01,
                      router_z_loss_weight=0.001)
  config.mesh.update(data=1, fsdp=2, expert=2, tensor=2)
  config.data.seq_len = 128
  config.data.global_batch_size = 16
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 10
  config.train.steps = 100
  config.lock()
  return config
