"""Sweeps: expansion and golden names, config args, launch scripts, and a real 5-point sweep of subprocess runs
that is killed and resumed (finished points are not rerun, a failing point is reported, the others finish)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tweetjax import config_args
from tweetjax.sweep import emit, report, runner, spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_TOOL = os.path.join(REPO, "tools", "sweep.py")


# --- expansion and names -------------------------------------------------------------------------------------------

def test_product_zip_chain_expand_in_order():
  points = spec.product({"optimizer.learning_rate": [1e-3, 3e-3]},
                        spec.zip_({"model.d_model": [64, 128], "model.num_layers": [2, 4]}))
  assert points == [
      {"optimizer.learning_rate": 1e-3, "model.d_model": 64, "model.num_layers": 2},
      {"optimizer.learning_rate": 1e-3, "model.d_model": 128, "model.num_layers": 4},
      {"optimizer.learning_rate": 3e-3, "model.d_model": 64, "model.num_layers": 2},
      {"optimizer.learning_rate": 3e-3, "model.d_model": 128, "model.num_layers": 4},
  ]
  assert len(spec.product({"a": [1, 2, 3], "b": [4, 5]})) == 6
  assert spec.chain({"a": [1]}, [{"b": 2}, {"b": 3}]) == [{"a": 1}, {"b": 2}, {"b": 3}]
  with pytest.raises(ValueError, match="different lengths"):
    spec.zip_({"a": [1, 2]}, {"b": [1, 2, 3]})
  with pytest.raises(ValueError, match="same key"):
    spec.product({"a": [1]}, {"a": [2]})
  with pytest.raises(TypeError, match="list of values"):
    spec.axis("a", 3)


GOLDEN_NAMES = [
    ({"optimizer.learning_rate": 3e-4, "model.d_model": 64}, "d_model=64_learning_rate=0.0003"),
    ({"model.d_model": 64, "optimizer.learning_rate": 0.0003}, "d_model=64_learning_rate=0.0003"),  # key order
    ({"optimizer.learning_rate": 1e-5, "train.steps": 100}, "learning_rate=1e-05_steps=100"),
    ({"model.tie_embeddings": True, "mesh.data": -1}, "data=-1_tie_embeddings=true"),
    ({"mesh.data": 2, "model.data": 3}, "mesh.data=2_model.data=3"),  # ambiguous short keys stay dotted
    ({"model.dtype": "bfloat16"}, "dtype=bfloat16"),
    ({"data.tokenizer_path": "/a/b c.model"}, "tokenizer_path=-a-b-c.model-b2534d12"),  # sanitised: hash added
    ({}, "default"),
]


@pytest.mark.parametrize("overrides,name", GOLDEN_NAMES)
def test_golden_point_names(overrides, name):
  assert spec.point_name(overrides) == name


def test_long_names_are_shortened_with_a_hash_and_stay_distinct():
  a = {f"model.key_number_{i}": 10 ** 9 + i for i in range(8)}
  b = dict(a, **{"model.key_number_7": 0})
  assert len(spec.point_name(a)) <= spec.MAX_NAME_LEN
  assert spec.point_name(a) != spec.point_name(b)
  assert spec.point_name({"a.x": 1}) != spec.point_name({"a.x": 1.0})  # int vs float are different configs
  with pytest.raises(ValueError, match="same overrides"):
    spec.name_points([{"a.x": 1}, {"a.x": 1}])


def test_names_are_stable_across_processes():
  code = ("from tweetjax.sweep import spec; import sys; "
          "print(repr([spec.point_name(o) for o in eval(sys.argv[1])]))")
  overrides = [o for o, _ in GOLDEN_NAMES] + [{"a.x": 0.1 + 0.2, "b.y": (1, 2)}]
  outputs = {subprocess.run([sys.executable, "-c", code, repr(overrides)], capture_output=True, text=True, check=True,
                            env=dict(os.environ, PYTHONHASHSEED=seed)).stdout for seed in ("1", "2")}
  assert outputs == {repr([spec.point_name(o) for o in overrides]) + "\n"}


# --- config args and overrides -------------------------------------------------------------------------------------

def test_parse_arg_types_bare_flags_and_errors():
  arg = config_args.parse_arg("size=3,steps=(10,20),quick,name='a,b',lr=1e-3", size=0, steps=(1,), quick=False,
                              name="", lr=0.1)
  assert (arg.size, arg.steps, arg.quick, arg.name, arg.lr) == (3, (10, 20), True, "a,b", 1e-3)
  assert config_args.parse_arg(None, size=2).size == 2
  with pytest.raises(ValueError, match="unknown key 'sise'"):
    config_args.parse_arg("sise=3", size=0)
  with pytest.raises(ValueError, match="size='x' is not a valid int"):
    config_args.parse_arg("size=x", size=0)
  assert config_args.parse_arg("extra=[1, 2]", lazy=True).extra == [1, 2]


def test_apply_overrides_names_bad_keys_and_types():
  base = spec.load_config(os.path.join(REPO, "experiments", "tiny.py"))
  config = spec.apply_overrides(base, {"model.d_model": 128, "optimizer.learning_rate": 1e-2})
  assert (config.model.d_model, config.optimizer.learning_rate, base.model.d_model) == (128, 1e-2, 64)
  with pytest.raises(KeyError, match="no key 'model.num_layer'"):
    spec.apply_overrides(base, {"model.num_layer": 4})
  with pytest.raises(KeyError, match="no section 'modle'"):
    spec.apply_overrides(base, {"modle.d_model": 4})
  with pytest.raises(TypeError, match="model.d_model"):
    spec.apply_overrides(base, {"model.d_model": "wide"})


def test_plan_and_device_env(tmp_path):
  points = runner.plan(os.path.join(REPO, "experiments", "tiny.py"), str(tmp_path))
  assert [p.name for p in points] == [
      "d_model=64_mlp_dim=256_learning_rate=0.001_steps=50", "d_model=128_mlp_dim=512_learning_rate=0.001_steps=50",
      "d_model=64_mlp_dim=256_learning_rate=0.003_steps=50", "d_model=128_mlp_dim=512_learning_rate=0.003_steps=50"]
  assert all(p.devices == 8 and p.total_steps == 50 for p in points)  # tiny's mesh is data=2, fsdp=2, tensor=2
  env = runner.point_env(points[0], "cpu", base_env={"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=3"})
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=8"
  assert runner.point_env(points[0], "gpu", gpu_ids=[2, 3], base_env={})["CUDA_VISIBLE_DEVICES"] == "2,3"
  assert runner.mesh_device_count({"data": -1, "tensor": 2}, fill=4) == 8


def test_read_metrics_merges_rows_of_a_step_and_skips_a_torn_row(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 2, "eval_loss": 2.6}\n'
                  '{"step": 2, "loss": 2.4}\n{"step": 3, "lo')
  assert runner.read_metrics(str(path)) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.4, "eval_loss": 2.6}]


def test_report_groups_keys_that_move_together():
  points = spec.product(spec.zip_({"model.d_model": [32, 64, 128], "model.num_layers": [1, 2, 2]}),
                        spec.zip_({"train.steps": [100, 200], "optimizer.warmup_steps": [10, 20]}),
                        {"optimizer.learning_rate": [1e-3, 3e-3]}, {"seed": [0]})
  results = [report.PointResult(runner.Point(name, overrides, "", None), "done", [])
             for name, overrides in spec.name_points(points)]
  assert report.swept_groups(results) == [["model.d_model", "model.num_layers"],
                                          ["train.steps", "optimizer.warmup_steps"], ["optimizer.learning_rate"]]


def test_emitted_scripts_have_one_line_per_point_and_parse(tmp_path):
  config = os.path.join(REPO, "experiments", "tiny.py")
  points = runner.plan(config, str(tmp_path))
  slurm = emit.write_launch_script("slurm", config, str(tmp_path), points, "gpu", parallel=2)
  shell = emit.write_launch_script("shell", config, str(tmp_path), points, "cpu", parallel=2)
  slurm_text, shell_text = open(slurm).read(), open(shell).read()
  assert "#SBATCH --array=0-3%2" in slurm_text and "#SBATCH --gpus-per-task=8" in slurm_text
  for point in points:
    assert sum(f"--point={point.name}" in line for line in slurm_text.splitlines()) == 1
    assert sum(line.startswith("launch ") and f"--point={point.name}" in line for line in shell_text.splitlines()) == 1
  for script in (slurm, shell):
    subprocess.run(["bash", "-n", script], check=True)
  # The array entries expand to runnable commands: print task 1's command (as eval sees it) instead of running it.
  out = subprocess.run(["bash", "-c", slurm_text.replace('eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
                                                         'eval "echo ${COMMANDS[$SLURM_ARRAY_TASK_ID]}"')],
                       env=dict(os.environ, SLURM_ARRAY_TASK_ID="1", PYTHON="py"), capture_output=True, text=True,
                       check=True).stdout
  assert out.startswith(f"py {SWEEP_TOOL} --config={config} ") and f"--point={points[1].name}" in out


# --- a real sweep: run, kill, resume, fail, report -----------------------------------------------------------------

SWEEP_CONFIG = """
from tweetjax.sweep import chain, product
import importlib.util
_spec = importlib.util.spec_from_file_location("tiny", {tiny!r})
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)

def get_config(arg=None):
  config = _tiny.get_config(arg)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.data.update(seq_len=32, global_batch_size=8)
  config.train.update(steps=5, log_every=1)
  config.optimizer.warmup_steps = 2
  config.train.update(tensorboard=False, peak_flops_per_device=1e9)  # no event files, no CPU matmul benchmark
  return config

def sweep():
  # 4 good points (two on a 2-device mesh), then one that fails inside the subprocess (num_heads=6 is not a
  # multiple of num_kv_heads=4). The seed does not change the compiled step: points share the compilation cache.
  return chain(product({{"seed": [0, 1]}}, {{"mesh.data": [1, 2]}}), [{{"model.num_heads": 6}}])
"""
GOOD = ["data=1_seed=0", "data=2_seed=0", "data=1_seed=1", "data=2_seed=1"]
BAD = "num_heads=6"


def _sweep_cmd(config, workdir, *extra):
  return [sys.executable, SWEEP_TOOL, f"--config={config}", f"--workdir={workdir}", "--parallel=2", *extra]


def _events(workdir):
  with open(os.path.join(workdir, runner.EVENTS)) as f:
    return [json.loads(line) for line in f]


def _max_concurrency(events):
  running, most = set(), 0
  for event in events:
    if event["event"] == "start":
      running.add(event["point"])
    elif event["event"] in ("done", "failed"):
      running.discard(event["point"])
    most = max(most, len(running))
  return most


@pytest.fixture(scope="module")
def killed_and_resumed_sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  config = str(root / "sweep_config.py")
  with open(config, "w") as f:
    f.write(SWEEP_CONFIG.format(tiny=os.path.join(REPO, "experiments", "tiny.py")))
  workdir = str(root / "work")
  # First invocation: killed (runner and its training subprocesses, like a lost node) once a point has finished.
  first = subprocess.Popen(_sweep_cmd(config, workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True, cwd=REPO)
  deadline = time.time() + 600
  while not any(os.path.exists(os.path.join(workdir, name, runner.DONE)) for name in GOOD):
    assert first.poll() is None and time.time() < deadline, "first sweep invocation ended before any point finished"
    time.sleep(0.1)
  os.killpg(first.pid, signal.SIGKILL)
  first.wait()
  time.sleep(1.0)  # lets PR_SET_PDEATHSIG'd children exit
  done_after_kill = {name for name in GOOD if os.path.exists(os.path.join(workdir, name, runner.DONE))}
  second = subprocess.run(_sweep_cmd(config, workdir), capture_output=True, text=True, cwd=REPO, timeout=900)
  return {"config": config, "workdir": workdir, "done_after_kill": done_after_kill, "second": second}


@pytest.mark.slow
def test_resumed_sweep_reruns_only_unfinished_points(killed_and_resumed_sweep):
  run = killed_and_resumed_sweep
  events = _events(run["workdir"])
  first_id, second_id = events[0]["invocation"], events[-1]["invocation"]
  assert first_id != second_id
  assert run["done_after_kill"] and run["done_after_kill"] != set(GOOD)  # the kill left work to resume
  started_second = {e["point"] for e in events if e["invocation"] == second_id and e["event"] == "start"}
  assert started_second == (set(GOOD) - run["done_after_kill"]) | {BAD}
  skipped_second = {e["point"] for e in events if e["invocation"] == second_id and e["event"] == "skip"}
  assert skipped_second == run["done_after_kill"]
  # The data=2 points only build their mesh (and finish) when the runner gave them 2 devices, the others 1.
  for name in GOOD:
    with open(os.path.join(run["workdir"], name, runner.DONE)) as f:
      done = json.load(f)
    assert done["final_step"] == 5 and done["returncode"] == 0
  # Two at a time: the first invocation started two points before either finished, and never more than two.
  first_events = [e for e in events if e["invocation"] == first_id]
  assert [e["event"] for e in first_events[:2]] == ["start", "start"]
  assert _max_concurrency(first_events) == 2 and _max_concurrency(events) <= 2


@pytest.mark.slow
def test_failing_point_is_reported_and_the_others_finish(killed_and_resumed_sweep):
  run = killed_and_resumed_sweep
  second = run["second"]
  assert second.returncode == 1, second.stdout + second.stderr
  assert f"FAILED {BAD}" in second.stdout and "num_kv_heads" in second.stdout
  with open(os.path.join(run["workdir"], BAD, runner.FAILED)) as f:
    failed = json.load(f)
  assert failed["returncode"] != 0 and "num_heads=6 is not a multiple of" in failed["error"]
  assert all(os.path.exists(os.path.join(run["workdir"], name, runner.DONE)) for name in GOOD)
  assert "4/5 points done" in second.stdout


@pytest.mark.slow
def test_report_has_one_row_per_point_and_plots(killed_and_resumed_sweep, tmp_path):
  run = killed_and_resumed_sweep
  points = runner.plan(run["config"], run["workdir"])
  out_dir = str(tmp_path / "report")
  text = report.write_report(points, out_dir)
  table_rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| point")]
  assert len(table_rows) == 5
  with open(os.path.join(out_dir, "results.csv")) as f:
    rows = f.read().strip().splitlines()
  assert len(rows) == 1 + 5
  header = rows[0].split(",")
  by_name = {row.split(",")[0]: dict(zip(header, row.split(","))) for row in rows[1:]}
  assert {name: by_name[name]["status"] for name in by_name} == {**{n: "done" for n in GOOD}, BAD: "failed"}
  for name in GOOD:
    metrics = runner.read_metrics(os.path.join(run["workdir"], name, "metrics.jsonl"))
    assert float(by_name[name]["final_loss"]) == pytest.approx(metrics[-1]["loss"], rel=1e-6)
    assert float(by_name[name]["best_loss"]) == pytest.approx(min(r["loss"] for r in metrics), rel=1e-6)
    assert int(by_name[name]["tokens"]) == 5 * 8 * 32
  assert "no scaling-law fit" in text  # the model size does not vary
  for png in ("loss_curves.png", "final_loss_vs_seed.png", "final_loss_vs_mesh.data.png", "loss_vs_compute.png"):
    assert os.path.getsize(os.path.join(out_dir, png)) > 1000, png


def test_dry_run_lists_points_without_running(tmp_path):
  out = subprocess.run([sys.executable, SWEEP_TOOL, f"--config={os.path.join(REPO, 'experiments', 'tiny.py')}",
                        f"--workdir={tmp_path}", "--dry_run"], capture_output=True, text=True, check=True).stdout
  assert "4 points" in out and out.count("[pending]") == 4
  assert "--xla_force_host_platform_device_count=8" in out and "--config.model.d_model=128" in out
  assert not any(os.path.isdir(os.path.join(tmp_path, name)) for name in os.listdir(tmp_path))
