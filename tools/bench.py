"""Benchmarks against the hardware limit: matmul peak, train-step tokens/s and MFU, a PyTorch peer, decoding,
compile time vs depth. Prints tables; asserts nothing.

  python tools/bench.py                              # CPU: peak, step (1 and 8 fake devices), decode, compile
  python tools/bench.py --sections=peak,step --peer=torch --dtypes=float32,bfloat16 --json_out=/tmp/bench.json
  python tools/bench.py --sections=step --shapes=small --devices=1 --override=data.global_batch_size=4
  python tools/bench.py --sections=profile --shapes=small --dtypes=float32   # wall time per model part, one step
  python tools/bench.py --sections=compare --shapes=small --variant=base: \
      --variant="thp:GLIBC_TUNABLES=glibc.malloc.hugetlb=1"   # paired A/B: XLA flags, overrides, env variables
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
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from tweetjax.perf import cpu  # pylint: disable=g-import-not-at-top,wrong-import-position  (no JAX: safe here)

_SECTIONS = flags.DEFINE_list("sections", ["peak", "step", "decode", "compile"],
                              "Which benchmarks: peak, step, compare, decode, compile, profile (one traced step of "
                              "each --shapes x --dtypes on 1 device: wall time per model part).")
_SHAPES = flags.DEFINE_list("shapes", ["small", "wide"], "Model shapes for the step benchmark.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_DEVICES = flags.DEFINE_list("devices", ["1", "8"], "Device counts for the step benchmark (fake on a CPU).")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed train steps per configuration (after a compiling warm-up).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Config override key=value (e.g. data.global_batch_size=4).")
_PEER = flags.DEFINE_enum("peer", None, ["torch"], "Also time Hugging Face LlamaForCausalLM in eager PyTorch.")
_PEER_STEPS = flags.DEFINE_integer("peer_steps", 2, "Timed PyTorch steps.")
_PEER_TIMEOUT = flags.DEFINE_float("peer_timeout_s", 900, "Give up on a PyTorch measurement after this long (bf16 "
                                   "matmuls without avx512_bf16/AMX can be orders of magnitude slower).")
_VARIANTS = flags.DEFINE_multi_string(
    "variant", [], "compare section: NAME:SETTINGS, SETTINGS space-separated XLA flags (--xla_...) and config "
    "overrides (model.dtype=bfloat16); the first variant is the baseline of the ratios.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "compare section: rounds; each times one step of every variant, in turn.")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "16"], "decode section: batch sizes.")
_DECODE_WEIGHTS = flags.DEFINE_list("decode_weights", ["model", "bfloat16", "int8"],
                                    "decode section: sampling weight formats (tweetjax/model/quantize.py).")
_DECODE_SAMPLING = flags.DEFINE_list("decode_sampling", ["greedy"], "decode section: greedy and/or top_p.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "decode section: prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "decode section: generated tokens per prompt.")
_DECODE_REPEATS = flags.DEFINE_integer("decode_repeats", 3, "decode section: timed calls (after a warm-up).")
_LAYERS = flags.DEFINE_list("compile_layers", ["4", "16", "48"], "Depths for the compile-time benchmark.")
_GPU = flags.DEFINE_bool("gpu", False, "GPU mode: experiments/llama_1b.py in bf16 with cuDNN attention.")
_GPU_ROWS = flags.DEFINE_integer("gpu_rows_per_device", 4, "GPU mode: rows (of the config's seq_len) per device "
                                 "per step.")
_GPU_CONFIG = flags.DEFINE_string("gpu_config", "experiments/llama_1b.py", "GPU mode: the config to time.")
_GPU_ATTENTION = flags.DEFINE_string("gpu_attention", "cudnn", "GPU mode: model.attention_impl.")
_GPU_ALLOW_CPU = flags.DEFINE_bool("gpu_allow_cpu", False, "GPU mode on a CPU (checks the mode's plumbing, e.g. "
                                   "tools/gpu_check.sh --cpu; MFU is then not reported).")
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
    return bench.matmul_peak(spec["dtype"], n=spec.get("n", 2048), accumulate_f32=spec.get("accumulate_f32", False))
  if kind == "torch_peak":
    return bench.torch_matmul_peak(spec["dtype"], n=spec.get("n", 2048))
  if kind == "step":
    return bench.train_step_rate(config, steps=spec["steps"])
  if kind == "serve_steps":  # compare: compile once, then time one step per "step" line read from stdin
    runner = bench.StepRunner(config)
    print(_RESULT + json.dumps({"ready": True, **runner.describe(), "xla_flags": os.environ.get("XLA_FLAGS", "")}),
          flush=True)
    for line in sys.stdin:
      if line.strip() == "step":
        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds = runner.step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        # page faults and kernel time: a step that maps fresh pages for its temporaries pays for them every time
        print(_RESULT + json.dumps({"seconds": seconds, "loss": float(runner.metrics["loss"]),
                                    "minor_faults": after.ru_minflt - before.ru_minflt,
                                    "system_s": after.ru_stime - before.ru_stime}), flush=True)
      elif line.strip() == "probe":
        probes = {f"{d}{'->f32' if acc else ''}": bench.matmul_peak(d, n=1024, accumulate_f32=acc)["best_flops"]
                  for d, acc in (("float32", False), ("bfloat16", False), ("bfloat16", True))}
        print(_RESULT + json.dumps(probes), flush=True)
      else:
        break
    return {"done": True}
  if kind == "torch_step":
    return bench.torch_step_rate(config, spec["dtype"], steps=spec["steps"])
  if kind == "decode":
    from tweetjax.perf import bench_decode as decode_lib  # pylint: disable=g-import-not-at-top
    keys = ("batch", "prompt_len", "new_tokens", "repeats", "weights", "sampling", "export_dir")
    return decode_lib.tweetjax_decode_rate(config, **{k: spec[k] for k in keys})
  if kind == "torch_decode":
    from tweetjax.perf import bench_decode as decode_lib  # pylint: disable=g-import-not-at-top
    return decode_lib.torch_decode_rate(spec["hf_dir"], new_tokens=spec["new_tokens"], repeats=spec["repeats"],
                                        dtype=spec["dtype"], sampling=spec["sampling"])
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


def _context() -> str:
  """What every section header says about the machine: its load, and the CPU and ISA it ran on."""
  return f"{_load()}; CPU {cpu.cpu_info().describe()}"


def bench_peak(results: dict) -> None:
  """jnp.dot throughput per dtype; on a CPU with bf16 dot units the bf16 figure that counts (the MFU denominator)
  is the bf16 x bf16 -> fp32 dot the model's matmuls use there (tweetjax/model/matmul.py)."""
  print(f"\n== matmul peak (2048 x 2048 jnp.dot, best of 5) [{_context()}]", flush=True)
  bf16_units = cpu.has_bf16_dot_units()
  for dtype in _DTYPES.value:
    forms = [False, True] if dtype == "bfloat16" else [False]
    for accumulate_f32 in forms:
      r = _subprocess({"kind": "peak", "dtype": dtype, "accumulate_f32": accumulate_f32})
      if not r:
        continue
      label = f"{dtype} -> fp32" if accumulate_f32 else dtype
      used = accumulate_f32 == (dtype == "bfloat16" and bf16_units)
      if used:
        results.setdefault("peak", {})[dtype] = r
      results.setdefault("peak_forms", {})[label] = r
      print(f"  jax   {label:<17} {r['best_flops'] / 1e9:8.1f} GFLOP/s best   {r['median_flops'] / 1e9:8.1f} median"
            + ("   <- the model's matmuls, the MFU peak" if used and dtype == "bfloat16" else ""), flush=True)
    if _PEER.value == "torch":
      # Without avx512_bf16/AMX torch's bf16 matmul is emulated and very slow: a smaller square keeps it short.
      n = 512 if dtype == "bfloat16" and not bf16_units else 2048
      r = _subprocess({"kind": "torch_peak", "dtype": dtype, "n": n}, timeout=_PEER_TIMEOUT.value)
      if r and "timed_out_s" not in r:
        results.setdefault("torch_peak", {})[dtype] = r
        print(f"  torch {dtype:<17} {r['best_flops'] / 1e9:8.1f} GFLOP/s best   {r['median_flops'] / 1e9:8.1f} "
              f"median  (n={n})", flush=True)


def bench_step(results: dict) -> None:
  peaks = results.get("peak", {})
  print(f"\n== train step (fwd + bwd + AdamW), {_STEPS.value} timed steps [{_context()}]", flush=True)
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
  print(f"\n== where a train step's time goes (one traced step, 1 device) [{_context()}]", flush=True)
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
            f"(the rest: loop/branch control and gaps that follow no dot; load {r['load']})")
      for row in r["rows"]:
        share = 100 * row["seconds"] / r["step_s"]
        print(f"    {row['kind']:<7} {row['part']:<32} {row['seconds']:8.3f} s {share:5.1f}%")


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str], dict[str, str]]:
  """'NAME:--xla_flag=v model.key=v ENV_VAR=v ...' -> (name, XLA flags, config overrides, environment variables).

  An upper-case KEY=VALUE (e.g. GLIBC_TUNABLES=glibc.malloc.hugetlb=1) is set in the variant's process environment,
  for what is fixed when a process starts; a lower-case dotted key is a config override."""
  name, sep, settings = text.partition(":")
  if not sep or not name.strip():
    raise app.UsageError(f"--variant={text!r}: expected NAME:SETTINGS (e.g. 'fast_math:--xla_cpu_enable_fast_math=true')")
  xla_flags, overrides, environ = [], {}, {}
  for token in settings.split():
    key, eq, value = token.partition("=")
    if token.startswith("--"):
      xla_flags.append(token)
    elif eq and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
      environ[key] = value
    elif eq:
      overrides[key] = value
    else:
      raise app.UsageError(f"--variant={text!r}: {token!r} is neither an XLA flag (--xla_...) nor key=value")
  return name.strip(), xla_flags, overrides, environ


class _StepServer:
  """A worker process holding one variant's compiled train step; `step()` asks it to time one more."""

  def __init__(self, name: str, spec: dict, environ: dict[str, str] | None = None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | (environ or {})
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    self.name = name
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker=" + json.dumps(spec)],
                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True)
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(_RESULT):
        return json.loads(line[len(_RESULT):])
    raise RuntimeError(f"compare variant {self.name}: the worker exited ({self.proc.wait()}) without a result")

  def ask(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=120)


def bench_compare(results: dict) -> None:
  """Paired A/B of XLA flags and config settings on the train step (first --shapes entry, 1 device).

  Each variant compiles once in its own process (XLA flags are fixed when JAX starts) and waits; then the variants
  take turns, one timed step each per round, so every ratio to the baseline compares steps seconds apart, under
  the same load. A jnp.dot probe runs in every process before and after (the flags can change it too).
  """
  variants = [parse_variant(v) for v in _VARIANTS.value]
  if len(variants) < 2:
    raise app.UsageError("--sections=compare needs at least two --variant=NAME:SETTINGS (the first is the baseline)")
  path, extra = _SHAPE_CONFIGS[_SHAPES.value[0]]
  print(f"\n== compare ({_SHAPES.value[0]}, 1 device, {_ROUNDS.value} rounds of one step per variant, in turn) "
        f"[{_context()}]", flush=True)
  servers = []
  try:
    for name, xla_flags, overrides, environ in variants:
      spec = {"kind": "serve_steps", "config": path, "overrides": _overrides({**extra, **overrides, "mesh.data": -1}),
              "xla_flags": xla_flags, "fake_devices": 1}
      servers.append(_StepServer(name, spec, environ))
    for server in servers:
      server.ask("step")  # a second warm-up step
    probes = {s.name: s.ask("probe") for s in servers}
    steps: dict[str, list[dict]] = {s.name: [] for s in servers}  # the worker's reply to every timed step
    for _ in range(_ROUNDS.value):
      for server in servers:
        steps[server.name].append(server.ask("step"))
    for server in servers:
      after = server.ask("probe")
      probes[server.name] = {k: max(v, after[k]) for k, v in probes[server.name].items()}
  finally:
    for server in servers:
      server.close()
  base = servers[0].name
  summary = {}
  print(f"  {'variant':<26} {'step s best/median':>20} {'tokens/s':>9} {'vs ' + base:>16}  "
        f"{'per-round ratios':<30} {'faults/step':>11} {'sys s/step':>10}  dot GFLOP/s f32 / bf16 / bf16->f32 (best)")
  per_step = lambda name, key: [r[key] for r in steps[name]]
  for server in servers:
    ts = per_step(server.name, "seconds")
    ratios = [b / t for b, t in zip(per_step(base, "seconds"), ts)]
    p = probes[server.name]
    row = summary[server.name] = {
        **server.info, "seconds": ts, "speed_vs_baseline": statistics.median(ratios),
        "speed_vs_baseline_per_round": ratios, "probes": p,
        "minor_faults_per_step": statistics.median(per_step(server.name, "minor_faults")),
        "system_s_per_step": statistics.median(per_step(server.name, "system_s")),
        "best_tokens_per_s": server.info["tokens_per_step"] / min(ts)}
    print(f"  {server.name:<26} {min(ts):9.3f} / {statistics.median(ts):<8.3f} "
          f"{row['best_tokens_per_s']:9.0f} {row['speed_vs_baseline']:15.2f}x  "
          f"{' '.join(f'{r:.2f}' for r in ratios):<30} {row['minor_faults_per_step']:11,.0f} "
          f"{row['system_s_per_step']:10.2f}  {p['float32'] / 1e9:.0f} / {p['bfloat16'] / 1e9:.0f} / "
          f"{p['bfloat16->f32'] / 1e9:.0f}", flush=True)
  print(f"  [{_load()}]")
  results["compare"] = {"baseline": base, "variants": summary,
                        "settings": {name: {"xla_flags": f, "overrides": o, "environment": e}
                                     for name, f, o, e in variants}}


def bench_decode(results: dict) -> None:
  """KV-cache decoding of experiments/small.py (random init) per batch and sampling weight format, against Hugging
  Face `generate` on the same weights and prompts (--peer=torch), each in its own process."""
  print(f"\n== cached decoding, experiments/small.py, random init, {_PROMPT_LEN.value}-token prompts, "
        f"{_NEW_TOKENS.value} new tokens, best of {_DECODE_REPEATS.value} [{_context()}]", flush=True)
  overrides = _overrides({})
  rows = results.setdefault("decode", [])
  for sampling in _DECODE_SAMPLING.value:
    for batch in (int(b) for b in _DECODE_BATCHES.value):
      with tempfile.TemporaryDirectory(prefix="bench_decode_hf_") as hf_dir:
        hf_dir = os.path.join(hf_dir, "model")
        ours = []
        for i, weights in enumerate(_DECODE_WEIGHTS.value):
          spec = {"kind": "decode", "config": "experiments/small.py", "overrides": overrides, "batch": batch,
                  "prompt_len": _PROMPT_LEN.value, "new_tokens": _NEW_TOKENS.value, "repeats": _DECODE_REPEATS.value,
                  "weights": weights, "sampling": sampling, "platform_cpu": True,
                  "export_dir": hf_dir if i == 0 and _PEER.value == "torch" else ""}
          r = _subprocess(spec)
          if not r:
            continue
          ours.append(r)
          rows.append({"side": "tweetjax", "batch": batch, "sampling": sampling, **r})
          print(f"  batch {batch:>2} {sampling:<6} tweetjax weights={weights:<9} {r['tokens_per_s']:9.1f} tokens/s  "
                f"({r['tokens']} tokens in {r['seconds']:.3f}s, compute {r['compute_dtype']})", flush=True)
        if _PEER.value != "torch" or not ours or not os.path.exists(hf_dir):
          continue
        peers = []
        for dtype in _DTYPES.value:
          r = _subprocess({"kind": "torch_decode", "hf_dir": hf_dir, "new_tokens": _NEW_TOKENS.value,
                           "repeats": _DECODE_REPEATS.value, "dtype": dtype, "sampling": sampling},
                          timeout=_PEER_TIMEOUT.value)
          if not r or "timed_out_s" in r:
            continue
          peers.append(r)
          rows.append({"side": "torch", "batch": batch, "sampling": sampling, **r})
          line = (f"  batch {batch:>2} {sampling:<6} HF generate {dtype:<9}    {r['tokens_per_s']:9.1f} tokens/s  "
                  f"({r['tokens']} tokens in {r['seconds']:.3f}s, torch {r['torch']}, {r['threads']} threads)")
          if sampling == "greedy" and dtype == "float32" and ours[0]["weights"] == "model":
            same = np.mean(np.asarray(ours[0]["generated"]) == np.asarray(r["generated"]))
            line += f"; greedy tokens equal to tweetjax's ({ours[0]['weights']} weights): {100 * same:.1f}%"
          print(line, flush=True)
        if peers:
          best_ours = max(ours, key=lambda x: x["tokens_per_s"])
          best_peer = max(peers, key=lambda x: x["tokens_per_s"])
          ratio = best_ours["tokens_per_s"] / best_peer["tokens_per_s"]
          results.setdefault("decode_ratio", {})[f"{sampling}_batch{batch}"] = ratio
          print(f"  batch {batch:>2} {sampling:<6} best tweetjax ({best_ours['weights']}) / best HF "
                f"({best_peer['dtype']}) = {ratio:.2f}x", flush=True)


def bench_compile(results: dict) -> None:
  print(f"\n== compile time of the train step vs depth (small shape, scanned layers) [{_context()}]", flush=True)
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
  overrides = _overrides({"model.dtype": "bfloat16", "model.attention_impl": _GPU_ATTENTION.value,
                          "data.global_batch_size": _GPU_ROWS.value * count, "mesh.fsdp": -1, "mesh.data": 1,
                          "mesh.tensor": 1, "mesh.expert": 1})
  spec = {"kind": "step", "config": _GPU_CONFIG.value, "overrides": overrides, "steps": _STEPS.value}
  if _GPU_ALLOW_CPU.value:
    spec["fake_devices"] = count
  r = _subprocess(spec)
  if not r:
    raise RuntimeError(f"--gpu: the train-step worker for {_GPU_CONFIG.value} failed (its error is above)")
  if r["platform"] != "gpu" and not _GPU_ALLOW_CPU.value:
    raise app.UsageError(f"--gpu needs a GPU; the worker ran on {r['platform']} ({r['device_kind']})")
  from tweetjax.train.flops import PEAK_FLOPS  # pylint: disable=g-import-not-at-top
  kind = r["device_kind"]
  peak = next((p["bfloat16"] for name, p in PEAK_FLOPS if name.lower() in kind.lower()), 0.0)
  mfu = r["best_model_flops"] / (peak * r["devices"]) if peak else None  # None: no known peak (JSON null)
  results["gpu"] = {"device_kind": kind, "peak_per_device": peak, "mfu_best": mfu, **r}
  print(f"\n== GPU train step, {_GPU_CONFIG.value}, bf16, attention_impl={_GPU_ATTENTION.value}, "
        f"{r['devices']} x {kind}")
  print(f"  {r['tokens_per_step']} tokens/step: {r['best_s']:.3f}s best, {r['median_s']:.3f}s median; "
        f"{r['best_tokens_per_s']:.0f} tokens/s; "
        + (f"MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s per device" if mfu else f"no peak known for {kind}"))


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
  info = cpu.cpu_info()
  results: dict = {"machine": f"CPU: {info.describe()}", "cpu": info.as_dict(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  print(results["machine"])
  if _GPU.value:
    bench_gpu(results)
  else:
    for section in _SECTIONS.value:
      sections = {"peak": bench_peak, "step": bench_step, "compare": bench_compare, "decode": bench_decode,
                  "compile": bench_compile, "profile": bench_profile}
      sections[section](results)
  results["load_at_end"] = _load()
  print(f"\n{results['load_at_end']} (numbers taken on a shared machine move with its load)")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
