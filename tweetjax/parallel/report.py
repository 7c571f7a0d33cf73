"""The sharding report: where every parameter lives and what it costs per device."""

from __future__ import annotations

from typing import Any

import numpy as np

from tweetjax.parallel.validate import boxed_leaves


def sharding_report(abstract_boxed_params: Any, param_shardings: Any) -> str:
  """Table of param path, shape, logical axes, PartitionSpec and MiB per device, with totals."""
  flat_shardings = dict(boxed_leaves(param_shardings))
  rows = []
  total_params = 0
  total_bytes_per_device = 0
  for path, box in boxed_leaves(abstract_boxed_params):
    value = box.value
    sharding = flat_shardings[path]
    shard_shape = sharding.shard_shape(value.shape)
    per_device = int(np.prod(shard_shape)) * value.dtype.itemsize
    total_params += int(np.prod(value.shape))
    total_bytes_per_device += per_device
    rows.append((path, "x".join(map(str, value.shape)), ",".join(str(n) for n in box.names),
                 str(tuple(sharding.spec)), f"{per_device / 2**20:.3f}"))
  header = ("param", "shape", "logical axes", "mesh spec", "MiB/device")
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  fmt = "  ".join(f"{{:<{w}}}" for w in widths)
  lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
  lines += [fmt.format(*row) for row in rows]
  lines.append(f"total: {total_params:,} params, {total_bytes_per_device / 2**20:.2f} MiB of params per device")
  return "\n".join(lines)
