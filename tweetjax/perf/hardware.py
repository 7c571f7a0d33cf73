"""GPU profiles for the step-time model: peak rates, memory, links, and the fractions of them a training step gets.

Every number carries its source. Peaks are NVIDIA's datasheet figures (dense, no sparsity); link bandwidths are per
GPU and per direction (NVIDIA quotes NVLink as the bidirectional total: 900 GB/s on H100 = 450 GB/s each way).
The bf16 peaks are the ones training MFU is reported against (tweetjax.train.flops.PEAK_FLOPS), so a predicted MFU
and a measured one share their denominator.

The `*_efficiency` fields are the stated, calibrated constants of the model (not fitted per run):
  matmul_efficiency     sustained fraction of the bf16/fp8 peak that large training GEMMs reach. Hopper: 0.71 =
                        the maximum *sustainable* matmul rate measured with all 8 GPUs of an H200 node busy (699 of
                        989 TFLOP/s, "MSMF", stas00/ml-engineering compute/accelerator/benchmarks); H100 SXM is the
                        same GH100 die at the same 700 W. A100: 0.73 = its maximum *achievable* (burst-clock) rate
                        267.9/312 = 0.859 (same source, "MAMF") times Hopper's sustained/burst ratio 699/826 = 0.85
                        (no sustained figure is published for the A100).
  attention_efficiency  fraction of the peak a fused (flash) attention kernel reaches, forward and backward
                        together: ~0.6 for FlashAttention-2 on A100 (Dao 2023: 50-73% forward, less backward) and
                        ~0.5 for cuDNN / FlashAttention-3-class kernels on Hopper (Shah et al. 2024: ~75% forward,
                        ~40-50% backward).
  hbm_efficiency        fraction of the HBM bandwidth that memory-bound elementwise fusions reach (0.8: STREAM-like
                        copies reach ~90%; norms with reductions and odd layouts less).
  nvlink_efficiency     NCCL bus bandwidth over the raw per-direction NVLink rate: nccl-tests on DGX A100 reach
                        ~230-240 of 300 GB/s, on DGX H100 ~360-370 of 450 GB/s (without NVLink SHARP): 0.8.
  nic_efficiency        NCCL bus bandwidth over the NIC line rate across nodes: ~0.9 (InfiniBand NDR/HDR with
                        GPUDirect RDMA reaches ~45 of 50 GB/s per 400 Gb/s port).
  *_latency_s           per-step latency of a ring collective (one hop): ~2 us over NVLink, ~6 us across nodes.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from tweetjax.train.flops import PEAK_FLOPS

GB = 1e9


def _bf16_peak(kind: str) -> float:
  return dict(PEAK_FLOPS)[kind]["bfloat16"]


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  bf16_flops: float  # dense peak FLOP/s per GPU
  fp8_flops: float  # dense peak FLOP/s per GPU (0: no fp8 tensor cores)
  hbm_bytes_per_s: float
  hbm_bytes: float  # capacity per GPU
  gpus_per_node: int  # GPUs joined by NVLink (the NVLink domain)
  nvlink_bytes_per_s: float  # per GPU, one direction
  nic_bytes_per_s: float  # per GPU, one direction, to other nodes
  matmul_efficiency: float
  attention_efficiency: float
  hbm_efficiency: float = 0.8
  nvlink_efficiency: float = 0.8
  nic_efficiency: float = 0.9
  nvlink_latency_s: float = 2e-6
  nic_latency_s: float = 6e-6

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == "name":
        continue
      may_be_zero = field.name == "fp8_flops" or field.name.endswith("_latency_s")
      if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not may_be_zero):
        raise ValueError(f"hardware {self.name!r}: {field.name}={value!r} must be a positive number")
      if field.name.endswith("_efficiency") and value > 1:
        raise ValueError(f"hardware {self.name!r}: {field.name}={value} is a fraction of a peak (0 < x <= 1)")

  def peak_flops(self, fp8: bool = False) -> float:
    if fp8 and not self.fp8_flops:
      raise ValueError(f"hardware {self.name!r} has no fp8 peak (fp8_flops=0)")
    return self.fp8_flops if fp8 else self.bf16_flops


PROFILES: dict[str, Hardware] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989.4 TFLOP/s bf16, 1,979 fp8 dense; 80 GB HBM3 at 3.35 TB/s;
    # NVLink 4 900 GB/s bidirectional. DGX H100: 8 GPUs per node, 8 x ConnectX-7 400 Gb/s (one per GPU).
    "h100": Hardware("h100", bf16_flops=_bf16_peak("H100"), fp8_flops=1978.9e12, hbm_bytes_per_s=3.35e12,
                     hbm_bytes=80 * GB, gpus_per_node=8, nvlink_bytes_per_s=450 * GB, nic_bytes_per_s=50 * GB,
                     matmul_efficiency=0.71, attention_efficiency=0.5),
    # NVIDIA H200 datasheet (SXM): same compute as H100 SXM; 141 GB HBM3e at 4.8 TB/s; NVLink 900 GB/s.
    # DGX H200: 8 GPUs, 8 x 400 Gb/s ConnectX-7.
    "h200": Hardware("h200", bf16_flops=_bf16_peak("H200"), fp8_flops=1978.9e12, hbm_bytes_per_s=4.8e12,
                     hbm_bytes=141 * GB, gpus_per_node=8, nvlink_bytes_per_s=450 * GB, nic_bytes_per_s=50 * GB,
                     matmul_efficiency=0.71, attention_efficiency=0.5),
    # NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s bf16 dense, no fp8; HBM2e 2,039 GB/s; NVLink 3 600 GB/s
    # bidirectional. DGX A100: 8 GPUs, 8 x 200 Gb/s HDR InfiniBand (Selene, the Megatron-LM papers' cluster).
    "a100": Hardware("a100", bf16_flops=_bf16_peak("A100"), fp8_flops=0.0, hbm_bytes_per_s=2.039e12,
                     hbm_bytes=80 * GB, gpus_per_node=8, nvlink_bytes_per_s=300 * GB, nic_bytes_per_s=25 * GB,
                     matmul_efficiency=0.73, attention_efficiency=0.6),
}


def parse_overrides(spec: str) -> dict[str, float]:
  """'nic_bytes_per_s=25e9,gpus_per_node=4' -> {field: value}, naming the item that does not parse."""
  fields = {f.name for f in dataclasses.fields(Hardware)} - {"name"}
  out: dict[str, float] = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in fields:
      raise ValueError(f"hardware override {item!r}: expected field=value with field one of {sorted(fields)}")
    try:
      out[key] = float(value)
    except ValueError:
      raise ValueError(f"hardware override {item!r}: {value!r} is not a number") from None
  return out


def get_profile(name: str, overrides: Mapping[str, float] | str = "") -> Hardware:
  """The profile `name` (h100, h200, a100) with fields replaced by `overrides` (a mapping or 'k=v,...')."""
  key = name.strip().lower().replace(" ", "").replace("_", "").replace("-", "").removesuffix("sxm")
  if key.startswith("a100"):
    key = "a100"
  if key not in PROFILES:
    raise ValueError(f"unknown hardware {name!r}; known profiles: {sorted(PROFILES)} (override fields with "
                     f"--hardware_overrides)")
  if isinstance(overrides, str):
    overrides = parse_overrides(overrides)
  values = dict(overrides)
  if "gpus_per_node" in values:
    values["gpus_per_node"] = int(values["gpus_per_node"])
  return dataclasses.replace(PROFILES[key], **values)


def describe(hw: Hardware) -> str:
  return (f"{hw.name}: {hw.bf16_flops / 1e12:.0f} TFLOP/s bf16 (x{hw.matmul_efficiency:.2f} sustained in matmuls, "
          f"x{hw.attention_efficiency:.2f} in attention), {hw.hbm_bytes_per_s / 1e12:.2f} TB/s HBM, "
          f"{hw.hbm_bytes / GB:.0f} GB, {hw.gpus_per_node} GPUs per node, NVLink {hw.nvlink_bytes_per_s / GB:.0f} "
          f"GB/s, NIC {hw.nic_bytes_per_s / GB:.0f} GB/s per GPU per direction")
