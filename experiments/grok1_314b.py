"""grok-1 shape (public release): 314B-parameter mixture of experts, 8 experts with 2 active per token.

64 layers, d_model 6144, 48 query / 8 kv heads of 128, 131,072-token SentencePiece vocab, attention logit soft-cap
30, sandwich norms, tied input/output embedding. Expert MLP hidden size: widening factor 8 with the 2/3 rule,
int(8 * 6144) * 2 // 3 = 32768 (already a multiple of 8); SwiGLU here where grok-1 uses a gated GELU (same
parameter count). grok-1's embedding/output multipliers are not modelled. Attention is blockwise (cuDNN has no
soft-cap) and the LM head + loss tiled (logits_chunk). 315.7B parameters by eval_shape
(tests/model/test_moe.py).

Layout for 512 GPUs: tensor=4 (heads 48/4, kv heads 8/4, expert F 32768/4) inside a node, expert=8 (one expert
per shard), fsdp=-1 (16 on 512 devices) over the rest; the batch is sharded over data*fsdp*expert = 128
(one row per device per microbatch).

With pipeline stages (`:stages=S`): stage=S takes devices from fsdp (16 / S), the 64 layers run in 32 / S
circular repeats of 2 layers per stage, S pipeline microbatches per accumulation microbatch (one row per batch
shard), and the residual stream between layers is split over `tensor` as in experiments/llama3_405b.py.
stages=2 on 512 devices: bubble 3.0%, 46.0 GiB per device (XLA:CPU; benchmarks/RESULTS.md).

  --config=experiments/grok1_314b.py
  --config=experiments/grok1_314b.py:stages=2
"""

from tweetjax.config import base_config
from tweetjax.config_args import parse_arg


def get_config(arg=None):
  stages = parse_arg(arg, stages=1).stages
  config = base_config()
  config.model.update(vocab_size=131_072, d_model=6144, num_layers=64, num_heads=48, num_kv_heads=8, head_dim=128,
                      mlp_dim=32_768, rope_theta=10_000.0, tie_embeddings=True, norm_style="sandwich",
                      attn_logit_softcap=30.0, num_experts=8, experts_per_token=2, moe_every=1,
                      expert_mlp_dim=32_768, capacity_factor=1.25, router_aux_loss_weight=0.01,
                      router_z_loss_weight=0.001, dtype="bfloat16", remat_policy="full",
                      attention_impl="blockwise", attention_block_size=512, logits_chunk=2048)
  config.mesh.update(data=1, fsdp=-1, expert=8, tensor=4)
  config.data.seq_len = 8192
  config.data.global_batch_size = 1024
  config.train.microbatches = 8  # one 8192-token row per device per microbatch
  if stages > 1:
    config.mesh.update(stage=stages)  # fsdp=-1 fills the rest: 16 / stages on 512 devices
    config.train.pipeline_microbatches = stages
    config.train.pipeline_repeats = 64 // (2 * stages)
    config.logical_axis_rules = [rule if rule[0] != "act_embed" else ["act_embed", "tensor"]
                                 for rule in config.logical_axis_rules]
  config.train.steps = 100_000
  config.lock()
  return config
