"""The collectives of a compiled train step, per mesh axis, as a GPU compile would run them; and the analytic
inventory (tweetjax/perf/workload.py) rescaled to them.

A dry-run compiles for fake CPU devices, and XLA:CPU's program differs from a GPU compile in two ways that move
bytes, both corrected here (and listed in the report):
  - dtype: XLA:CPU upcasts bf16 matmuls to fp32, so the weights it gathers and the gradients and activations it
    reduces are fp32; a GPU keeps them in the compute dtype. With a 2-byte compute dtype, fp32 collectives are
    counted at Program.gather_bytes / grad_bytes / activation_bytes per element.
  - gradient reductions: XLA:CPU all-reduces a weight's gradient over the axes that shard the weight and then slices
    its shard; a GPU compile forms a reduce-scatter there (ReduceScatterCreator; half the wire bytes). All-reduces
    over token axes that shard the weight are counted as reduce-scatters of the same array.
  - partial sums: XLA:CPU all-reduces the partial input gradients of q, k and v (and of gate and up) separately, 8
    tensor-parallel all-reduces per layer with full remat; a GPU compile's AllReduceReassociate pass adds them
    first (5). Tensor-parallel groups never count more than the analytic (reassociated) number.
Each collective's axes come from its replica group (tweetjax/perf/hlo.py first_replica_group), its class from the
axes and kind (FSDP gathers, gradient reductions, tensor-parallel reductions, expert all-to-alls, pipeline and
context passes). Per (class, axes, kind) the compiled bytes per step then rescale the analytic collectives of that
group; groups on axes that the slice shrank to size 1 stay analytic; compiled groups with no analytic counterpart
are added as exposed communication.
"""

from __future__ import annotations

import collections
import dataclasses

from tweetjax.perf import hlo
from tweetjax.perf.workload import Comm, Program, Work

_FP32 = 4


@dataclasses.dataclass
class CompiledComm:
  cls: str
  kind: str  # what a GPU compile runs
  axes: tuple[str, ...]
  bytes_per_step: float  # at the GPU's dtype
  compiled_kind: str
  compiled_bytes_per_step: float  # as XLA:CPU compiled it
  executions: float


def classify(kind: str, axes: tuple[str, ...], program: Program) -> tuple[str, str]:
  """(class, GPU kind) of a compiled collective over `axes`."""
  weight_axes = set(program.embed_axes) | set(program.expert_embed_axes)
  token_axes = set(program.token_axes)
  if kind == "all-to-all":
    return "a2a", kind
  if kind == "collective-permute":
    return ("pp" if axes == ("stage",) else "cp" if axes == ("context",) else "other"), "point-to-point"
  if kind == "all-gather":
    if axes and set(axes) <= weight_axes:
      return "fsdp", kind
    return ("cp" if axes == ("context",) else "other"), kind
  if kind == "reduce-scatter":
    return ("grad" if axes and set(axes) <= token_axes else "other"), kind
  if kind == "all-reduce":
    if axes and set(axes) <= set(program.tensor_axes):
      return "tp", kind
    if axes and set(axes) <= token_axes:
      return "grad", ("reduce-scatter" if set(axes) <= weight_axes else kind)
  return "other", kind


def compiled_comms(module: hlo.Module, mesh_shape: dict[str, int], program: Program,
                   compute_bytes: int) -> list[CompiledComm]:
  """Every collective of the (per-device) program, attributed to mesh axes, with bytes per step."""
  num_devices = 1
  for size in mesh_shape.values():
    num_devices *= size
  out = []
  for instr, times in module.instructions():
    op = instr.opcode.removesuffix("-start")
    if op == "ragged-all-to-all":
      op = "all-to-all"
    if op not in hlo.COLLECTIVES or instr.opcode.endswith("-done") or not times:
      continue
    shapes = instr.shapes
    if instr.opcode.endswith("-start") and len(shapes) >= 2:
      shapes = shapes[len(shapes) // 2:]
    axes = hlo.group_axes(hlo.first_replica_group(instr.attrs, num_devices), mesh_shape)
    g = 1
    for a in axes:
      g *= mesh_shape[a]
    size = sum(s.bytes for s in shapes) * (g if op == "reduce-scatter" else 1)
    cls, kind = classify(op, axes, program)
    gpu = size
    if compute_bytes < _FP32 and shapes and all(s.dtype == "f32" for s in shapes):
      per_element = {"fsdp": program.gather_bytes, "grad": program.grad_bytes}.get(cls, program.activation_bytes)
      gpu = size * per_element / _FP32
    out.append(CompiledComm(cls, kind, axes, gpu * times, op, size * times, times))
  return out


def _analytic_bytes(c: Comm, microbatches: int) -> float:
  return c.nbytes * c.count * (microbatches if c.phase in ("fwd", "bwd") else 1)


@dataclasses.dataclass
class GroupCheck:
  cls: str
  kind: str
  axes: tuple[str, ...]
  analytic_bytes: float  # per step
  compiled_bytes: float  # per step, GPU dtype (0: not in the compiled program / not comparable)
  used: str  # compiled | analytic (axis shrunk in the slice) | compiled only


def calibrate(work: Work, compiled: list[CompiledComm], microbatches: int, slice_mesh: dict[str, int],
              full_mesh: dict[str, int]) -> tuple[Work, list[GroupCheck]]:
  """`work` with its collectives rescaled to the compiled program's bytes per (class, axes, kind)."""
  shrunk = {a for a, n in full_mesh.items() if n > 1 and slice_mesh.get(a, 1) == 1}
  analytic = collections.defaultdict(list)
  for c in work.comms:
    analytic[(c.cls, c.kind, c.axes)].append(c)
  found = collections.defaultdict(float)
  for c in compiled:
    if c.axes:
      found[(c.cls, c.kind, c.axes)] += c.bytes_per_step
  comms, checks = [], []
  for key, items in analytic.items():
    total = sum(_analytic_bytes(c, microbatches) for c in items)
    if set(key[2]) & shrunk:
      comms += items
      checks.append(GroupCheck(*key, total, 0.0, "analytic (axis shrunk in the slice)"))
      continue
    scale = found.get(key, 0.0) / total if total else 0.0
    used = "compiled"
    if key[0] == "tp" and scale > 1:
      # XLA:CPU all-reduces the partial input gradients of q, k, v (and gate, up) one by one; a GPU compile's
      # AllReduceReassociate pass adds them first and reduces once: the analytic count.
      scale, used = 1.0, "analytic (XLA:GPU reassociates partial-sum all-reduces; XLA:CPU does not)"
    comms += [dataclasses.replace(c, count=c.count * scale) for c in items]
    checks.append(GroupCheck(*key, total, found.get(key, 0.0), used))
  for key, nbytes in found.items():
    if key not in analytic:
      cls = key[0] if key[0] in ("fsdp", "grad", "cp") else "other"
      comms.append(Comm(f"{key[1]} over {','.join(key[2])} (compiled only)", cls, key[1], key[2], nbytes, 1, "step"))
      checks.append(GroupCheck(*key, 0.0, nbytes, "compiled only"))
  return dataclasses.replace(work, comms=comms), checks


def format_checks(checks: list[GroupCheck]) -> str:
  lines = [f"  {'class':<6} {'kind':<15} {'axes':<22} {'analytic GiB':>13} {'compiled GiB':>13} {'ratio':>6}  used"]
  for c in sorted(checks, key=lambda c: -(c.compiled_bytes or c.analytic_bytes)):
    ratio = f"{c.compiled_bytes / c.analytic_bytes:6.2f}" if c.analytic_bytes and c.compiled_bytes else "     -"
    lines.append(f"  {c.cls:<6} {c.kind:<15} {','.join(c.axes):<22} {c.analytic_bytes / 2**30:13.3f} "
                 f"{c.compiled_bytes / 2**30:13.3f} {ratio}  {c.used}")
  return "\n".join(lines)
