"""The host CPU: model name, instruction-set extensions, and the machine kind that picks CPU defaults.

Read from /proc/cpuinfo (Linux; elsewhere the ISA is empty and every choice falls back to the portable default),
without starting JAX, so tweetjax/perf/env.py can choose XLA:CPU flags before the backend exists. The kinds, fastest
bf16 matmul path first:

  amx          AMX tiles (amx_bf16; Sapphire Rapids and later Xeons): bf16 x bf16 -> fp32 dots on the tile unit
  avx512_bf16  AVX512-BF16 dot products without AMX (Cooper Lake, Zen 4/5)
  avx512       AVX-512 without bf16 arithmetic
  avx2         AVX2 + FMA
  baseline     anything else (or not Linux)

TWEETJAX_CPU_KIND=<kind> overrides the detection (e.g. to reproduce another machine's defaults).
"""

from __future__ import annotations

import dataclasses
import functools
import os

KINDS = ("amx", "avx512_bf16", "avx512", "avx2", "baseline")
_ISA_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
  model: str
  cores: int
  isa: tuple[str, ...]  # the vector/matrix extensions among /proc/cpuinfo's flags, sorted

  @property
  def kind(self) -> str:
    return machine_kind(self.isa)

  def describe(self) -> str:
    return f"{self.model or 'unknown CPU'}, {self.cores} cores, kind {self.kind}, ISA {' '.join(self.isa) or '?'}"

  def as_dict(self) -> dict:
    return {"model": self.model, "cores": self.cores, "kind": self.kind, "isa": list(self.isa)}


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
  """(model name, sorted ISA extensions) from /proc/cpuinfo text (first processor's entries)."""
  model, flags = "", set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and not model:
      model = value.strip()
    elif key == "flags" and not flags:
      flags = set(value.split())
  return model, tuple(sorted(f for f in flags if f.startswith(_ISA_PREFIXES)))


def machine_kind(isa) -> str:
  override = os.environ.get("TWEETJAX_CPU_KIND", "")
  if override:
    if override not in KINDS:
      raise ValueError(f"TWEETJAX_CPU_KIND={override!r}: expected one of {KINDS}")
    return override
  isa = set(isa)
  if {"amx_bf16", "amx_tile"} <= isa:
    return "amx"
  if "avx512_bf16" in isa:
    return "avx512_bf16"
  if "avx512f" in isa:
    return "avx512"
  if {"avx2", "fma"} <= isa:
    return "avx2"
  return "baseline"


@functools.lru_cache(maxsize=1)
def cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
  try:
    with open(path) as f:
      model, isa = parse_cpuinfo(f.read())
  except OSError:
    model, isa = "", ()
  return CpuInfo(model=model, cores=os.cpu_count() or 1, isa=isa)


def has_bf16_dot_units() -> bool:
  """True where a bf16 x bf16 -> fp32 dot runs on bf16 hardware (AMX or AVX512-BF16), not emulated in fp32."""
  return cpu_info().kind in ("amx", "avx512_bf16")
