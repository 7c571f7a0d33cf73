"""tools/bench.py --variant: XLA flags, config overrides and process environment variables are told apart, and a
token that is none of them is an error naming it. Run in a subprocess: importing the tool defines its absl flags."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PARSE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench_tool", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
out = []
for text in sys.argv[2:]:
  try:
    out.append(list(bench.parse_variant(text)))
  except Exception as e:  # absl's UsageError
    out.append({"error": str(e)})
print(json.dumps(out))
"""


def _parse(*variants):
  proc = subprocess.run([sys.executable, "-c", _PARSE, os.path.join(REPO, "tools", "bench.py"), *variants],
                        capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_variant_settings_are_flags_overrides_or_environment():
  thp, base, bad, unnamed = _parse(
      "thp:GLIBC_TUNABLES=glibc.malloc.hugetlb=1 --xla_cpu_enable_fast_math=true model.dtype=bfloat16",
      "base:", "x:model.dtype", ":--xla_foo=1")
  assert thp == ["thp", ["--xla_cpu_enable_fast_math=true"], {"model.dtype": "bfloat16"},
                 {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}]
  assert base == ["base", [], {}, {}]
  assert "'model.dtype' is neither" in bad["error"]
  assert "expected NAME:SETTINGS" in unnamed["error"]
