"""Predicted step time of a layout on a GPU cluster, with the breakdown a researcher needs to choose between layouts.

  step = microbatches x (compute + exposed communication per microbatch) + pipeline bubble + optimizer update
         + exposed once-per-step communication

compute (per device, per microbatch, forward and backward phases; the remat recompute is in the backward):
  matmul FLOPs / (peak x matmul_efficiency) + fused-attention FLOPs / (bf16 peak x attention_efficiency)
  + memory-bound bytes / (HBM x hbm_efficiency)      (a materialised attention's score matmuls count as matmuls)
communication: every collective of tweetjax/perf/workload.py over the link its axis crosses (tweetjax/perf/links.py),
  then what the schedule can hide:
  - FSDP all-gathers (the next layer's weights, prefetched) and gradient reduce-scatters / all-reduces (issued as
    each layer's backward finishes) run on their link while the phase computes. Per phase and link class, with
    C their total time and n the layers per stage: one layer's share C / n has nothing to hide behind (the first
    gather of a pass, the last reduction), the rest hides behind the phase's compute:
    exposed = C / n + max(0, (1 - 1/n) C - OVERLAP_EFFICIENCY x compute);
  - context-parallel K/V passes hide behind that phase's attention compute in the same way;
  - tensor-parallel all-reduces, expert all-to-alls and pipeline sends sit on the critical path (the next op needs
    their result): fully exposed (Program.tp_overlap hides a fraction of the tensor-parallel ones);
  - once-per-step gradient reductions overlap with the last microbatch's backward, once-per-step gathers with the
    first microbatch's forward.
pipeline bubble: (stages - 1) / virtual_stages microbatch-times (1F1B / interleaved 1F1B); the slowest stage (the
  last: it also runs the LM head and loss) sets the microbatch time.

OVERLAP_EFFICIENCY = 0.85: NCCL kernels take SMs and HBM bandwidth from the compute they overlap (~10-15% slowdown
of overlapped GEMMs is commonly measured), and the scheduler prefetches only one layer ahead.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

from tweetjax.parallel.pipeline import bubble_fraction  # one formula for the pipeline and its model
from tweetjax.perf import hardware as hardware_lib
from tweetjax.perf import links
from tweetjax.perf import workload as workload_lib

OVERLAP_EFFICIENCY = 0.85
HIDDEN_CLASSES = ("fsdp", "grad")


@dataclasses.dataclass
class CommTime:
  comm: workload_lib.Comm
  placement: links.Placement
  seconds: float  # per step (count and microbatches applied)
  exposed: float = 0.0  # per step


@dataclasses.dataclass
class Prediction:
  hardware: hardware_lib.Hardware
  layout: workload_lib.Layout
  program: workload_lib.Program
  source: str  # "analytic" or a description of the compiled slice the collectives came from
  step_s: float
  components: dict[str, float]  # seconds per step: compute parts, exposed comm by axis, bubble
  comms: list[CommTime]
  model_flops_per_token: float
  executed_flops_per_step: float  # per device
  notes: list[str]

  @property
  def tokens_per_step(self) -> int:
    return self.layout.global_batch * self.layout.seq_len

  @property
  def tokens_per_s(self) -> float:
    return self.tokens_per_step / self.step_s

  @property
  def model_flops_per_gpu(self) -> float:
    return self.model_flops_per_token * self.tokens_per_s / self.layout.devices

  @property
  def mfu(self) -> float:
    return self.model_flops_per_gpu / self.hardware.bf16_flops

  def budget(self, tokens: float) -> dict[str, float]:
    seconds = tokens / self.tokens_per_s
    return {"tokens": tokens, "wall_s": seconds, "days": seconds / 86400,
            "gpu_hours": seconds / 3600 * self.layout.devices, "days_per_trillion_tokens": 1e12 / self.tokens_per_s
            / 86400}

  def summary(self) -> dict[str, Any]:
    return {"hardware": self.hardware.name, "source": self.source, "mesh": dict(self.layout.mesh),
            "devices": self.layout.devices, "global_batch": self.layout.global_batch,
            "seq_len": self.layout.seq_len, "microbatches": self.layout.microbatches, "remat": self.layout.remat,
            "virtual_stages": self.layout.virtual_stages, "step_s": self.step_s,
            "tokens_per_s": self.tokens_per_s, "model_tflops_per_gpu": self.model_flops_per_gpu / 1e12,
            "mfu": self.mfu, "components_s": self.components, "notes": self.notes,
            "comms": [{"name": c.comm.name, "kind": c.comm.kind, "axes": list(c.placement.axes),
                       "link": c.placement.link, "group": c.placement.size, "per_node": c.placement.local,
                       "bytes": c.comm.nbytes, "count": c.comm.count, "phase": c.comm.phase,
                       "seconds_per_step": c.seconds, "exposed_per_step": c.exposed} for c in self.comms]}


def _axes_label(p: links.Placement) -> str:
  return f"{','.join(p.axes)} ({p.link})"


def predict(shape: workload_lib.ModelShape, layout: workload_lib.Layout, program: workload_lib.Program,
            hw: hardware_lib.Hardware, *, work: workload_lib.Work | None = None, source: str = "analytic",
            overlap_efficiency: float = OVERLAP_EFFICIENCY) -> Prediction:
  w = work or workload_lib.work(shape, layout, program)
  m, p, v = layout.microbatches, layout.mesh["stage"], layout.virtual_stages
  mm_rate = hw.peak_flops(program.fp8) * hw.matmul_efficiency
  # A fused kernel runs at the attention efficiency; materialised scores are batched matmuls (bf16).
  attn_rate = hw.bf16_flops * (hw.attention_efficiency if program.attention == "flash" else hw.matmul_efficiency)
  hbm = hw.hbm_bytes_per_s * hw.hbm_efficiency
  phases = ("fwd", "bwd")
  mm_s = {ph: w.matmul[ph] / mm_rate for ph in phases}
  attn_s = {ph: w.attention[ph] / attn_rate for ph in phases}
  mem_s = {ph: w.memory[ph] / hbm for ph in phases}
  compute = {ph: mm_s[ph] + attn_s[ph] + mem_s[ph] for ph in phases}

  times: list[CommTime] = []
  for comm in w.comms:
    place = links.placement(layout.mesh, comm.axes, hw.gpus_per_node)
    per_step = comm.count * (m if comm.phase in phases else 1)
    times.append(CommTime(comm, place, links.collective_seconds(comm.kind, comm.nbytes, place, hw) * per_step))

  def hide(items: list[CommTime], window: float, fill: float = 0.0) -> None:
    """Items share their links (per link class) with `window` seconds of compute; the rest is exposed."""
    by_link = collections.defaultdict(list)
    for item in items:
      by_link[item.placement.link].append(item)
    for group in by_link.values():
      total = sum(i.seconds for i in group)
      exposed = fill * total + max(0.0, (1 - fill) * total - overlap_efficiency * window)
      for i in group:
        i.exposed = exposed * i.seconds / total if total else 0.0

  nl = max(w.layers_per_stage, 1)
  for ph in phases:
    hide([t for t in times if t.comm.phase == ph and t.comm.cls in HIDDEN_CLASSES], compute[ph] * m,
         fill=1.0 / nl)
    hide([t for t in times if t.comm.phase == ph and t.comm.cls == "cp"], attn_s[ph] * m)
  step_items = [t for t in times if t.comm.phase == "step"]
  hide([t for t in step_items if t.comm.cls == "grad"], compute["bwd"])
  hide([t for t in step_items if t.comm.cls in ("fsdp", "cp")], compute["fwd"])
  for t in times:
    if t.comm.cls == "tp":
      t.exposed = t.seconds * (1 - program.tp_overlap)
    elif t.comm.cls not in HIDDEN_CLASSES + ("cp",):
      t.exposed = t.seconds  # expert all-to-alls, pipeline sends, anything unclassified

  per_mb_exposed = sum(t.exposed for t in times if t.comm.phase in phases) / m
  microbatch_s = compute["fwd"] + compute["bwd"] + per_mb_exposed
  bubble_s = (p - 1) / v * microbatch_s
  optimizer_s = w.step_memory / hbm
  step_exposed = sum(t.exposed for t in step_items)
  step_s = m * microbatch_s + bubble_s + optimizer_s + step_exposed

  components = {
      f"matmuls ({hw.matmul_efficiency:.2f} x {hw.peak_flops(program.fp8) / 1e12:.0f} TFLOP/s)":
          m * (mm_s["fwd"] + mm_s["bwd"]),
      f"attention ({'fused' if program.attention == 'flash' else 'materialised scores'})":
          m * (attn_s["fwd"] + attn_s["bwd"]),
      f"memory-bound ops ({hw.hbm_efficiency:.1f} x {hw.hbm_bytes_per_s / 1e12:.2f} TB/s)":
          m * (mem_s["fwd"] + mem_s["bwd"]),
      "optimizer update": optimizer_s,
  }
  exposed_by_axes: dict[str, float] = collections.defaultdict(float)
  for t in times:
    exposed_by_axes[_axes_label(t.placement)] += t.exposed
  for label, seconds in sorted(exposed_by_axes.items(), key=lambda kv: -kv[1]):
    components[f"exposed comm: {label}"] = seconds
  components["pipeline bubble"] = bubble_s  # (stages - 1) / virtual_stages idle microbatch-times
  executed = m * sum(w.matmul[ph] + w.attention[ph] for ph in phases)
  notes = _notes(layout, program, w)
  return Prediction(hardware=hw, layout=layout, program=program, source=source, step_s=step_s,
                    components=components, comms=times, model_flops_per_token=shape.train_flops_per_token(
                        layout.seq_len), executed_flops_per_step=executed, notes=notes)


def _notes(layout: workload_lib.Layout, program: workload_lib.Program, w: workload_lib.Work) -> list[str]:
  notes = []
  if layout.mesh["stage"] > 1:
    p, m, v = layout.mesh["stage"], layout.microbatches, layout.virtual_stages
    notes.append(f"pipeline: {p} stages x {v} chunk(s), {m} microbatches: bubble fraction "
                 f"{bubble_fraction(p, m, v):.1%}; the last stage (LM head + loss) sets the pace")
  if program.grad_reduce == "per_microbatch" and layout.microbatches > 1 and layout.mesh["data"] > 1:
    notes.append("gradients are all-reduced over `data` once per microbatch (inside the accumulation loop), as "
                 "the compiled program does; one reduction per step would move 1/microbatches of those bytes")
  return notes


def format_prediction(pred: Prediction, tokens: float = 0.0) -> str:
  lay, hw = pred.layout, pred.hardware
  mesh = links.mesh_str(lay.mesh)
  lines = [f"predicted step on {lay.devices} x {hw.name} ({pred.source})",
           f"  {hardware_lib.describe(hw)}",
           f"  mesh {mesh}; global batch {lay.global_batch} x {lay.seq_len} tokens, {lay.microbatches} microbatch(es)"
           f", remat={lay.remat}" + (f", {lay.virtual_stages} virtual stages" if lay.virtual_stages > 1 else ""),
           "",
           f"  {'component':<58} {'s/step':>9} {'share':>7}"]
  for name, seconds in pred.components.items():
    if seconds > 0 or not name.startswith("exposed"):
      lines.append(f"  {name:<58} {seconds:9.4f} {seconds / pred.step_s:7.1%}")
  lines.append(f"  {'step':<58} {pred.step_s:9.4f}")
  lines += ["", f"  {'communication per step':<52} {'link':>8} {'group':>6} {'/node':>5} {'GiB/step':>9} "
                f"{'time s':>8} {'exposed':>8}"]
  for t in sorted(pred.comms, key=lambda t: -t.seconds):
    per_step = t.comm.count * (lay.microbatches if t.comm.phase != "step" else 1)
    lines.append(f"  {t.comm.name[:52]:<52} {t.placement.link:>8} {t.placement.size:>6} {t.placement.local:>5} "
                 f"{t.comm.nbytes * per_step / 2**30:9.2f} {t.seconds:8.4f} {t.exposed:8.4f}")
  for note in pred.notes:
    lines.append(f"  note: {note}")
  if tokens:
    b = pred.budget(tokens)
    lines.append(f"  {tokens:.3g} tokens: {b['days']:.1f} days wall, {b['gpu_hours']:.3g} GPU-hours "
                 f"({b['days_per_trillion_tokens']:.2f} days per trillion tokens)")
  lines.append(predicted_line(pred))
  return "\n".join(lines)


def predicted_line(pred: Prediction) -> str:
  """The one line scripts read."""
  return (f"predicted: {pred.tokens_per_s:.4g} tokens/s, {pred.model_flops_per_gpu / 1e12:.1f} TFLOP/s per GPU, "
          f"MFU {100 * pred.mfu:.1f}%")


def is_finite(pred: Prediction) -> bool:
  return math.isfinite(pred.step_s) and pred.step_s > 0
