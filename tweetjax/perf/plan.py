"""Step-time predictions for an experiment config (tools/dryrun.py --predict): from its compiled program, from a
compiled slice of a mesh too large to fake, or analytically; and the layout search's compile confirmation.

A mesh XLA:CPU cannot fake in one process (beyond --slice_devices, 512 by default) is compiled as a slice with the
same per-device shapes: `data` shrinks (and the global batch with it), every other axis stays, so each device holds
the same shards and rows. Collectives over the shrunk `data` axis cannot be seen in the slice and stay analytic. A
mesh with axes tweetjax's mesh does not have yet (tweetjax/parallel/mesh.py MESH_AXES) is predicted analytically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from typing import Any, Sequence

import ml_collections
import numpy as np

from tweetjax.model.config import ModelConfig
from tweetjax.parallel import mesh as mesh_lib
from tweetjax.parallel.rules import rules_from_config
from tweetjax.perf import compiled_comms, links, step_time
from tweetjax.perf.workload import Layout, ModelShape, Program, work

MAX_SLICE_DEVICES = 512


def model_shape(config: ml_collections.ConfigDict) -> ModelShape:
  return ModelShape.from_model_config(ModelConfig.from_config(config.model))


def parse_program_overrides(spec: str) -> dict[str, Any]:
  """'grad_reduce=per_step,tp_overlap=0.5' -> typed Program fields, naming the item that does not parse."""
  fields = {f.name: f for f in dataclasses.fields(Program)}
  out: dict[str, Any] = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    key, sep, value = (x.strip() for x in item.partition("="))
    if not sep or key not in fields or key.endswith("_axes"):
      known = sorted(k for k in fields if not k.endswith("_axes"))
      raise ValueError(f"--program_overrides item {item!r}: expected field=value with field one of {known}")
    default = getattr(Program(), key)
    try:
      if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        out[key] = value.lower() in ("true", "1")
      else:
        out[key] = type(default)(value)
    except ValueError:
      raise ValueError(f"--program_overrides item {item!r}: {value!r} is not a {type(default).__name__}") from None
  return out


# config.model.attention_impl -> how the GPU runs it: 'xla' and 'reference' materialise the L x L scores (XLA fuses
# the softmax but not the two matmuls); cuDNN's is a fused flash kernel. Other (blocked) kernels count as fused.
MATERIALIZED_ATTENTION = ("xla", "reference")


def program_for(config: ml_collections.ConfigDict, overrides: str = "") -> Program:
  """tweetjax's program for this config: the rules table's axes, the compute dtype's bytes, its attention kernel."""
  dtype_bytes = float(np.dtype(config.model.dtype).itemsize)
  attention = "materialized" if config.model.get("attention_impl", "xla") in MATERIALIZED_ATTENTION else "flash"
  values = {"gather_bytes": dtype_bytes, "grad_bytes": dtype_bytes, "activation_bytes": dtype_bytes,
            "attention": attention}
  values.update(parse_program_overrides(overrides))
  return Program.from_rules(rules_from_config(config), **values)


def layout_for(config: ml_collections.ConfigDict, mesh: dict[str, int], virtual_stages: int = 1) -> Layout:
  return Layout(mesh, int(config.data.global_batch_size), int(config.data.seq_len),
                microbatches=int(config.train.microbatches), remat=config.model.remat_policy,
                virtual_stages=virtual_stages)


@dataclasses.dataclass(frozen=True)
class SlicePlan:
  mesh: dict[str, int]  # the full mesh
  slice_mesh: dict[str, int] | None  # what is compiled (None: analytic only)
  reason: str

  @property
  def devices(self) -> int:
    return math.prod(self.slice_mesh.values()) if self.slice_mesh else 0

  @property
  def is_slice(self) -> bool:
    return self.slice_mesh is not None and self.slice_mesh != self.mesh


def plan_slice(mesh: dict[str, int], max_devices: int = MAX_SLICE_DEVICES,
               supported_axes: Sequence[str] = mesh_lib.MESH_AXES) -> SlicePlan:
  full = links.full_mesh(mesh)
  missing = [a for a, n in full.items() if n > 1 and a not in supported_axes]
  if missing:
    return SlicePlan(full, None, f"tweetjax's mesh has no {missing} axis yet (axes: {list(supported_axes)}): "
                                 f"predicted analytically")
  total = math.prod(full.values())
  if total <= max_devices:
    return SlicePlan(full, full, f"compiled on all {total} fake CPU devices")
  others = total // full["data"]
  if others > max_devices:
    return SlicePlan(full, None, f"the mesh without `data` still has {others} devices (> --slice_devices="
                                 f"{max_devices}): no slice with the same per-device shapes; predicted analytically")
  data = max(d for d in range(1, full["data"] + 1) if full["data"] % d == 0 and d * others <= max_devices)
  sliced = dict(full, data=data)
  return SlicePlan(full, sliced, f"compiled slice {links.mesh_str(sliced)} ({data * others} fake CPU devices; same "
                                 f"per-device shapes, data={full['data']} shrunk to {data})")


def slice_config(config: ml_collections.ConfigDict, plan: SlicePlan) -> ml_collections.ConfigDict:
  """The config with the slice's mesh and the global batch its data axis keeps; a GPU-only attention kernel is
  compiled as XLA's (the analytic model re-counts attention for the GPU kernel either way)."""
  sliced = ml_collections.ConfigDict(config.to_dict())
  if sliced.model.get("attention_impl") == "cudnn":
    sliced.model.attention_impl = "xla"
  sliced.mesh.update({a: n for a, n in plan.slice_mesh.items() if a in sliced.mesh})
  sliced.data.global_batch_size = int(config.data.global_batch_size) * plan.slice_mesh["data"] // plan.mesh["data"]
  return sliced


def compiled_prediction(config: ml_collections.ConfigDict, run, plan: SlicePlan, hw, program: Program,
                        virtual_stages: int = 1) -> tuple[step_time.Prediction, str, list]:
  """Prediction for the full mesh from a dry-run of `plan.slice_mesh`: the HLO's matmul FLOPs and collective bytes
  (GPU-converted), the analytic model's attention, memory-bound ops and overlap.

  Returns (prediction, report, per-group compiled-vs-analytic checks)."""
  shape, layout = model_shape(config), layout_for(config, plan.mesh, virtual_stages)
  gpu = work(shape, layout, program)
  cpu = work(shape, layout, dataclasses.replace(program, attention="materialized"))  # XLA:CPU: dense scores
  m = layout.microbatches
  analytic_cpu = m * sum(cpu.matmul[ph] + cpu.attention[ph] for ph in ("fwd", "bwd"))
  lines = []
  ratio = run.hlo_dot_flops / analytic_cpu if analytic_cpu else 0.0
  if 0.5 < ratio < 2.0:
    gpu.matmul = {ph: (run.hlo_dot_flops - m * sum(cpu.attention.values())) / m * gpu.matmul[ph]
                  / sum(gpu.matmul.values()) for ph in gpu.matmul}
    lines.append(f"matmul FLOPs from the HLO: {run.hlo_dot_flops:.4g} per device per step = {ratio:.3f} x the "
                 f"analytic count of the same CPU program (dense attention); attention re-counted for a fused "
                 f"causal kernel")
  else:
    lines.append(f"HLO matmul FLOPs {run.hlo_dot_flops:.4g} are {ratio:.2f} x the analytic count: kept analytic")
  mesh_shape = {a: int(n) for a, n in run.mesh.items()}
  found = compiled_comms.compiled_comms(run.module, mesh_shape, program, int(program.activation_bytes))
  calibrated, checks = compiled_comms.calibrate(gpu, found, m, {a: mesh_shape.get(a, 1) for a in plan.mesh},
                                                plan.mesh)
  lines += ["collective bytes per step, analytic vs compiled (GPU dtype; XLA:CPU's all-reduce + slice of "
            "gradients counted as the reduce-scatter a GPU forms):", compiled_comms.format_checks(checks)]
  pred = step_time.predict(shape, layout, program, hw, work=calibrated, source=plan.reason)
  return pred, "\n".join(lines), checks


def analytic_prediction(config: ml_collections.ConfigDict, mesh: dict[str, int], hw, program: Program,
                        virtual_stages: int = 1, reason: str = "analytic") -> step_time.Prediction:
  return step_time.predict(model_shape(config), layout_for(config, mesh, virtual_stages), program, hw,
                           source=reason)


def confirm_by_compile(base_argv: Sequence[str], layouts: Sequence[Layout], hardware: str, *, device_memory_gib: float,
                       slice_devices: int, workdir: str, log=print) -> list[dict[str, Any]]:
  """Compiles each layout's slice in a subprocess (tools/dryrun.py --predict): XLA:CPU's peak and the prediction
  from the compiled program. `base_argv`: the --config flags of this run."""
  tool = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                      "dryrun.py")
  results = []
  for i, lay in enumerate(layouts):
    plan = plan_slice(dict(lay.mesh), slice_devices)
    if plan.slice_mesh is None:
      log(f"  #{i + 1}: not compiled: {plan.reason}")
      results.append({"compiled": False, "reason": plan.reason})
      continue
    out = os.path.join(workdir, f"confirm_{i}.json")
    cmd = [sys.executable, tool, *base_argv, f"--mesh={links.mesh_str(lay.mesh)}", f"--global_batch={lay.global_batch}",
           f"--microbatches={lay.microbatches}", f"--remat={lay.remat}", f"--predict={hardware}",
           f"--slice_devices={slice_devices}", f"--device_memory_gib={device_memory_gib}", f"--json_out={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PJRT_NPROC")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
      errors = [line for line in proc.stderr.splitlines() if "Error" in line] or proc.stderr.splitlines() or ["?"]
      log(f"  #{i + 1}: compile failed: {errors[-1].strip()}")
      results.append({"compiled": False, "reason": proc.stderr[-2000:]})
      continue
    with open(out) as f:
      result = json.load(f)
    pred = result["prediction"]
    log(f"  #{i + 1}: {plan.reason}: XLA:CPU peak {result['peak_bytes'] / 2**30:.1f} GiB "
        f"({'fits' if result['fits'] else 'does NOT fit'}; analytic with flash attention "
        f"{result['analytic']['total_flash_attention'] / 2**30:.1f} GiB), predicted from the compiled program "
        f"{pred['step_s']:.3f} s/step, MFU {100 * pred['mfu']:.1f}% (compile {result['compile_s']:.0f} s)")
    results.append({"compiled": True, **result})
  return results
