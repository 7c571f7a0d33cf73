"""FLOP counting: hand counts, MoE active experts, and agreement with XLA's count of the compiled step."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import load_config
from tweetjax.model.config import ModelConfig
from tweetjax.parallel.rules import batch_sharding, mesh_context
from tweetjax.train import flops as flops_lib
from tweetjax.train.experiment import build_experiment
from tweetjax.train.profiling import parse_profile_steps


def test_hand_count_tiny():
  cfg = ModelConfig.from_config(load_config("tiny").model)  # D 64, H 8, K 4, Dh 16, F 256, V 1024, 2 layers
  f = flops_lib.flops_per_token(cfg, 128)
  per_layer = 64 * 8 * 16 + 2 * 64 * 4 * 16 + 8 * 16 * 64 + 3 * 64 * 256
  assert f.matmul_params == 2 * per_layer + 64 * 1024
  assert f.embedding_params == 1024 * 64
  assert f.forward_attention_dense == 4 * 128 * 8 * 16 * 2
  assert f.forward_attention == f.forward_attention_dense / 2  # causal
  assert f.train == 6 * f.matmul_params + 6 * 128 * 8 * 16 * 2
  # Tying the embeddings does not remove the LM head matmul.
  assert flops_lib.flops_per_token(dataclasses.replace(cfg, tie_embeddings=True), 128).train == f.train


def test_moe_counts_active_experts_and_router():
  dense = ModelConfig.from_config(load_config("tiny").model)
  moe = dataclasses.replace(dense, num_experts=8, experts_per_token=2, moe_every=2, expert_mlp_dim=128)
  got = flops_lib.flops_per_token(moe, 128).matmul_params - flops_lib.flops_per_token(dense, 128).matmul_params
  # Layer 1 of 2 is MoE: its dense MLP is replaced by 2 active experts of width 128 plus an 8-way router.
  assert got == (2 * 3 * 64 * 128 + 64 * 8) - 3 * 64 * 256


def test_mfu_and_profile_steps():
  assert flops_lib.mfu(1e6, 2e3, 1e10, 2) == pytest.approx(0.1)
  assert parse_profile_steps("") is None
  assert parse_profile_steps("5,8") == (5, 8)
  assert parse_profile_steps("3") == (1, 4)
  with pytest.raises(ValueError, match="profile_steps"):
    parse_profile_steps("8,5")


def test_model_count_matches_xla_for_the_small_train_step():
  """XLA's FLOP count of the whole train step of experiments/small.py (lowered from ShapeDtypeStructs, nothing
  runs) against the model count. Like with like: XLA counts forward + backward (and the optimizer and elementwise
  work, a fraction of a percent here) and the dense masked attention the 'xla' kernel executes, so the comparison
  is with `train_dense_attention`. Layers are unrolled because XLA counts a scanned (while-loop) body once. The
  lowered module's count equals the compiled one's to 0.1% here; lowering skips the ~20 s compile."""
  config = load_config("small")
  config.model.scan_layers = False
  # The 'xla' kernel and dense logits: cost_analysis also counts the blockwise kernel's and the tiled loss's loops once.
  config.model.update(attention_impl="xla", logits_chunk=0)
  experiment = build_experiment(config, devices=jax.devices()[:1])
  B, L = config.data.global_batch_size, config.data.seq_len
  sharding = batch_sharding(experiment.mesh)
  batch = {k: jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=sharding)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["weights"] = jax.ShapeDtypeStruct((B, L), jnp.float32, sharding=sharding)
  with mesh_context(experiment.mesh, experiment.rules):
    lowered = experiment.train_step().jitted.lower(experiment.layout.abstract_state, batch)
  xla_per_token = flops_lib.compiled_flops(lowered) / (B * L)
  f = flops_lib.flops_per_token(experiment.model_config, L)
  assert xla_per_token == pytest.approx(f.train_dense_attention, rel=0.10)
  # The causal count (what MFU uses) is below what the dense kernel executes, by about the masked half.
  assert f.train < xla_per_token
  assert xla_per_token - f.train == pytest.approx(f.train_dense_attention - f.train, rel=0.5)
