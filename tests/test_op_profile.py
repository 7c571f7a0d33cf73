"""The profile table's bookkeeping: which ops are matmuls, which model part they belong to, wall-time sharing."""

from tweetjax.perf import op_profile

_HLO = """HloModule m

%fused_dot (p0: f32[4,8], p1: f32[8,16]) -> f32[4,16] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  ROOT %d = f32[4,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_exp (p0: f32[4,16]) -> f32[4,16] {
  %p0 = f32[4,16]{1,0} parameter(0)
  ROOT %e = f32[4,16]{1,0} exponential(%p0)
}

ENTRY %main (a: f32[4,8], b: f32[8,16]) -> f32[4,16] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,16]{1,0} parameter(1)
  %ynn_fusion = f32[4,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(f)/jvp(Transformer)/while/body/closed_call/layers/mlp/dot_general"}
  %dot.1 = f32[4,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/jvp()/while/body/closed_call/cd,dv->cv/dot_general"}
  ROOT %exp_fusion = f32[4,16]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_exp, metadata={op_name="jit(f)/jvp(Transformer)/while/body/closed_call/layers/attention/while/body/exp"}
}
"""


def test_hlo_ops_finds_matmuls_inside_fusions_and_names_the_model_part():
  ops = op_profile.hlo_ops(_HLO)
  assert ops["ynn_fusion"] == op_profile.OpInfo(True, "mlp", "fusion")
  assert ops["dot.1"] == op_profile.OpInfo(True, "lm head + loss", "dot")
  assert ops["exp_fusion"] == op_profile.OpInfo(False, "attention blocks", "fusion")
  assert op_profile.model_part("jit(f)/jit(clip)/mul") == "optimizer, grad norm, NaN guard"


def test_concurrent_ops_share_the_wall_time_they_overlap_and_a_dot_owns_the_gap_after_it():
  ops = op_profile.hlo_ops(_HLO)
  events = [{"name": "ynn_fusion", "ts": 0, "dur": 100}, {"name": "dot.1", "ts": 50, "dur": 100},
            {"name": "exp_fusion", "ts": 300, "dur": 10}, {"name": "exp_fusion", "ts": 400, "dur": 10},
            {"name": "not_in_hlo", "ts": 0, "dur": 1000}]
  wall = op_profile.wall_attributed(events, ops)
  assert wall[("matmul", "mlp")] == 50 + 25
  # [50, 100) shared with the fusion, [100, 150) alone, then the idle [150, 300) until the next op: the async dot's
  assert wall[("matmul", "lm head + loss")] == 25 + 50 + 150
  assert wall[("other", "attention blocks")] == 10 + 10  # the gap [310, 400) follows a fusion: nobody's
  assert sum(wall.values()) == 320


def test_a_gap_after_a_fusion_that_overlapped_a_dot_is_not_the_dots():
  ops = op_profile.hlo_ops(_HLO)
  events = [{"name": "dot.1", "ts": 0, "dur": 100}, {"name": "exp_fusion", "ts": 50, "dur": 100},
            {"name": "exp_fusion", "ts": 200, "dur": 10}]
  wall = op_profile.wall_attributed(events, ops)
  assert wall[("matmul", "lm head + loss")] == 50 + 25 and wall[("other", "attention blocks")] == 25 + 50 + 10
