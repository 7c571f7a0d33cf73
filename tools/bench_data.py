"""Data throughput: the loader's normalize/tokenize/pack per core, or the dataset build of either engine.

  python tools/bench_data.py                       # synthetic tweets, tokenizer trained on the fly
  python tools/bench_data.py --dataset_dir=/data/tweets --tokenizer=/data/tweets/tokenizer.model
  python tools/bench_data.py --engine=beam --num_tweets=200000 [--workers=1,2] [--work_dir=/tmp/bench_build]

--engine=beam|local builds a synthetic corpus of --num_tweets (written once into --work_dir, in parts of 200k
tweets with disjoint ids) with tools/build_dataset.py in a subprocess: for beam once per --workers count
(DirectRunner, multi_processing), then with the local engine for comparison (--compare_local). Prints tweets/s
(wall), tweets per CPU-second of all processes, the driver's own CPU seconds, and the peak RSS (VmHWM) of the
driver and of each worker.

Loader mode:
Rates are tweets per second of process CPU time (`time.process_time()`, all threads; the process is pinned to one
core), so other load on the machine slows them less than wall time; wall-clock rates and the load average are
printed next to them. Each stage keeps its best of `--repeats` passes over the tweets.
"normalize + tokenize + pack" starts from raw text, as the build does; the loader starts from the stored text, which
the build already normalized, so it only tokenizes and packs (it normalizes again only when `config.data.normalize`
differs from the build's options, see tweetjax/data/pipeline.py).
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

from tweetjax.data import normalize, packing, synthetic, tokenizer, writer

_DATASET_DIR = flags.DEFINE_string("dataset_dir", None, "Built dataset (train split); default: synthetic texts.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model; default: train a small one here.")
_NUM_TWEETS = flags.DEFINE_integer("num_tweets", 50_000, "Tweets to process.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Packed sequence length.")
_WINDOW = flags.DEFINE_integer("pack_window", 4096, "Documents per packing window (the loader's default).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Passes over the tweets; each stage reports its fastest pass.")

_ENGINE = flags.DEFINE_enum("engine", None, ["beam", "local"], "Benchmark the dataset build instead of the loader.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "--engine=beam: worker process counts to run.")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/tweetjax_bench_build", "--engine: corpus and outputs.")
_COMPARE_LOCAL = flags.DEFINE_bool("compare_local", True, "--engine=beam: also time the local engine.")
_PART = 200_000  # tweets per generated part

STAGES = ("normalize", "tokenize", "pack")


def _one_pass(texts, tok, window, seq_len):
  """Returns ({stage: (cpu seconds, wall seconds)}, real tokens, all positions) of one pass."""
  cpu = dict.fromkeys(STAGES, 0.0)
  wall = dict.fromkeys(STAGES, 0.0)
  real = total = 0
  for i in range(0, len(texts), window):
    stamps = [(time.process_time(), time.perf_counter())]
    norm = normalize.normalize_batch(texts[i:i + window])
    stamps.append((time.process_time(), time.perf_counter()))
    ids = tok.encode_batch(norm)
    stamps.append((time.process_time(), time.perf_counter()))
    rows = packing.pack(ids, seq_len, tok.bos_id, tok.eos_id, tok.pad_id)
    stamps.append((time.process_time(), time.perf_counter()))
    for k, stage in enumerate(STAGES):
      cpu[stage] += stamps[k + 1][0] - stamps[k][0]
      wall[stage] += stamps[k + 1][1] - stamps[k][1]
    real += int(rows["weights"].sum())
    total += rows["weights"].size
  return {s: (cpu[s], wall[s]) for s in STAGES}, real, total


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of the process itself (not its children)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / _TICKS


def _rss_peaks(root_pid: int, peaks: dict[int, tuple[str, int, float]], stop: threading.Event) -> None:
  """Samples VmHWM (peak RSS) and CPU time of `root_pid` and its descendants until `stop`;
  peaks: pid -> (role, KiB, CPU seconds at the last sample)."""
  while not stop.is_set():
    pids, todo = [], [root_pid]
    while todo:
      pid = todo.pop()
      pids.append(pid)
      try:
        for task in os.listdir(f"/proc/{pid}/task"):
          with open(f"/proc/{pid}/task/{task}/children") as f:
            todo += [int(c) for c in f.read().split()]
      except OSError:
        pass
    for pid in pids:
      try:
        with open(f"/proc/{pid}/status") as f:
          hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open(f"/proc/{pid}/cmdline") as f:
          cmd = f.read()
        cpu = _cpu_seconds(pid)
      except (OSError, StopIteration, IndexError, ValueError):
        continue
      is_worker = "sdk_worker_main" in cmd and not cmd.split("\0")[0].endswith("sh")  # not the shell around it
      role = "driver" if pid == root_pid else "worker" if is_worker else "other"
      peaks[pid] = (role, max(hwm, peaks.get(pid, ("", 0, 0.0))[1]), cpu)
    stop.wait(0.1)


def _corpus(n: int) -> str:
  raw = os.path.join(_WORK_DIR.value, f"raw_{n}")
  if not os.path.exists(os.path.join(raw, ".complete")):
    shutil.rmtree(raw, ignore_errors=True)
    for part, start in enumerate(range(0, n, _PART)):  # in parts: generating keeps a part's tweets in memory
      synthetic.generate(os.path.join(raw, f"part{part:03d}"), min(_PART, n - start), seed=part, first_index=start)
    open(os.path.join(raw, ".complete"), "w").close()
  return raw


def _timed_build(raw: str, engine: str, workers: int) -> dict:
  out = os.path.join(_WORK_DIR.value, f"out_{engine}_{workers}")
  cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "build_dataset.py"), f"--input={raw}",
         f"--output={out}", "--overwrite", f"--engine={engine}"]
  if engine == "beam":
    cmd.append(f"--beam_options=--runner=DirectRunner --direct_running_mode=multi_processing "
               f"--direct_num_workers={workers}")
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  peaks: dict[int, tuple[str, int]] = {}
  stop = threading.Event()
  sampler = threading.Thread(target=_rss_peaks, args=(proc.pid, peaks, stop), daemon=True)
  sampler.start()
  stdout, _ = proc.communicate()
  wall = time.perf_counter() - t0
  stop.set()
  sampler.join()
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout[-2000:]}")
  with open(os.path.join(out, "build_stats.json")) as f:
    read = json.load(f)["read"]
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  mib = lambda role: sorted(round(kib / 1024) for r, kib, _ in peaks.values() if r == role)
  driver_cpu = sum(c for r, _, c in peaks.values() if r == "driver")  # as last sampled (every 0.1 s)
  sampled_cpu = sum(c for _, _, c in peaks.values())
  if sampled_cpu > cpu:  # a process the driver did not wait for is missing from RUSAGE_CHILDREN
    cpu = sampled_cpu
  return {"engine": engine, "workers": workers, "read": read, "wall": wall, "cpu": cpu, "driver_cpu": driver_cpu,
          "driver": mib("driver"), "worker": mib("worker"), "out": out}


def _build_digest(out: str) -> tuple[dict, dict]:
  """The counts of a build (build_stats.json without timings and engine) and the sha256 of each shard file."""
  with open(os.path.join(out, "build_stats.json")) as f:
    stats = json.load(f)
  for key in ("seconds", "engine", "cpu_seconds"):
    stats.pop(key, None)
  return stats, writer.shard_digests(out)


def build_benchmark() -> None:
  raw = _corpus(_NUM_TWEETS.value)
  runs = []
  if _ENGINE.value == "beam":
    runs += [("beam", int(w)) for w in _WORKERS.value]
  if _ENGINE.value == "local" or _COMPARE_LOCAL.value:
    runs.append(("local", 1))
  load_before = os.getloadavg()
  results = [_timed_build(raw, engine, workers) for engine, workers in runs]
  load_after = os.getloadavg()
  print(f"build of {_NUM_TWEETS.value:,} synthetic tweets ({results[0]['read']:,} records read) on "
        f"{os.cpu_count()} cores; load average before {'/'.join(f'{x:.1f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.1f}' for x in load_after)}")
  print(f"{'engine':<8}{'workers':>8}{'wall s':>9}{'tweets/s':>10}{'CPU s':>8}{'driver CPU s':>14}"
        f"{'tweets/CPU-s':>14}{'driver MiB':>12}  worker peak MiB")
  for r in results:
    print(f"{r['engine']:<8}{r['workers']:>8}{r['wall']:>9.1f}{r['read'] / r['wall']:>10,.0f}{r['cpu']:>8.1f}"
          f"{r['driver_cpu']:>14.1f}{r['read'] / r['cpu']:>14,.0f}{r['driver'][0]:>12}  {r['worker']}")
  beam = {r["workers"]: r for r in results if r["engine"] == "beam"}
  if 1 in beam and 2 in beam:
    print(f"2 workers / 1 worker: {beam[1]['wall'] / beam[2]['wall']:.2f}x")
  digests = {(r["engine"], r["workers"]): _build_digest(r["out"]) for r in results}
  reference = digests.get(("local", 1))
  for (engine, workers), (stats, files) in digests.items():
    if reference and engine == "beam":
      counts = "identical counts" if stats == reference[0] else "DIFFERENT counts"
      shards = "byte-identical" if files == reference[1] else "DIFFERENT"
      print(f"beam, {workers} worker(s) vs local: {counts}, {len(files)} {shards} shards "
            f"({sum(stats['splits'].values()):,} records kept)")
      if (stats, files) != reference:
        raise SystemExit("the engines disagree")


def main(argv):
  del argv
  if _ENGINE.value:
    build_benchmark()
    return
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  stored = ""
  if _DATASET_DIR.value:
    from tweetjax.data import builder, pipeline  # pylint: disable=g-import-not-at-top
    src = pipeline.TweetSource(_DATASET_DIR.value, "train")
    texts = src.texts(range(min(len(src), _NUM_TWEETS.value)))
    built = builder.stored_normalization(_DATASET_DIR.value)
    stored = ("normalize ran on stored text, which the build normalized with the default options: the loader "
              "skips it" if built == normalize.NormalizeConfig() else "normalize ran on stored text; the loader "
              "runs it too (the build used other options, or did not record them)")
  else:
    tweets, _ = synthetic.make_tweets(_NUM_TWEETS.value, seed=0)
    texts = [t["text"] for t in tweets]
  tok_path = _TOKENIZER.value
  if not tok_path:
    tok_path = tokenizer.train(normalize.normalize_batch(texts[:20_000]),
                               os.path.join(tempfile.mkdtemp(), "bench"), 8000)
  tok = tokenizer.Tokenizer(tok_path)
  load_before = os.getloadavg()
  best = {s: (float("inf"), float("inf")) for s in STAGES}
  for _ in range(max(1, _REPEATS.value)):
    times, real, total = _one_pass(texts, tok, _WINDOW.value, _SEQ_LEN.value)
    best = {s: min(best[s], times[s]) for s in STAGES}
  load_after = os.getloadavg()

  n = len(texts)
  rate = lambda stages, i: n / sum(best[s][i] for s in stages)
  print(f"tweets: {n:,}  vocab: {tok.vocab_size}  seq_len: {_SEQ_LEN.value}  window: {_WINDOW.value}  "
        f"repeats: {_REPEATS.value} (best pass per stage), 1 core")
  print(f"load average (1/5/15 min): before {'/'.join(f'{x:.1f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.1f}' for x in load_after)}  on {os.cpu_count()} cores")
  print(f"{'':34}{'tweets/CPU-s':>14}{'tweets/wall-s':>15}")
  for name, stages in (("normalize", ("normalize",)), ("tokenize", ("tokenize",)), ("pack", ("pack",)),
                       ("normalize + tokenize + pack", STAGES), ("loader: tokenize + pack", ("tokenize", "pack"))):
    print(f"  {name:<32}{rate(stages, 0):>14,.0f}{rate(stages, 1):>15,.0f}")
  if stored:
    print(stored)
  print(f"tokens/tweet: {real / n:.1f} incl. BOS   packing efficiency: {real / total:.4%} (real tokens / positions)")


if __name__ == "__main__":
  app.run(main)
