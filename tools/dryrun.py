"""AOT dry-run of a train step on a mesh faked with CPU devices: memory per device, FLOPs, collectives, compile time.

  python tools/dryrun.py --config=experiments/llama_70b.py --mesh=data=8,fsdp=64,tensor=8 --device_memory_gib=80
  python tools/dryrun.py --config=experiments/grok1_314b.py --mesh=fsdp=16,expert=8,tensor=4
  python tools/dryrun.py --config=experiments/llama_7b.py --mesh=fsdp=64 --search   # remat x microbatch search
  python tools/dryrun.py --config=experiments/llama_70b.py --mesh=fsdp=64,tensor=8 --remat=full --microbatches=4 \
      --global_batch=512 --json_out=/tmp/70b.json
  # Step time on a GPU cluster: from the compiled program (a slice with the same per-device shapes when the mesh is
  # too large to fake), or analytically for axes tweetjax's mesh does not have yet.
  python tools/dryrun.py --config=experiments/llama_70b.py --mesh=data=20,fsdp=64,tensor=8 --microbatches=1 \
      --global_batch=2560 --predict=h100 --tokens=15e12
  # Layout search for a GPU count, ranked by predicted step time; --search_confirm compiles the best few's slices.
  python tools/dryrun.py --config=experiments/grok1_314b.py --search --predict=h100 --devices=10240 \
      --global_batch=1280 --search_confirm=2

Nothing is allocated: the real train step is lowered from ShapeDtypeStructs with shardings and compiled for
`prod(mesh)` fake CPU devices (the process sets --xla_force_host_platform_device_count before JAX starts). The
memory XLA:CPU assigns is an estimate for a GPU; the analytic column is printed next to it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from tweetjax import paths
from tweetjax.perf import env, hardware, layout_search, links, plan, step_time

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=False)
_MESH = flags.DEFINE_string("mesh", "", "Mesh axis sizes, e.g. data=8,fsdp=64,tensor=8 (default: config.mesh, "
                            "with --devices filling a -1 axis). Unnamed axes are 1.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Device count when the mesh has a -1 axis; with --search --predict, "
                                "the GPU count to search layouts for.")
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
_PREDICT = flags.DEFINE_string("predict", "", "Predict the step time on this GPU (h100, h200, a100): breakdown, "
                               "tokens/s, MFU. With --search: search layouts for --devices GPUs.")
_HW = flags.DEFINE_string("hardware_overrides", "", "Override profile fields, e.g. "
                          "nic_bytes_per_s=25e9,gpus_per_node=4")
_PROGRAM = flags.DEFINE_string("program_overrides", "", "Override how the step runs (tweetjax/perf/workload.py "
                               "Program), e.g. grad_reduce=per_step,tp_overlap=0.5")
_TOKENS = flags.DEFINE_float("tokens", 0.0, "Token budget: print the wall time and GPU-hours it takes.")
_SLICE = flags.DEFINE_integer("slice_devices", plan.MAX_SLICE_DEVICES, "Largest mesh compiled on fake CPU devices; "
                              "larger ones compile a slice with the same per-device shapes (data shrunk).")
_ANALYTIC = flags.DEFINE_bool("analytic", False, "--predict without compiling: the analytic collective model only.")
_VIRTUAL = flags.DEFINE_integer("virtual_stages", 1, "Pipeline chunks per device (interleaved 1F1B) for --predict.")
_SEARCH_AXES = flags.DEFINE_string("search_axes", ",".join(plan.mesh_lib.MESH_AXES),
                                   "Mesh axes the layout search may use (add stage,context to plan ahead).")
_SEARCH_MAX_MICRO = flags.DEFINE_integer("search_max_microbatches", 64, "Largest microbatch count the layout search "
                                         "tries.")
_SEARCH_TOP = flags.DEFINE_integer("search_top", 8, "Layouts listed by the layout search (3 with breakdowns).")
_SEARCH_CONFIRM = flags.DEFINE_integer("search_confirm", 0, "Compile this many of the best layouts' slices (one "
                                       "subprocess each) for XLA's memory and the compiled-program prediction.")


def parse_mesh(spec: str) -> dict[str, int]:
  mesh = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, size = item.partition("=")
    if not sep:
      raise app.UsageError(f"--mesh item {item!r}: expected axis=size (axes: {', '.join(links.DEVICE_ORDER)})")
    mesh[name.strip()] = int(size)
  return mesh


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  paths.resolve_tool_paths(config, _JSON)  # relative to where the command started
  if _PREDICT.value:
    config = _prepare_prediction(config)
    if config is None:
      return
  elif _MESH.value:
    mesh = {axis: 1 for axis in config.mesh.keys()}
    mesh.update(parse_mesh(_MESH.value))
    config.mesh.update(mesh)
  sizes = [int(v) for v in config.mesh.values()]
  if -1 in sizes and not _DEVICES.value:
    raise app.UsageError(f"mesh {dict(config.mesh)} has a -1 axis: give every size in --mesh or pass --devices")
  devices = math.prod(sizes) if _PREDICT.value else _DEVICES.value or math.prod(sizes)
  if not _PREDICT.value:  # (applied before the slice was cut)
    _overrides(config)

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
    _write_json({"search": rows})
    return

  result = dryrun.dry_run(config, device_memory_bytes=memory, usable_fraction=_USABLE.value)
  if _REPORT.value:
    from tweetjax.train.experiment import build_experiment  # pylint: disable=g-import-not-at-top
    print(build_experiment(config).sharding_report())
  print(dryrun.format_report(result), flush=True)
  summary = result.summary()
  if _PREDICT.value:
    hw = hardware.get_profile(_PREDICT.value, _HW.value)
    pred, report, checks = plan.compiled_prediction(_FULL_CONFIG[0], result, _PLAN[0], hw,
                                                    plan.program_for(_FULL_CONFIG[0], _PROGRAM.value), _VIRTUAL.value)
    print("\n" + report + "\n\n" + step_time.format_prediction(pred, _TOKENS.value))
    summary["prediction"] = dict(pred.summary(), compiled_checks=[dataclasses.asdict(c) for c in checks])
  _write_json(summary)


def _write_json(obj) -> None:
  if _JSON.value:
    os.makedirs(os.path.dirname(_JSON.value), exist_ok=True)
    with open(_JSON.value, "w") as f:
      json.dump(obj, f, indent=1)


_FULL_CONFIG, _PLAN = [], []  # the unsliced config and the slice plan, for the compiled prediction


def _full_mesh(config) -> dict[str, int]:
  mesh = {axis: int(n) for axis, n in config.mesh.items()}
  if _MESH.value:
    mesh = {axis: 1 for axis in mesh}
    mesh.update(parse_mesh(_MESH.value))
  known = math.prod(n for n in mesh.values() if n != -1)
  fill = [axis for axis, n in mesh.items() if n == -1]
  if fill:
    if not _DEVICES.value or _DEVICES.value % known:
      raise app.UsageError(f"mesh {mesh} has a -1 axis: pass --devices (a multiple of {known}) or every size in --mesh")
    mesh[fill[0]] = _DEVICES.value // known
  return links.full_mesh(mesh)


def _overrides(config):
  if _REMAT.value:
    config.model.remat_policy = _REMAT.value
  if _MICRO.value:
    config.train.microbatches = _MICRO.value
  if _BATCH.value:
    config.data.global_batch_size = _BATCH.value
  if _SEQ.value:
    config.data.seq_len = _SEQ.value


def _prepare_prediction(config):
  """--predict: the layout search, an analytic prediction, or the config to compile (the slice); None when done."""
  _overrides(config)
  hw = hardware.get_profile(_PREDICT.value, _HW.value)
  program = plan.program_for(config, _PROGRAM.value)
  if _SEARCH.value:
    devices = _DEVICES.value or math.prod(_full_mesh(config).values())
    space = layout_search.SearchSpace(axes=layout_search.axes_of(_SEARCH_AXES.value.split(",")),
                                      remat=tuple(_SEARCH_REMAT.value.split(",")) if flags.FLAGS[
                                          "search_remat"].present else layout_search.REMAT,
                                      max_microbatches=_SEARCH_MAX_MICRO.value)
    memory_gib = _MEMORY.value if flags.FLAGS["device_memory_gib"].present else hw.hbm_bytes / 2**30
    hw_search = hw if not flags.FLAGS["device_memory_gib"].present else hardware.dataclasses.replace(
        hw, hbm_bytes=memory_gib * 2**30)
    result = layout_search.search(plan.model_shape(config), devices, int(config.data.global_batch_size),
                                  int(config.data.seq_len), program, hw_search, space, _USABLE.value)
    print(layout_search.format_search(result, top=_SEARCH_TOP.value, tokens=_TOKENS.value), flush=True)
    confirmed = []
    if _SEARCH_CONFIRM.value and result.ranked:
      import tempfile  # pylint: disable=g-import-not-at-top
      print(f"\ncompiling the best {_SEARCH_CONFIRM.value} layouts' slices:", flush=True)
      base = [a for a in sys.argv[1:] if a.startswith("--config")]
      base += [f"--hardware_overrides={_HW.value}", f"--program_overrides={_PROGRAM.value}"]
      with tempfile.TemporaryDirectory() as workdir:
        confirmed = plan.confirm_by_compile(base, [c.layout for c in result.ranked[:_SEARCH_CONFIRM.value]],
                                            _PREDICT.value, device_memory_gib=memory_gib,
                                            slice_devices=_SLICE.value, workdir=workdir,
                                            log=lambda line: print(line, flush=True))
    _write_json({"search": [{"memory_bytes": c.memory.total, **c.prediction.summary()} for c in result.ranked],
                 "considered": result.considered, "seconds": result.seconds, "confirmed": confirmed})
    return None
  mesh = _full_mesh(config)
  slice_plan = plan.plan_slice(mesh, _SLICE.value)
  if _ANALYTIC.value or slice_plan.slice_mesh is None:
    reason = "analytic (--analytic)" if _ANALYTIC.value else slice_plan.reason
    pred = plan.analytic_prediction(config, mesh, hw, program, _VIRTUAL.value, reason)
    print(step_time.format_prediction(pred, _TOKENS.value))
    _write_json({"prediction": pred.summary()})
    return None
  _FULL_CONFIG.append(config)
  _PLAN.append(slice_plan)
  print(slice_plan.reason, flush=True)
  return plan.slice_config(config, slice_plan)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  sys.setrecursionlimit(10_000)
  app.run(main)
