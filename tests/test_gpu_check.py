"""tools/gpu_check.sh parses and rejects bad arguments, and tools/gpu_check_report.py turns whatever the stages left
(including a failed or missing stage) into one JSON whose `ok` is true only when everything passed. The GPU tests
themselves skip here (tests/gpu/conftest.py); running the whole script without a GPU is `gpu_check.sh --cpu`."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")
sys.path.insert(0, os.path.join(REPO, "tools"))
import gpu_check_report  # pylint: disable=g-import-not-at-top,wrong-import-position

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.gpu.test_gpu" name="test_a" time="1.5"/>
<testcase classname="tests.gpu.test_gpu" name="test_b" time="0.1"><failure message="assert 1 == 2">trace</failure>
</testcase>
<testcase classname="tests.gpu.test_gpu" name="test_c" time="0"><skipped message="no GPU visible"/></testcase>
</testsuite></testsuites>"""


def test_script_parses_and_rejects_unknown_arguments():
  subprocess.run(["bash", "-n", SCRIPT], check=True)
  proc = subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True, text=True)
  assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
  usage = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
  assert "--cpu" in usage and "--no-install" in usage


def test_bench_defines_the_flags_the_script_passes():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench.py"), "--helpfull"], capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  usage, script = proc.stdout + proc.stderr, open(SCRIPT).read()
  for flag in ("gpu", "gpu_allow_cpu", "gpu_config", "gpu_attention", "gpu_rows_per_device", "steps", "json_out"):
    assert f"--{flag}" in script, flag
    assert f"--{flag}:" in usage or f"--[no]{flag}:" in usage, flag


def _stage(work, name, status, rc=0, text=""):
  log = os.path.join(work, f"{name}.log")
  with open(log, "w") as f:
    f.write(text)
  with open(os.path.join(work, "stages.jsonl"), "a") as f:
    f.write(json.dumps({"name": name, "status": status, "rc": rc, "seconds": 1.0, "log": log}) + "\n")


def test_report_collects_stages_tests_and_bench(tmp_path):
  work, out = str(tmp_path), str(tmp_path / "report.json")
  _stage(work, "host", "ok", text="NVIDIA H100 80GB HBM3, 81559 MiB\n")
  _stage(work, "tests", "failed", rc=1, text="x" * 10_000 + "1 failed")
  with open(os.path.join(work, "tests.xml"), "w") as f:
    f.write(JUNIT)
  with open(os.path.join(work, "bench.json"), "w") as f:
    json.dump({"gpu": {"device_kind": "NVIDIA H100 80GB HBM3", "best_tokens_per_s": 1e5, "mfu_best": 0.5}}, f)
  assert gpu_check_report.main([f"--work={work}", f"--out={out}", "--mode=gpu"]) == 1
  report = json.load(open(out))
  assert not report["ok"] and report["failed_stages"] == ["tests"]
  assert report["failed_tests"] == ["tests.gpu.test_gpu::test_b"]
  assert report["tests"]["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
  assert report["host"].startswith("NVIDIA H100")
  tests_stage = report["stages"][1]
  assert tests_stage["log_tail"].endswith("1 failed") and len(tests_stage["log_tail"]) == 4000
  assert report["bench"]["summary"] == {"device_kind": "NVIDIA H100 80GB HBM3", "best_tokens_per_s": 1e5,
                                        "mfu_best": 0.5}


def test_report_of_a_run_that_died_early_is_not_ok(tmp_path):
  work, out = str(tmp_path), str(tmp_path / "report.json")
  _stage(work, "host", "ok")
  _stage(work, "install", "timed_out", rc=124)
  assert gpu_check_report.main([f"--work={work}", f"--out={out}"]) == 1
  report = json.load(open(out))
  assert report["failed_stages"] == ["install"]
  assert report["tests"]["status"] == "missing" and report["bench"]["status"] == "missing"
  os.remove(os.path.join(work, "stages.jsonl"))
  _stage(work, "host", "ok")
  assert gpu_check_report.main([f"--work={work}", f"--out={out}", "--mode=cpu"]) == 0


def test_gpu_mode_with_every_test_skipped_is_not_ok(tmp_path):
  work, out = str(tmp_path), str(tmp_path / "report.json")
  _stage(work, "tests", "ok")
  with open(os.path.join(work, "tests.xml"), "w") as f:
    f.write('<testsuite><testcase classname="t" name="a"><skipped message="no GPU"/></testcase></testsuite>')
  assert gpu_check_report.main([f"--work={work}", f"--out={out}", "--mode=cpu"]) == 0  # --cpu: skipping is right
  assert gpu_check_report.main([f"--work={work}", f"--out={out}", "--mode=gpu"]) == 1
  assert "every GPU test skipped" in json.load(open(out))["failed_stages"][0]
