"""AOT dry-run of a train step on a mesh faked with CPU devices: memory per device, FLOPs, collectives, compile time.

  python tools/dryrun.py --config=experiments/llama_70b.py --mesh=data=8,fsdp=64,tensor=8 --device_memory_gib=80
  python tools/dryrun.py --config=experiments/grok1_314b.py --mesh=fsdp=16,expert=8,tensor=4
  python tools/dryrun.py --config=experiments/llama_7b.py --mesh=fsdp=64 --search   # remat x microbatch search
  python tools/dryrun.py --config=experiments/llama_70b.py --mesh=fsdp=64,tensor=8 --remat=full --microbatches=4 \
      --global_batch=512 --json_out=/tmp/70b.json

Nothing is allocated: the real train step is lowered from ShapeDtypeStructs with shardings and compiled for
`prod(mesh)` fake CPU devices (the process sets --xla_force_host_platform_device_count before JAX starts). The
memory XLA:CPU assigns is an estimate for a GPU; the analytic column is printed next to it.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from tweetjax.perf import env

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=False)
_MESH = flags.DEFINE_string("mesh", "", "Mesh axis sizes, e.g. data=8,fsdp=64,tensor=8 (default: config.mesh, "
                            "with --devices filling a -1 axis). Unnamed axes are 1.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake device count when the mesh has a -1 axis.")
_REMAT = flags.DEFINE_enum("remat", None, ["none", "dots", "dots_no_batch", "full"], "Override model.remat_policy.")
_MICRO = flags.DEFINE_integer("microbatches", None, "Override train.microbatches.")
_BATCH = flags.DEFINE_integer("global_batch", None, "Override data.global_batch_size.")
_SEQ = flags.DEFINE_integer("seq_len", None, "Override data.seq_len.")
_MEMORY = flags.DEFINE_float("device_memory_gib", 80.0, "Memory of one accelerator (H100: 80).")
_USABLE = flags.DEFINE_float("usable_fraction", 0.9, "Fraction of it the step may use (XLA_PYTHON_CLIENT_MEM_FRACTION)")
_SEARCH = flags.DEFINE_bool("search", False, "Search remat policy x microbatch size for the largest batch that fits.")
_SEARCH_MICRO = flags.DEFINE_string("search_microbatches", "1,4", "Microbatch counts tried by --search.")
_SEARCH_REMAT = flags.DEFINE_string("search_remat", "none,dots_no_batch,full", "Remat policies tried by --search.")
_REPORT = flags.DEFINE_bool("sharding_report", False, "Also print the per-parameter sharding report.")
_JSON = flags.DEFINE_string("json_out", "", "Write the results as JSON here.")


def parse_mesh(spec: str) -> dict[str, int]:
  mesh = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, size = item.partition("=")
    if not sep:
      raise app.UsageError(f"--mesh item {item!r}: expected axis=size (axes: data, stage, fsdp, expert, context, tensor)")
    mesh[name.strip()] = int(size)
  return mesh


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _MESH.value:
    mesh = {axis: 1 for axis in config.mesh.keys()}
    mesh.update(parse_mesh(_MESH.value))
    config.mesh.update(mesh)
  sizes = [int(v) for v in config.mesh.values()]
  if -1 in sizes and not _DEVICES.value:
    raise app.UsageError(f"mesh {dict(config.mesh)} has a -1 axis: give every size in --mesh or pass --devices")
  devices = _DEVICES.value or math.prod(sizes)
  if _REMAT.value:
    config.model.remat_policy = _REMAT.value
  if _MICRO.value:
    config.train.microbatches = _MICRO.value
  if _BATCH.value:
    config.data.global_batch_size = _BATCH.value
  if _SEQ.value:
    config.data.seq_len = _SEQ.value

  # Before JAX starts: CPU only (a dry run of 512 devices on a GPU host must not touch the GPU), fake devices.
  os.environ["JAX_PLATFORMS"] = "cpu"
  env.setup_environment(config, fake_devices=devices, distributed=False)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  from tweetjax.perf import dryrun  # pylint: disable=g-import-not-at-top
  if jax.device_count() != devices:
    raise RuntimeError(f"wanted {devices} fake CPU devices, JAX has {jax.device_count()} (XLA_FLAGS="
                       f"{os.environ.get('XLA_FLAGS')!r} was set too late?)")

  memory = _MEMORY.value * dryrun.GIB
  if _SEARCH.value:
    print(f"search on mesh {dict(config.mesh)}, {_MEMORY.value:g} GiB x {_USABLE.value:g} usable per device:",
          flush=True)
    rows = dryrun.search(config, device_memory_bytes=memory, usable_fraction=_USABLE.value,
                         remat_policies=_SEARCH_REMAT.value.split(","),
                         microbatches=[int(k) for k in _SEARCH_MICRO.value.split(",")],
                         log=lambda line: print(line, flush=True))
    print(dryrun.format_search(rows))
    print(dryrun.CPU_ESTIMATE_NOTE)
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump({"search": rows}, f, indent=1)
    return

  result = dryrun.dry_run(config, device_memory_bytes=memory, usable_fraction=_USABLE.value)
  if _REPORT.value:
    from tweetjax.train.experiment import build_experiment  # pylint: disable=g-import-not-at-top
    print(build_experiment(config).sharding_report())
  print(dryrun.format_report(result), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result.summary(), f, indent=1)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  sys.setrecursionlimit(10_000)
  app.run(main)
