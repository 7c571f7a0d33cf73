"""Benchmarks against the hardware limit: matmul peak, train-step tokens/s and MFU, a PyTorch peer, decoding,
compile time vs depth. Prints tables; asserts nothing.

  python tools/bench.py                              # CPU: peak, step (1 and 8 fake devices), decode, compile
  python tools/bench.py --sections=peak,step --peer=torch --dtypes=float32,bfloat16 --json_out=/tmp/bench.json
  python tools/bench.py --sections=step --shapes=small --devices=1 --override=data.global_batch_size=4
  python tools/bench.py --sections=profile --shapes=small --dtypes=float32   # wall time per model part, one step
  python tools/bench.py --gpu                        # GPU: experiments/llama_1b.py, bf16 + cuDNN attention, MFU vs
                                                     # the device's dense bf16 peak (H100: 989 TFLOP/s)

Each measurement runs in its own subprocess (fake device counts and XLA flags are fixed when JAX starts; the
config's xla_flags are applied through tweetjax/perf/env.py like in training). MFU = model FLOP/s (flops.py: 6N +
causal attention) / peak: on a CPU the peak is the measured `jnp.dot` throughput of the compute dtype, and fake
multi-device meshes share the same cores, so they are compared with the same one-machine peak.

Shapes: small = experiments/small.py (d_model 512, 8 layers, vocab 32k); wide = small at d_model 1024, 16/8 heads,
mlp 2816, 4 layers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

_SECTIONS = flags.DEFINE_list("sections", ["peak", "step", "decode", "compile"],
                              "Which benchmarks: peak, step, decode, compile, profile (one traced step of each "
                              "--shapes x --dtypes on 1 device: wall time per model part).")
_SHAPES = flags.DEFINE_list("shapes", ["small", "wide"], "Model shapes for the step benchmark.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_DEVICES = flags.DEFINE_list("devices", ["1", "8"], "Device counts for the step benchmark (fake on a CPU).")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed train steps per configuration (after a compiling warm-up).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Config override key=value (e.g. data.global_batch_size=4).")
_PEER = flags.DEFINE_enum("peer", None, ["torch"], "Also time Hugging Face LlamaForCausalLM in eager PyTorch.")
_PEER_STEPS = flags.DEFINE_integer("peer_steps", 2, "Timed PyTorch steps.")
_PEER_TIMEOUT = flags.DEFINE_float("peer_timeout_s", 900, "Give up on a PyTorch measurement after this long (bf16 "
                                   "matmuls without avx512_bf16/AMX can be orders of magnitude slower).")
_LAYERS = flags.DEFINE_list("compile_layers", ["4", "16", "48"], "Depths for the compile-time benchmark.")
_GPU = flags.DEFINE_bool("gpu", False, "GPU mode: experiments/llama_1b.py in bf16 with cuDNN attention.")
_GPU_ROWS = flags.DEFINE_integer("gpu_rows_per_device", 4, "GPU mode: 4096-token rows per device per step.")
_JSON = flags.DEFINE_string("json_out", "", "Also write every result as JSON here.")
_WORKER = flags.DEFINE_string("worker", "", "(internal) run one measurement given as JSON and print it.")

_SHAPE_CONFIGS = {
    "small": ("experiments/small.py", {}),
    "wide": ("experiments/small.py", {"model.d_model": 1024, "model.num_heads": 16, "model.num_kv_heads": 8,
                                      "model.mlp_dim": 2816, "model.num_layers": 4}),
    "llama_1b": ("experiments/llama_1b.py", {}),
}
_RESULT = "BENCH_RESULT "


# --- worker side (inside a subprocess) -------------------------------------------------------------------------


def load_config(path: str, overrides: dict):
  spec = importlib.util.spec_from_file_location("bench_experiment", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None)
  config.unlock()
  for key, value in overrides.items():
    node, *rest = key.split(".")
    target = config
    for part in [node] + rest[:-1]:
      target = target[part]
    leaf = rest[-1] if rest else node
    if rest:
      current = target[leaf]
      target[leaf] = type(current)(value) if not isinstance(current, bool) else str(value).lower() in ("1", "true")
    else:
      config[leaf] = value
  return config


def run_worker(spec: dict) -> dict:
  from tweetjax.perf import env  # pylint: disable=g-import-not-at-top
  config = load_config(spec["config"], spec.get("overrides", {})) if spec.get("config") else None
  env.setup_environment(config, fake_devices=spec.get("fake_devices"), extra_flags=spec.get("xla_flags", ()),
                        distributed=False)
  from tweetjax.perf import bench  # pylint: disable=g-import-not-at-top
  kind = spec["kind"]
  if kind == "peak":
    return bench.matmul_peak(spec["dtype"], n=spec.get("n", 2048))
  if kind == "torch_peak":
    return bench.torch_matmul_peak(spec["dtype"], n=spec.get("n", 2048))
  if kind == "step":
    return bench.train_step_rate(config, steps=spec["steps"])
  if kind == "torch_step":
    return bench.torch_step_rate(config, spec["dtype"], steps=spec["steps"])
  if kind == "profile":
    return bench.train_step_profile(config)
  if kind == "compile":
    if spec.get("cache_dir"):
      from tweetjax.train.profiling import setup_compilation_cache  # pylint: disable=g-import-not-at-top
      setup_compilation_cache(spec["cache_dir"], spec["cache_dir"])
    return bench.compile_time(config)
  raise ValueError(f"unknown worker kind {kind!r}")


# --- driver side ------------------------------------------------------------------------------------------------


def _subprocess(spec: dict, timeout: float = 3600) -> dict | None:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  if spec.get("platform_cpu"):
    env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, os.path.abspath(__file__), "--worker=" + json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    print(f"  TIMED OUT after {timeout:.0f}s: {spec['kind']} {spec.get('dtype', '')}", flush=True)
    return {"timed_out_s": timeout}
  for line in proc.stdout.splitlines():
    if line.startswith(_RESULT):
      return {**json.loads(line[len(_RESULT):]), "load": round(os.getloadavg()[0], 2)}
  print(f"  FAILED {spec}: {proc.stderr[-2000:]}", flush=True)
  return None


def _overrides(extra: dict | None = None) -> dict:
  out = dict(extra or {})
  for item in _OVERRIDES.value:
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip()
  return out


def _load() -> str:
  one, five, fifteen = os.getloadavg()
  return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def bench_peak(results: dict) -> None:
  print(f"\n== matmul peak (2048 x 2048 jnp.dot, best of 5) [{_load()}]", flush=True)
  for dtype in _DTYPES.value:
    r = _subprocess({"kind": "peak", "dtype": dtype})
    if r:
      results.setdefault("peak", {})[dtype] = r
      print(f"  jax   {dtype:<9} {r['best_flops'] / 1e9:8.1f} GFLOP/s best   {r['median_flops'] / 1e9:8.1f} median")
    if _PEER.value == "torch":
      # torch's bf16 matmul is very slow without avx512_bf16/AMX: a smaller square keeps the probe short.
      n = 512 if dtype == "bfloat16" else 2048
      r = _subprocess({"kind": "torch_peak", "dtype": dtype, "n": n}, timeout=_PEER_TIMEOUT.value)
      if r and "timed_out_s" not in r:
        results.setdefault("torch_peak", {})[dtype] = r
        print(f"  torch {dtype:<9} {r['best_flops'] / 1e9:8.1f} GFLOP/s best   {r['median_flops'] / 1e9:8.1f} median"
              f"  (n={n})")


def bench_step(results: dict) -> None:
  peaks = results.get("peak", {})
  print(f"\n== train step (fwd + bwd + AdamW), {_STEPS.value} timed steps [{_load()}]", flush=True)
  print("  shape  dtype     devices  tokens/step   step s (best/median)   tokens/s (best)   MFU (best/median)")
  for shape in _SHAPES.value:
    path, extra = _SHAPE_CONFIGS[shape]
    for dtype in _DTYPES.value:
      overrides = _overrides({**extra, "model.dtype": dtype})
      peak = peaks.get(dtype, {}).get("best_flops", 0.0)
      for count in _DEVICES.value:
        spec = {"kind": "step", "config": path, "overrides": {**overrides, "mesh.data": -1},
                "fake_devices": int(count), "steps": _STEPS.value, "platform_cpu": True}
        r = _subprocess(spec)
        if not r:
          continue
        r["mfu_best"] = r["best_model_flops"] / peak if peak else float("nan")
        r["mfu_median"] = r["flops_per_token"] * r["median_tokens_per_s"] / peak if peak else float("nan")
        results.setdefault("step", []).append({"shape": shape, "dtype": dtype, **r})
        print(f"  {shape:<6} {dtype:<9} {r['devices']:>7} {r['tokens_per_step']:>12} {r['best_s']:>10.3f} / "
              f"{r['median_s']:<9.3f} {r['best_tokens_per_s']:>15.0f}   {100 * r['mfu_best']:5.1f}% / "
              f"{100 * r['mfu_median']:.1f}%", flush=True)
      if _PEER.value == "torch":
        r = _subprocess({"kind": "torch_step", "config": path, "overrides": overrides, "dtype": dtype,
                         "steps": _PEER_STEPS.value}, timeout=_PEER_TIMEOUT.value)
        if not r:
          continue
        if "timed_out_s" in r:  # not even warm-up + steps finished: an upper bound on its throughput
          tokens = int(overrides.get("data.global_batch_size", 0) or 0) * int(overrides.get("data.seq_len", 0) or 0)
          results.setdefault("torch_step", []).append({"shape": shape, "dtype": dtype, **r})
          print(f"  {shape:<6} {dtype:<9}   torch did not finish {_PEER_STEPS.value + 1} steps in "
                f"{r['timed_out_s']:.0f}s" + (f" (< {tokens * (_PEER_STEPS.value + 1) / r['timed_out_s']:.1f} "
                                               "tokens/s)" if tokens else ""), flush=True)
          continue
        ours = [x for x in results.get("step", []) if x["shape"] == shape and x["dtype"] == dtype
                and x["devices"] == 1]
        ratio = ours[0]["best_tokens_per_s"] / r["best_tokens_per_s"] if ours else float("nan")
        results.setdefault("torch_step", []).append({"shape": shape, "dtype": dtype, "ours_over_torch": ratio, **r})
        print(f"  {shape:<6} {dtype:<9}   torch {r['tokens_per_step']:>12} {r['best_s']:>10.3f} / "
              f"{r['median_s']:<9.3f} {r['best_tokens_per_s']:>15.0f}   tweetjax (1 device) / torch = {ratio:.2f}x "
              f"(torch {r['torch']}, transformers {r['transformers']}, {r['threads']} threads)", flush=True)
        if ours and peak:
          print("  " + _ratio_line(shape, dtype, ours[0], r, peak, results.get("torch_peak", {}).get(dtype)),
                flush=True)


def _ratio_line(shape: str, dtype: str, ours: dict, torch: dict, peak: float, torch_peak: dict | None) -> str:
  """The ratios of one shape and dtype: both steps' model FLOP/s against this run's `jnp.dot` peak (and torch's
  against its own `torch.mm` peak), and tweetjax over torch; the load when each step was measured."""
  torch_flops = ours["flops_per_token"] * torch["best_tokens_per_s"]
  own = f", {100 * torch_flops / torch_peak['best_flops']:.1f}% of torch.mm's" if torch_peak else ""
  speedup = ours["best_tokens_per_s"] / torch["best_tokens_per_s"]
  return (f"ratios {shape} {dtype}: tweetjax {100 * ours['mfu_best']:.1f}% of the jnp.dot peak, torch "
          f"{100 * torch_flops / peak:.1f}%{own}; tweetjax / torch {speedup:.2f}x "
          f"(1-minute load after each: {ours.get('load', '?')} / {torch.get('load', '?')})")


def bench_profile(results: dict) -> None:
  print(f"\n== where a train step's time goes (one traced step, 1 device) [{_load()}]", flush=True)
  for shape in _SHAPES.value:
    path, extra = _SHAPE_CONFIGS[shape]
    for dtype in _DTYPES.value:
      overrides = _overrides({**extra, "model.dtype": dtype, "mesh.data": -1})
      r = _subprocess({"kind": "profile", "config": path, "overrides": overrides, "fake_devices": 1,
                       "platform_cpu": True, "xla_flags": ["--xla_cpu_enable_xprof_traceme=true"]})
      if not r:
        continue
      results.setdefault("profile", []).append({"shape": shape, "dtype": dtype, **r})
      print(f"  {shape} {dtype}: step {r['step_s']:.3f} s, of it {r['in_ops_s']:.3f} s inside ops "
            f"(the rest: loop/branch control and gaps; load {r['load']})")
      for row in r["rows"]:
        share = 100 * row["seconds"] / r["step_s"]
        print(f"    {row['kind']:<7} {row['part']:<32} {row['seconds']:8.3f} s {share:5.1f}%")


def bench_decode(results: dict) -> None:
  """tools/bench_decode.py (the evaluation team's decode benchmark) at batch 1 and 16."""
  print(f"\n== cached decoding, experiments/small.py, random init [{_load()}]", flush=True)
  for batch in (1, 16):
    cmd = [sys.executable, os.path.join(REPO, "tools", "bench_decode.py"), "--config=experiments/small.py",
           f"--batch={batch}", "--prompt_len=32", "--new_tokens=64", "--repeats=3"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    rates = [line for line in proc.stdout.splitlines() if "tokens/s" in line or "speed-up" in line]
    if proc.returncode or not rates:
      print(f"  batch {batch}: FAILED {proc.stderr[-1500:]}")
      continue
    results.setdefault("decode", {})[str(batch)] = rates
    for line in rates:
      print(f"  batch {batch:>2}: {line.strip()}", flush=True)


def bench_compile(results: dict) -> None:
  print(f"\n== compile time of the train step vs depth (small shape, scanned layers) [{_load()}]", flush=True)
  print("  layers   cold s   from persistent cache s")
  rows = {}
  with tempfile.TemporaryDirectory(prefix="bench_jax_cache_") as cache_dir:
    for layers in _LAYERS.value:
      overrides = _overrides({"model.num_layers": int(layers)})
      spec = {"kind": "compile", "config": "experiments/small.py", "overrides": overrides, "fake_devices": 1,
              "cache_dir": os.path.join(cache_dir, layers), "platform_cpu": True}
      cold, warm = _subprocess(spec), _subprocess(spec)
      if not cold or not warm:
        continue
      rows[layers] = {"cold_s": cold["seconds"], "cached_s": warm["seconds"], "cached_source": warm["source"]}
      print(f"  {layers:>6} {cold['seconds']:8.2f} {warm['seconds']:10.2f}   ({warm['source']})", flush=True)
  results["compile"] = rows
  if _LAYERS.value[0] in rows and _LAYERS.value[-1] in rows:
    ratio = rows[_LAYERS.value[-1]]["cold_s"] / rows[_LAYERS.value[0]]["cold_s"]
    results["compile_ratio"] = ratio
    print(f"  cold compile {_LAYERS.value[-1]} / {_LAYERS.value[0]} layers = {ratio:.2f}x")


def bench_gpu(results: dict) -> None:
  # JAX is not started here: the parent would hold the GPUs' memory while the worker runs.
  count = int(_DEVICES.value[0]) if _DEVICES.value != ["1", "8"] else _gpu_count()
  overrides = _overrides({"model.dtype": "bfloat16", "model.attention_impl": "cudnn",
                          "data.global_batch_size": _GPU_ROWS.value * count, "mesh.fsdp": -1, "mesh.data": 1})
  spec = {"kind": "step", "config": "experiments/llama_1b.py", "overrides": overrides, "steps": _STEPS.value}
  r = _subprocess(spec)
  if not r:
    return
  if r["platform"] != "gpu":
    raise app.UsageError(f"--gpu needs a GPU; the worker ran on {r['platform']} ({r['device_kind']})")
  from tweetjax.train.flops import PEAK_FLOPS  # pylint: disable=g-import-not-at-top
  kind = r["device_kind"]
  peak = next((p["bfloat16"] for name, p in PEAK_FLOPS if name.lower() in kind.lower()), 0.0)
  mfu = r["best_model_flops"] / (peak * r["devices"]) if peak else float("nan")
  results["gpu"] = {"device_kind": kind, "peak_per_device": peak, "mfu_best": mfu, **r}
  print(f"\n== GPU train step, experiments/llama_1b.py, bf16, cuDNN attention, {r['devices']} x {kind}")
  print(f"  {r['tokens_per_step']} tokens/step: {r['best_s']:.3f}s best, {r['median_s']:.3f}s median; "
        f"{r['best_tokens_per_s']:.0f} tokens/s; MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s per device")


def _gpu_count() -> int:
  """GPUs on this host without starting JAX (nvidia-smi; CUDA_VISIBLE_DEVICES restricts)."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible:
    return len([d for d in visible.split(",") if d.strip()])
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError):
    return 1
  return max(len([line for line in out.splitlines() if line.startswith("GPU ")]), 1)


def main(argv):
  del argv
  if _WORKER.value:
    print(_RESULT + json.dumps(run_worker(json.loads(_WORKER.value))), flush=True)
    return
  results: dict = {"machine": machine_description(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  print(results["machine"])
  if _GPU.value:
    bench_gpu(results)
  else:
    for section in _SECTIONS.value:
      sections = {"peak": bench_peak, "step": bench_step, "decode": bench_decode, "compile": bench_compile,
                  "profile": bench_profile}
      sections[section](results)
  results["load_at_end"] = _load()
  print(f"\n{results['load_at_end']} (numbers taken on a shared machine move with its load)")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


def machine_description() -> str:
  model = ""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    isa = sorted({w for w in info.split() if w.startswith(("avx", "amx", "fma"))})
  except OSError:
    isa = []
  return f"CPU: {model or 'unknown'}, {os.cpu_count()} cores, ISA {' '.join(isa)}"


if __name__ == "__main__":
  app.run(main)
