"""tools/dryrun.py on a 16-device fake mesh (subprocess): exact param bytes per device, FLOPs vs flops.py, and no
gather of the full-vocab logits in the tensor-parallel step; plus the HLO reader on hand-written HLO."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_config
from tweetjax.model.config import ModelConfig
from tweetjax.perf import hlo
from tweetjax.train import flops as flops_lib

# tiny on data=2, fsdp=4, tensor=2: params [.., D=64 over fsdp, heads/mlp/vocab over tensor].
_MESH = {"data": 2, "fsdp": 4, "expert": 1, "tensor": 2}


@pytest.fixture(scope="module")
def tiny_dryrun(tmp_path_factory):
  out = tmp_path_factory.mktemp("dryrun") / "tiny.json"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  cmd = [sys.executable, os.path.join(REPO, "tools", "dryrun.py"), "--config=experiments/tiny.py",
         "--mesh=" + ",".join(f"{k}={v}" for k, v in _MESH.items()), "--device_memory_gib=1",
         "--predict=h100", f"--json_out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "estimate for a GPU" in proc.stdout
  assert "\npredicted: " in proc.stdout and "MFU" in proc.stdout.split("\npredicted: ")[1]
  return json.loads(out.read_text())


def _expected_param_bytes_per_device() -> int:
  c = ModelConfig.from_config(load_config("tiny").model)
  D, H, K, Dh, F, V, N = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size, c.num_layers
  fsdp, tensor = _MESH["fsdp"], _MESH["tensor"]
  sharded_both = N * (D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F) + V * D + D * V  # embed x (heads|mlp|vocab)
  norms = 2 * N * D + D  # replicated
  return 4 * (sharded_both // (fsdp * tensor) + norms)


def test_param_bytes_per_device_are_exact(tiny_dryrun):
  expected = _expected_param_bytes_per_device()
  assert tiny_dryrun["analytic"]["params"] == expected
  assert tiny_dryrun["param_bytes_hlo"] == expected  # what the compiled program's entry parameters hold
  # AdamW: two moments per param (same shards) plus replicated counters.
  assert 2 * expected <= tiny_dryrun["analytic"]["optimizer"] <= 2 * expected + 64


def test_flops_match_the_model_count(tiny_dryrun):
  config = load_config("tiny")
  f = flops_lib.flops_per_token(ModelConfig.from_config(config.model), config.data.seq_len)
  tokens_per_device = config.data.global_batch_size * config.data.seq_len / 16
  # The 'xla' attention runs the dense L x L product, so the like-for-like count is the dense one.
  assert tiny_dryrun["hlo_dot_flops"] == pytest.approx(f.train_dense_attention * tokens_per_device, rel=0.10)
  assert tiny_dryrun["model_flops"] == pytest.approx(f.train * tokens_per_device)


def test_memory_report_and_no_full_logits_gather(tiny_dryrun):
  xla = tiny_dryrun["xla_memory"]
  assert xla["argument"] > tiny_dryrun["param_bytes_hlo"] and xla["temp"] > 0
  assert tiny_dryrun["fits"] is True
  assert tiny_dryrun["collectives"]["all-reduce"]["ops"] > 0  # the tensor-parallel partial sums
  # Vocab-parallel cross-entropy: no all-gather may produce the [b, L, V] logits of a batch shard.
  config = load_config("tiny")
  rows, L, V = config.data.global_batch_size // 8, config.data.seq_len, config.model.vocab_size
  largest = tiny_dryrun["collectives"]["all-gather"]["largest"]
  assert largest and hlo.parse_shapes(largest)[0].size < rows * L * V


def test_compiled_prediction_matches_the_analytic_inventory(tiny_dryrun):
  """--predict on the compiled program: the analytic FLOPs of the same CPU program equal the HLO's, the analytic
  FSDP gathers equal the compiled ones, and tensor-parallel all-reduces are never counted above the GPU's number."""
  pred = tiny_dryrun["prediction"]
  assert pred["source"].startswith("compiled on all 16") and pred["devices"] == 16 and pred["step_s"] > 0
  checks = {(c["cls"], c["kind"], tuple(c["axes"])): c for c in pred["compiled_checks"]}
  gathers = checks[("fsdp", "all-gather", ("fsdp",))]
  assert gathers["compiled_bytes"] == pytest.approx(gathers["analytic_bytes"], rel=0.05)
  tp = checks[("tp", "all-reduce", ("tensor",))]
  assert tp["compiled_bytes"] >= tp["analytic_bytes"] and tp["used"].startswith("analytic")
  used_tp = sum(c["bytes"] * c["count"] for c in pred["comms"] if c["axes"] == ["tensor"])
  assert used_tp == pytest.approx(tp["analytic_bytes"])


_HLO = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = f32[8,64]{1,0} all-gather(%d), channel_id=1, replica_groups=[2,4]<=[8], dimensions={1}
  %rs = f32[8,4]{1,0} reduce-scatter(%ag), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={1}
  ROOT %t = (s32[], f32[8,16]) tuple(%p, %d)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %ar = f32[8,16]{1,0} all-reduce(%a), channel_id=3, replica_groups=mesh['x'=2,'y'=4] {'y'}, to_apply=%body
  %w = (s32[], f32[8,16]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[8,16]{1,0} get-tuple-element(%w), index=1
}
"""


def test_hlo_reader_weights_loop_bodies_by_trip_count():
  module = hlo.parse_module(_HLO)
  assert module.multiplicity["body"] == 5 and module.multiplicity["main"] == 1
  assert hlo.dot_flops(module) == 5 * 2 * 8 * 16 * 16
  stats = hlo.collective_stats(module)
  assert stats["all-gather"].executions == 5 and stats["all-gather"].payload_bytes == 5 * 8 * 64 * 4
  assert stats["all-gather"].wire_bytes == 5 * 8 * 64 * 4 * 3 / 4  # groups of 4
  assert stats["reduce-scatter"].payload_bytes == 5 * 8 * 4 * 4 * 4  # input = output x group size
  assert stats["all-reduce"].executions == 1 and stats["all-reduce"].wire_bytes == 2 * 8 * 16 * 4 * 3 / 4


def test_analytic_memory_knows_blockwise_attention_and_the_tiled_loss():
  from tweetjax.perf.memory import activations
  b, L, V = 2, 1024, 32_000
  dense = ModelConfig(vocab_size=V, remat_policy="dots", attention_impl="xla")
  tiled = ModelConfig(vocab_size=V, remat_policy="dots", attention_impl="blockwise", attention_block_size=128,
                      logits_chunk=256)
  args = (b, L, 1, 1, 1, "dots", 4)
  a, t = activations(dense, *args), activations(tiled, *args)
  H, D = dense.num_heads, dense.d_model
  assert a.saved_scores == dense.num_layers * b * H * L * L * 4 and t.saved_scores == 0  # no [L, L] kept
  assert a.transient_scores == 3 * b * H * L * L * 4 and t.transient_scores == 3 * b * H * 128 * 128 * 4
  assert a.logits == b * L * V * 12
  assert t.logits == 256 * V * 16 + D * V * 4 + b * L * D * 4  # one chunk, whatever b * L
  assert activations(tiled, 4 * b, *args[1:]).logits - t.logits == 3 * b * L * D * 4


def test_memory_estimate_counts_one_chunk_of_logits_with_logits_chunk():
  import jax
  from tweetjax.perf import memory
  from tweetjax.train.experiment import build_experiment
  config = load_config("tiny")
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  estimates = {}
  for chunk in (0, 16):
    config.model.logits_chunk = chunk
    experiment = build_experiment(config, jax.devices()[:1])
    estimates[chunk] = memory.estimate(experiment, int(config.data.global_batch_size), 1).logits
  m = ModelConfig.from_config(config.model)
  tokens = int(config.data.global_batch_size) * int(config.data.seq_len)
  assert estimates[0] == tokens * m.vocab_size * 12
  assert estimates[16] == 16 * m.vocab_size * 16 + m.d_model * m.vocab_size * 4 + tokens * m.d_model * 4
