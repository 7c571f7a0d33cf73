"""Writes tools/gpu_check.sh's one JSON from what its stages left in the work directory. Standard library only, so
it runs even when the venv stage failed.

  python tools/gpu_check_report.py --work=DIR --out=gpu_check.json --mode=gpu --started=... --repo=...

Reads DIR/stages.jsonl (one line per stage: name, status, rc, seconds, log), DIR/tests.xml (pytest's JUnit XML)
and DIR/bench.json (tools/bench.py --json_out). Missing or unreadable pieces are recorded as such, never fatal.
Exit status 0 when every stage is "ok" and no test failed, else 1. In GPU mode a run whose GPU tests all skipped
(JAX saw no GPU) is not ok either: nothing was checked on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import xml.etree.ElementTree as ET

LOG_TAIL_CHARS = 4000


def read_stages(path: str) -> list[dict]:
  stages = []
  try:
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line:
          try:
            stages.append(json.loads(line))
          except ValueError:
            stages.append({"name": "?", "status": "unreadable", "line": line})
  except OSError as e:
    stages.append({"name": "stages", "status": "missing", "error": str(e)})
  for stage in stages:
    log = stage.get("log")
    if log and stage.get("status") != "ok":
      stage["log_tail"] = tail(log)
  return stages


def tail(path: str, chars: int = LOG_TAIL_CHARS) -> str:
  try:
    with open(path, errors="replace") as f:
      text = f.read()
  except OSError as e:
    return f"(no log: {e})"
  return text[-chars:]


def read_junit(path: str) -> dict:
  """Per-test outcome (passed / failed / error / skipped, with the message) from pytest's JUnit XML."""
  if not os.path.exists(path):
    return {"status": "missing", "path": path}
  try:
    root = ET.parse(path).getroot()
  except ET.ParseError as e:
    return {"status": "unreadable", "error": str(e)}
  tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
  for case in root.iter("testcase"):
    outcome, message = "passed", ""
    for child in case:
      if child.tag in ("failure", "error", "skipped"):
        outcome = {"failure": "failed"}.get(child.tag, child.tag)
        message = (child.get("message") or child.text or "")[:2000]
    counts[outcome] += 1
    tests.append({"name": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                  "seconds": float(case.get("time", 0) or 0), "message": message})
  return {"status": "read", "counts": counts, "tests": tests}


def read_bench(path: str) -> dict:
  if not os.path.exists(path):
    return {"status": "missing", "path": path}
  try:
    with open(path) as f:
      bench = json.load(f)
  except (OSError, ValueError) as e:
    return {"status": "unreadable", "error": str(e)}
  gpu = bench.get("gpu", {})
  summary = {k: gpu.get(k) for k in ("device_kind", "devices", "tokens_per_step", "best_s", "median_s",
                                     "best_tokens_per_s", "mfu_best", "peak_per_device") if k in gpu}
  return {"status": "read", "summary": summary, "full": bench}


def build_report(work: str, mode: str, started: str, repo: str) -> dict:
  stages = read_stages(os.path.join(work, "stages.jsonl"))
  tests = read_junit(os.path.join(work, "tests.xml"))
  bench = read_bench(os.path.join(work, "bench.json"))
  failed_stages = [s["name"] for s in stages if s.get("status") != "ok"]
  failed_tests = [t["name"] for t in tests.get("tests", []) if t["outcome"] in ("failed", "error")]
  counts = tests.get("counts", {})
  if mode == "gpu" and counts.get("skipped") and not counts.get("passed"):
    failed_stages.append("tests: every GPU test skipped (no GPU visible to JAX)")
  host = next((s for s in stages if s.get("name") == "host"), None)
  return {
      "ok": not failed_stages and not failed_tests,
      "mode": mode,
      "started": started,
      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "repo": repo,
      "host": tail(host["log"], 2000).strip() if host and host.get("log") else None,
      "failed_stages": failed_stages,
      "failed_tests": failed_tests,
      "stages": stages,
      "tests": tests,
      "bench": bench,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--mode", default="gpu")
  parser.add_argument("--started", default="")
  parser.add_argument("--repo", default="")
  args = parser.parse_args(argv)
  report = build_report(args.work, args.mode, args.started, args.repo)
  tmp = f"{args.out}.tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1)
  os.replace(tmp, args.out)  # never a half-written result file
  counts = report["tests"].get("counts", {})
  print(f"gpu_check: {'OK' if report['ok'] else 'FAILED'}; stages failed: {report['failed_stages'] or 'none'}; "
        f"tests {counts}; bench {report['bench'].get('summary') or report['bench'].get('status')}")
  return 0 if report["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
