"""Device mesh from `config.mesh`.

The mesh always has the four named axes in MESH_AXES (size 1 when unused), so logical axis rules can name any of
them whatever the experiment. `-1` on one axis means "all remaining devices".
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Innermost last: `tensor` changes fastest over the device order, so tensor-parallel peers are nearest neighbours.
MESH_AXES = ("data", "fsdp", "expert", "tensor")


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


def make_mesh(mesh_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the named mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_sizes, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    # Lets jax pick a topology-aware device order (ICI/NVLink neighbours on the inner axes).
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _describe(sizes: Mapping[str, int]) -> str:
  return "(" + ", ".join(f"{axis}={size}" for axis, size in sizes.items()) + ")"
