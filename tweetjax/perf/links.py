"""Which link a mesh axis's collectives cross, and what a ring/tree collective costs over it.

Devices are numbered with the mesh axes outermost first, DEVICE_ORDER = (data, stage, fsdp, expert, context, tensor),
so the innermost axes change fastest and consecutive devices share a node (gpus_per_node of them per NVLink domain).
A group of `g` devices (the devices that differ only along the collective's axes) then has `g_local` members in each
node it touches:

  g_local == g        the group is inside one node: NVLink, bus bandwidth B = nvlink x nvlink_efficiency
  1 < g_local < g     it spans nodes with g_local members each: NCCL runs g_local rings that cross between nodes on
                      g_local different NICs, so B = min(NVLink, g_local x NIC) (x efficiencies)
  g_local == 1        every member on its own node: each GPU's own NIC, B = NIC

The other groups of the same axis run at the same time on the node's other GPUs and NICs, so nothing is shared
between them (a rail-optimised fabric without oversubscription is assumed). Costs per device, S = bytes of the full
array (all-gather: its output; reduce-scatter: its input; all-reduce: the array), alpha = per-hop latency:

  all-gather, reduce-scatter   (g-1)/g S / B + (g-1) alpha
  all-reduce                   2 (g-1)/g S / B + 2 min(g-1, log2 g) alpha    (ring bandwidth; tree latency)
  all-to-all                   max(local share / NVLink, remote share / NIC) + (g-1) alpha   (no NIC aggregation:
                               every byte for another node leaves through the sender's own NIC)
  point-to-point               S / B_link + alpha
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from tweetjax.parallel.mesh import MESH_AXES
from tweetjax.perf.hardware import Hardware

DEVICE_ORDER = MESH_AXES  # how tweetjax/parallel/mesh.py lays the mesh over the devices
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "point-to-point")


@dataclasses.dataclass(frozen=True)
class Placement:
  axes: tuple[str, ...]
  size: int  # g: devices per group
  local: int  # g_local: members per node
  nodes: int  # nodes one group spans

  @property
  def link(self) -> str:
    return "nvlink" if self.nodes == 1 else "network"


def full_mesh(mesh: Mapping[str, int]) -> dict[str, int]:
  unknown = sorted(set(mesh) - set(DEVICE_ORDER))
  if unknown:
    raise ValueError(f"mesh axes {unknown} are not known to the step-time model (axes: {list(DEVICE_ORDER)})")
  return {axis: int(mesh.get(axis, 1)) for axis in DEVICE_ORDER}


def mesh_str(mesh: Mapping[str, int]) -> str:
  """'data=20,fsdp=64,tensor=8': the axes larger than 1, as --mesh takes them."""
  return ",".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 device"


def placement(mesh: Mapping[str, int], axes: Sequence[str], gpus_per_node: int) -> Placement:
  """Where one group of a collective over `axes` sits, given the node size and DEVICE_ORDER."""
  sizes = full_mesh(mesh)
  axes = tuple(a for a in DEVICE_ORDER if a in axes and sizes[a] > 1)
  g = math.prod(sizes[a] for a in axes)
  if g == 1:
    return Placement(axes, 1, 1, 1)
  strides, stride = {}, 1
  for axis in reversed(DEVICE_ORDER):
    strides[axis] = stride
    stride *= sizes[axis]
  # Device ids of the group through device 0; members per node from their node numbers (exact for any sizes).
  ids = np.zeros(1, dtype=np.int64)
  for axis in axes:
    ids = (ids[:, None] + strides[axis] * np.arange(sizes[axis])[None, :]).reshape(-1)
  per_node = np.bincount(ids // gpus_per_node)
  per_node = per_node[per_node > 0]
  return Placement(axes, g, int(per_node.min()), int(per_node.size))


def bus_bandwidth(p: Placement, hw: Hardware) -> float:
  nvlink = hw.nvlink_bytes_per_s * hw.nvlink_efficiency
  if p.nodes == 1:
    return nvlink
  return min(nvlink, p.local * hw.nic_bytes_per_s * hw.nic_efficiency)


def latency(p: Placement, hw: Hardware) -> float:
  return hw.nvlink_latency_s if p.nodes == 1 else hw.nic_latency_s


def collective_seconds(kind: str, nbytes: float, p: Placement, hw: Hardware) -> float:
  """Time of one collective of `kind` over the group `p` moving an array of `nbytes` (see the module docstring)."""
  g = p.size
  if g <= 1 or nbytes <= 0:
    return 0.0
  alpha = latency(p, hw)
  if kind in ("all-gather", "reduce-scatter"):
    return (g - 1) / g * nbytes / bus_bandwidth(p, hw) + (g - 1) * alpha
  if kind == "all-reduce":
    return 2 * (g - 1) / g * nbytes / bus_bandwidth(p, hw) + 2 * min(g - 1, math.ceil(math.log2(g))) * alpha
  if kind == "all-to-all":
    nvlink = hw.nvlink_bytes_per_s * hw.nvlink_efficiency
    nic = hw.nic_bytes_per_s * hw.nic_efficiency
    local_share = (p.local - 1) / g * nbytes
    remote_share = (g - p.local) / g * nbytes
    return max(local_share / nvlink, remote_share / nic) + (g - 1) * alpha
  if kind == "point-to-point":
    bandwidth = bus_bandwidth(dataclasses.replace(p, local=1), hw)
    return nbytes / bandwidth + alpha
  raise ValueError(f"unknown collective kind {kind!r}; expected one of {KINDS}")
