"""Step-time model: its arithmetic on a hand-computed case, link placement, the published runs it must predict within
20%, hardware overrides, the layout search on a small case, and replica-group parsing (pure Python, no compiles)."""

import dataclasses
import math

import pytest

from tests.helpers import load_config
from tweetjax.model.config import ModelConfig
from tweetjax.parallel.mesh import MESH_AXES
from tweetjax.perf import hardware, hlo, layout_search, links, plan, published, step_time
from tweetjax.perf.workload import Layout, ModelShape, Program, work
from tweetjax.train import flops as flops_lib

# A made-up GPU with round numbers: 2 per node, 100 TFLOP/s at half efficiency, 1 TB/s HBM at half, NVLink 100 GB/s
# and NIC 10 GB/s at full efficiency, no latency.
_HW = hardware.Hardware("test", bf16_flops=100e12, fp8_flops=0.0, hbm_bytes_per_s=1e12, hbm_bytes=80e9,
                        gpus_per_node=2, nvlink_bytes_per_s=100e9, nic_bytes_per_s=10e9, matmul_efficiency=0.5,
                        attention_efficiency=0.25, hbm_efficiency=0.5, nvlink_efficiency=1.0, nic_efficiency=1.0,
                        nvlink_latency_s=0.0, nic_latency_s=0.0)
# GPT-style: D 1024, 8 heads of 128 (MHA), plain 2-matrix MLP of 4096, vocab 8192, 2 layers, no RoPE.
_SHAPE = ModelShape(num_layers=2, d_model=1024, num_heads=8, num_kv_heads=8, head_dim=128, mlp_dim=4096,
                    vocab_size=8192, mlp_matrices=2, rotary=False)


def test_hand_computed_step():
  """fsdp=2 x tensor=2 on two 2-GPU nodes (tensor inside a node, fsdp across), 4 rows of 1024, no remat."""
  layout = Layout({"fsdp": 2, "tensor": 2}, global_batch=4, seq_len=1024, microbatches=1, remat="none")
  pred = step_time.predict(_SHAPE, layout, Program(), _HW)
  # Per device: 2 rows (batch over fsdp) x 1024 = T = 2048 tokens; weights split over tensor=2.
  # Per layer: attention 4 D^2 = 4,194,304 params, MLP 8 D^2 = 8,388,608; LM head D V = 8,388,608.
  mm_fwd = 2 * (2 * 2048 * 4194304 / 2 + 2 * 2048 * 8388608 / 2) + 2 * 2048 * 8388608 / 2  # 6.872e10
  mm_bwd = 2 * mm_fwd  # no remat
  attn_fwd = 2 * 4 * 2048 * 512 * 8 * 128 / 2  # causal: 512 keys on average, flash kernel
  attn_bwd = 2.5 * attn_fwd
  # Memory-bound bytes: residual stream (2 norms + adds: 8 x 2 bytes x D per token, replicated over tensor), the
  # GELU (read + write F/t), the logits (V/t x (2 + 20) bytes per token: 60% forward, 40% backward) and the
  # embedding lookup (3 x 2 x D per token).
  layer_mem = 8 * 2 * 1024 * 2048 + 4 * 4096 * 2048 / 2
  logits = 2048 * 4096 * 22
  mem_fwd = 2 * layer_mem + 0.6 * logits + 3 * 2 * 2048 * 1024
  mem_bwd = 2 * 2 * layer_mem + 0.4 * logits
  fwd = mm_fwd / 50e12 + attn_fwd / 25e12 + mem_fwd / 0.5e12
  bwd = mm_bwd / 50e12 + attn_bwd / 25e12 + mem_bwd / 0.5e12
  # FSDP across nodes, one member per node: the NIC, 10 GB/s; a 2-member ring moves half the array.
  gather = 0.5 * (12582912 / 2 * 2) / 10e9  # one layer's weights (tensor shard), bf16
  reduce_scatter = gather
  embedding_grads = 0.5 * (2 * 8192 * 1024 / 2 * 2) / 10e9
  # Forward: 2 gathers, one of them (the first layer's) exposed, the other hidden behind 0.85 x compute.
  fwd_exposed = 2 * gather / 2 + max(0.0, 2 * gather / 2 - 0.85 * fwd)
  bwd_comm = 2 * gather + 2 * reduce_scatter + embedding_grads
  bwd_exposed = bwd_comm / 2 + max(0.0, bwd_comm / 2 - 0.85 * bwd)
  # Tensor parallel inside the node (NVLink 100 GB/s): 10 all-reduces of [T, D] bf16, 2 x (1/2) x 4 MiB each.
  tp = 10 * 2 * 0.5 * 2048 * 1024 * 2 / 100e9
  # Optimizer: (2 layers x 12 D^2 + 2 V D) / 4 shards x 32 bytes at 0.5 TB/s; the once-per-step embedding
  # gathers (3 x 0.5 x 8 MiB / 10 GB/s = 1.26 ms) hide behind 0.85 x the forward (1.7 ms).
  optimizer = (2 * 12582912 + 2 * 8388608) / 4 * 32 / 0.5e12
  expected = fwd + bwd + fwd_exposed + bwd_exposed + tp + optimizer
  assert pred.step_s == pytest.approx(expected, rel=1e-12)
  # By hand: 1.994 + 3.729 ms compute, 0.629 + 1.678 ms FSDP, 0.419 ms tensor, 0.671 ms optimizer.
  assert expected == pytest.approx(9.120e-3, rel=1e-3)
  assert pred.components["exposed comm: tensor (nvlink)"] == pytest.approx(tp, rel=1e-12)
  assert pred.components["exposed comm: fsdp (network)"] == pytest.approx(fwd_exposed + bwd_exposed, rel=1e-12)
  assert pred.tokens_per_s == pytest.approx(4 * 1024 / expected)
  assert step_time.predicted_line(pred).startswith(f"predicted: {4096 / expected:.4g} tokens/s")


def test_model_flops_match_train_flops():
  for name in ("llama_70b", "grok1_314b", "tiny_moe"):
    cfg = ModelConfig.from_config(load_config(name).model)
    shape = ModelShape.from_model_config(cfg)
    assert shape.train_flops_per_token(4096) == pytest.approx(flops_lib.flops_per_token(cfg, 4096).train)


def test_link_placement_follows_device_order():
  mesh = {"data": 4, "fsdp": 4, "tensor": 4}  # 64 GPUs, 8 per node: tensor inside, fsdp spans 2 nodes
  assert links.placement(mesh, ("tensor",), 8) == links.Placement(("tensor",), 4, 4, 1)
  fsdp = links.placement(mesh, ("fsdp",), 8)
  assert (fsdp.size, fsdp.local, fsdp.nodes, fsdp.link) == (4, 2, 2, "network")
  data = links.placement(mesh, ("data",), 8)
  assert (data.size, data.local, data.nodes) == (4, 1, 4)
  # Spanning nodes with 2 members each: 2 NICs carry the ring (capped by NVLink).
  h100 = hardware.get_profile("h100")
  assert links.bus_bandwidth(fsdp, h100) == pytest.approx(2 * 50e9 * 0.9)
  assert links.bus_bandwidth(links.placement(mesh, ("tensor",), 8), h100) == pytest.approx(450e9 * 0.8)
  # The mesh order of tweetjax's mesh is a subsequence of the model's device order.
  assert [a for a in links.DEVICE_ORDER if a in MESH_AXES] == list(MESH_AXES)


def test_collective_costs():
  p = links.Placement(("fsdp",), 8, 8, 1)
  hw = dataclasses.replace(_HW, nvlink_latency_s=1e-6)
  assert links.collective_seconds("all-gather", 8e9, p, hw) == pytest.approx(7 / 8 * 8e9 / 100e9 + 7e-6)
  assert links.collective_seconds("all-reduce", 8e9, p, hw) == pytest.approx(2 * 7 / 8 * 8e9 / 100e9 + 6e-6)
  # All-to-all across 4 nodes with 2 members each: 6 of 8 shares leave through the sender's own NIC.
  a2a = links.Placement(("expert",), 8, 2, 4)
  assert links.collective_seconds("all-to-all", 8e9, a2a, _HW) == pytest.approx(6e9 / 10e9)


@pytest.mark.parametrize("check", published.check_all(), ids=lambda c: c.run.name)
def test_published_runs(check):
  """Every published run within 20%, except MosaicML's 2023 H100 rows (benchmarks/RESULTS.md: that software stack
  reached ~0.72 of its own A100 fraction of peak on the same models, the hardware ~0.97): over-predicted, not under."""
  if check.run.hardware == "h100" and check.run.source.startswith("[MPT]"):
    assert 1.1 < check.ratio < 1.8, check.ratio
  else:
    assert check.within_tolerance, f"{check.run.name}: predicted / measured = {check.ratio:.3f}"


def test_hardware_overrides_and_errors():
  hw = hardware.get_profile("H100-SXM", "nic_bytes_per_s=25e9,gpus_per_node=4")
  assert (hw.nic_bytes_per_s, hw.gpus_per_node, hw.bf16_flops) == (25e9, 4, 989e12)
  with pytest.raises(ValueError, match="unknown hardware 'tpu'"):
    hardware.get_profile("tpu")
  with pytest.raises(ValueError, match="nic_gbps=1"):
    hardware.get_profile("a100", "nic_gbps=1")
  with pytest.raises(ValueError, match="matmul_efficiency=1.5"):
    hardware.get_profile("a100", "matmul_efficiency=1.5")
  with pytest.raises(ValueError, match="no fp8 peak"):
    hardware.get_profile("a100").peak_flops(fp8=True)


def test_program_overrides_and_errors():
  program = plan.program_for(load_config("llama_70b"), "grad_reduce=per_step,tp_overlap=0.5,sequence_parallel=true")
  assert (program.grad_reduce, program.tp_overlap, program.sequence_parallel, program.gather_bytes) == (
      "per_step", 0.5, True, 2.0)
  with pytest.raises(ValueError, match="grad_reduce='sometimes'"):
    plan.program_for(load_config("tiny"), "grad_reduce=sometimes")
  with pytest.raises(ValueError, match="'bogus=1'"):
    plan.program_for(load_config("tiny"), "bogus=1")


def test_slice_plans():
  s = plan.plan_slice({"data": 20, "fsdp": 64, "tensor": 8})
  assert s.slice_mesh["data"] == 1 and s.devices == 512 and s.is_slice
  assert plan.plan_slice({"fsdp": 64, "tensor": 8}).slice_mesh == links.full_mesh({"fsdp": 64, "tensor": 8})
  assert plan.plan_slice({"fsdp": 128, "tensor": 8}).slice_mesh is None  # no data axis to shrink
  assert plan.plan_slice({"stage": 4, "tensor": 8}, supported_axes=MESH_AXES).slice_mesh["stage"] == 4
  assert "stage" in plan.plan_slice({"stage": 4, "tensor": 8}, supported_axes=("data", "fsdp", "tensor")).reason


def test_pipeline_bubble():
  layout = Layout({"stage": 4, "tensor": 2}, global_batch=8, seq_len=1024, microbatches=8, remat="full")
  pred = step_time.predict(dataclasses.replace(_SHAPE, num_layers=8), layout, Program(), _HW)
  micro = (pred.step_s - pred.components["pipeline bubble"] - pred.components["optimizer update"]) / 8
  assert pred.components["pipeline bubble"] == pytest.approx(3 * micro, rel=1e-6)
  assert step_time.bubble_fraction(4, 8) == pytest.approx(3 / 11)
  assert step_time.bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)


def test_layout_search_ranks_fitting_layouts():
  shape = ModelShape.from_model_config(ModelConfig.from_config(load_config("llama_7b").model))
  result = layout_search.search(shape, 64, 256, 4096, Program(), hardware.get_profile("h100"))
  assert result.ranked and result.considered > len(result.ranked)
  steps = [c.prediction.step_s for c in result.ranked]
  assert steps == sorted(steps)
  for c in result.ranked:
    assert c.memory.total <= result.memory_limit and c.layout.devices == 64
    assert set(a for a, n in c.layout.mesh.items() if n > 1) <= set(MESH_AXES)
  # More memory per GPU can only keep or improve the best step time.
  bigger = layout_search.search(shape, 64, 256, 4096, Program(), hardware.get_profile("h200"))
  assert bigger.ranked[0].prediction.step_s <= result.ranked[0].prediction.step_s


def test_replica_groups_to_mesh_axes():
  mesh = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
  cases = {
      "replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}": ("fsdp",),
      "replica_groups={{0,2},{1,3},{4,6},{5,7}}, metadata={}": ("expert",),
      "replica_groups=[4,2]<=[8], to_apply=%add": ("tensor",),
      "replica_groups=mesh['a'=1,'b'=2,'c'=2,'d'=2], device_ids=([2,2,2]T(1,0,2)) {'b'}, to_apply=%x": ("expert",),
      "replica_groups=mesh['a'=4,'b'=1,'c'=2] {'a'}, x": ("fsdp", "expert"),
      "replica_groups={}, to_apply=%x": ("fsdp", "expert", "tensor"),
  }
  for attrs, axes in cases.items():
    assert hlo.group_axes(hlo.first_replica_group(attrs, 8), mesh) == axes, attrs
  assert math.prod(mesh.values()) == 8
