"""Device mesh from `config.mesh`, laid out over the nodes of a cluster.

The mesh always has the six named axes in MESH_AXES (size 1 when unused), so logical axis rules can name any of
them whatever the experiment. `-1` on one axis means "all remaining devices".

Node awareness: devices are ordered node by node (then by process and local id), and the mesh is that order
reshaped with MESH_AXES outermost first. The innermost axes (tensor, then context, expert, fsdp) therefore change
fastest and stay inside a node (NVLink) as long as their product fits in one; the outer ones (stage, data) span
nodes. A node is one process's devices (one process per node) or `devices_per_node` consecutive devices in
process order (one process per GPU); `node_report` says which axes cross nodes and `check_node_locality` refuses
(or warns about) a layout that puts a bandwidth-bound axis (tensor, context) across nodes, before anything
compiles.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh

# Outermost first: `tensor` changes fastest over the device order, so tensor-parallel peers are nearest neighbours.
MESH_AXES = ("data", "stage", "fsdp", "expert", "context", "tensor")
# Axes whose collectives sit on the critical path of every layer: across nodes they run at network bandwidth.
NODE_LOCAL_AXES = ("tensor", "context")


class MeshError(ValueError):
  """A mesh shape that does not fit the devices or the model."""


def resolve_mesh_shape(mesh_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills a single -1 entry and checks the product equals `num_devices`."""
  unknown = sorted(set(mesh_sizes) - set(MESH_AXES))
  if unknown:
    raise MeshError(f"config.mesh has unknown axes {unknown}; known axes are {list(MESH_AXES)}")
  sizes = {axis: int(mesh_sizes.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise MeshError(f"config.mesh: only one axis may be -1, got {fill}")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise MeshError(f"config.mesh.{axis}={size}: sizes must be positive or -1")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % known:
      raise MeshError(
          f"config.mesh: cannot fill axis '{fill[0]}': {num_devices} devices are not divisible by the product "
          f"{known} of the other axes {_describe(sizes)}")
    sizes[fill[0]] = num_devices // known
  total = math.prod(sizes.values())
  if total != num_devices:
    raise MeshError(
        f"config.mesh {_describe(sizes)} has {total} devices in all but {num_devices} devices are available; "
        "make the product of the axes equal the device count (or set one axis to -1)")
  return sizes


def node_of(devices: Sequence[jax.Device], devices_per_node: int = 0) -> dict[jax.Device, int]:
  """Node index of every device.

  devices_per_node=0: one node per process (one process per node, the JAX default on GPU hosts). Otherwise nodes
  are runs of `devices_per_node` devices in (process, local id) order, which is how a launcher numbers one
  process per GPU (SLURM's block distribution: consecutive ranks on one node).
  """
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  if devices_per_node <= 0:
    return {d: d.process_index for d in ordered}
  return {d: i // devices_per_node for i, d in enumerate(ordered)}


# Launcher variables giving the number of processes on this node (torchrun, SLURM, Open MPI).
_PROCESSES_PER_NODE_ENV = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE")


def default_devices_per_node() -> int:
  """This process's devices times the processes per node the launcher reports (1 when it reports none)."""
  processes = 1
  for name in _PROCESSES_PER_NODE_ENV:
    value = os.environ.get(name, "")
    digits = value.split("(")[0].split(",")[0]  # SLURM writes e.g. "4(x2)"
    if digits.isdigit():
      processes = int(digits)
      break
  return jax.local_device_count() * processes


def make_mesh(mesh_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              devices_per_node: int = 0) -> Mesh:
  """Builds the named mesh over `devices` (default: all devices of all processes), node-major."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_sizes, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices[0].platform == "tpu" and len(devices) == len(jax.devices()):
    # Lets jax pick a topology-aware device order (ICI neighbours on the inner axes).
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  nodes = node_of(devices, devices_per_node)
  ordered = sorted(devices, key=lambda d: (nodes[d], d.process_index, d.id))
  return Mesh(np.asarray(ordered).reshape(shape), MESH_AXES, axis_types=axis_types)


def axes_across_nodes(mesh: Mesh, devices_per_node: int = 0) -> dict[str, int]:
  """For every mesh axis of size > 1: the most nodes any one group of devices along it spans (1 = node-local)."""
  nodes = node_of(list(mesh.devices.flat), devices_per_node)
  node_ids = np.vectorize(lambda d: nodes[d], otypes=[np.int64])(mesh.devices)
  spans = {}
  for i, axis in enumerate(mesh.axis_names):
    if mesh.shape[axis] == 1:
      continue
    groups = np.moveaxis(node_ids, i, -1).reshape(-1, mesh.shape[axis])
    spans[axis] = max(len(set(row)) for row in groups)
  return spans


def node_report(mesh: Mesh, devices_per_node: int = 0) -> str:
  """One line per mesh axis: its size and whether its groups stay inside a node."""
  spans = axes_across_nodes(mesh, devices_per_node)
  nodes = len(set(node_of(list(mesh.devices.flat), devices_per_node).values()))
  lines = [f"mesh over {mesh.size} devices on {nodes} node(s), axes outermost first:"]
  for axis in mesh.axis_names:
    if mesh.shape[axis] > 1:
      where = "inside one node" if spans[axis] == 1 else f"across {spans[axis]} nodes"
      lines.append(f"  {axis:<8} {mesh.shape[axis]:>5}  {where}")
  return "\n".join(lines)


def check_node_locality(mesh: Mesh, devices_per_node: int = 0, on_violation: str = "error",
                        node_local_axes: Sequence[str] = NODE_LOCAL_AXES) -> list[str]:
  """Problems with axes in `node_local_axes` that span nodes; raises (on_violation='error') or logs a warning."""
  if on_violation not in ("error", "warn"):
    raise MeshError(f"topology.cross_node={on_violation!r}: expected 'error' or 'warn'")
  spans = axes_across_nodes(mesh, devices_per_node)
  per_node = mesh.size // max(len(set(node_of(list(mesh.devices.flat), devices_per_node).values())), 1)
  problems = []
  for axis in node_local_axes:
    if spans.get(axis, 1) > 1:
      inner = [a for a in mesh.axis_names[mesh.axis_names.index(axis):] if mesh.shape[a] > 1]
      problems.append(
          f"mesh axis '{axis}' (config.mesh.{axis}={mesh.shape[axis]}) spans {spans[axis]} nodes: its collectives "
          f"would run over the network; the axes from '{axis}' inward ({', '.join(inner)}) hold "
          f"{math.prod(mesh.shape[a] for a in inner)} devices but a node has {per_node}; shrink them or move "
          "devices to the outer axes (data, stage, fsdp)")
  if problems and on_violation == "error":
    raise MeshError("; ".join(problems) + " (set config.topology.cross_node='warn' to run anyway)")
  for problem in problems:
    logging.warning("%s", problem)
  return problems


def _describe(sizes: Mapping[str, int]) -> str:
  return "(" + ", ".join(f"{axis}={size}" for axis, size in sizes.items()) + ")"
