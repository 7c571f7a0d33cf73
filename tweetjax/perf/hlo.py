"""Reading HLO text: collectives and their bytes, matmul FLOPs and dtypes, weighted by how often each runs.

XLA's own cost analysis counts a while-loop body once, so a scanned 80-layer model looks 80x cheaper than it is.
Here every computation gets a multiplicity: ENTRY runs once, a while body runs `known_trip_count` times its caller
(the optimized HLO carries the count in the while's backend_config), fusions and calls run as often as their
caller. Each instruction's cost is then multiplied by its computation's multiplicity.

Works on optimized HLO (`compiled.as_text()`: what runs, after SPMD partitioning, per device) and on the
unoptimized module (`lowered.as_text(dialect="hlo")`: what the program asked for, before the backend rewrites
dtypes; loops there have no known trip count and count once).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable

import numpy as np

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0,
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_SHAPE_RE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\((.*)\)\s*->\s*(.*))?\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLEE_RE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_IOTA_GROUPS_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_LIST_GROUPS_RE = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_MESH_GROUPS_RE = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_PARAM_RE = re.compile(r"([\w.\-]+):\s*(\(?[a-z0-9]+\[[\d,]*\])")


@dataclasses.dataclass(frozen=True)
class Shape:
  dtype: str
  dims: tuple[int, ...]

  @property
  def size(self) -> int:
    return math.prod(self.dims)

  @property
  def bytes(self) -> float:
    return self.size * DTYPE_BYTES[self.dtype]

  def __str__(self) -> str:
    return f"{self.dtype}[{','.join(map(str, self.dims))}]"


def parse_shapes(text: str) -> list[Shape]:
  """Every array shape in a type string (a tuple type gives several)."""
  return [Shape(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE_RE.findall(text)]


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  shapes: list[Shape]  # of the result (several for a tuple)
  operands: list[str]
  attrs: str  # everything after the operand list
  computation: str


@dataclasses.dataclass
class Module:
  computations: dict[str, list[Instruction]]
  entry: str
  multiplicity: dict[str, float]
  unknown_trip_counts: int  # while loops without a known trip count (counted once)
  symbols: dict[tuple[str, str], list[Shape]]  # (computation, value name) -> shapes

  def instructions(self, opcodes: Iterable[str] | None = None):
    wanted = set(opcodes) if opcodes is not None else None
    for comp, instrs in self.computations.items():
      for instr in instrs:
        if wanted is None or instr.opcode in wanted:
          yield instr, self.multiplicity.get(comp, 0.0)


def _split_operands(rest: str) -> tuple[list[str], str]:
  depth, i = 1, 0
  while i < len(rest) and depth:
    depth += {"(": 1, ")": -1}.get(rest[i], 0)
    i += 1
  inner, attrs = rest[:i - 1], rest[i:]
  names = [tok.strip().split()[-1].lstrip("%") for tok in inner.split(",") if tok.strip()]
  return names, attrs


def parse_module(text: str) -> Module:
  computations: dict[str, list[Instruction]] = {}
  symbols: dict[tuple[str, str], list[Shape]] = {}
  entry, current = "", None
  for line in text.splitlines():
    header = _HEADER_RE.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      for name, typ in _PARAM_RE.findall(header.group(3) or ""):
        symbols[(current, name)] = parse_shapes(typ)
      continue
    if current is None or line.startswith("}"):
      continue
    m = _INSTR_RE.match(line)
    if not m:
      continue
    name, typ, opcode, rest = m.groups()
    operands, attrs = _split_operands(rest)
    instr = Instruction(name, opcode, parse_shapes(typ), operands, attrs, current)
    computations[current].append(instr)
    symbols[(current, name)] = instr.shapes
  if not entry:
    raise ValueError("HLO text has no ENTRY computation")
  multiplicity, unknown = _multiplicities(computations, entry)
  return Module(computations, entry, multiplicity, unknown, symbols)


def _multiplicities(computations: dict[str, list[Instruction]], entry: str) -> tuple[dict[str, float], int]:
  calls: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
  unknown = 0
  for comp, instrs in computations.items():
    for instr in instrs:
      trip = 1.0
      if instr.opcode == "while":
        found = _TRIP_RE.search(instr.attrs)
        if found:
          trip = float(found.group(1))
        else:
          unknown += 1
      for kind, callee in _CALLEE_RE.findall(instr.attrs):
        if kind == "to_apply" and instr.opcode not in ("call", "map"):
          continue  # reduction bodies: scalar combiners, no matmuls or collectives
        calls[comp].append((callee, trip if kind in ("body", "condition") else 1.0))
      for group in _BRANCHES_RE.findall(instr.attrs):
        for callee in group.split(","):
          calls[comp].append((callee.strip().lstrip("%"), 1.0))
  multiplicity: dict[str, float] = collections.defaultdict(float)

  def visit(comp: str, times: float, depth: int = 0) -> None:
    if depth > 64:
      raise ValueError(f"HLO call graph deeper than 64 at {comp}")
    multiplicity[comp] += times
    for callee, factor in calls.get(comp, ()):
      if callee in computations:
        visit(callee, times * factor, depth + 1)

  visit(entry, 1.0)
  return dict(multiplicity), unknown


def group_size(attrs: str, default: int = 1) -> int:
  """Participants per replica group of a collective, from any of XLA's replica_groups spellings."""
  m = _MESH_GROUPS_RE.search(attrs)
  if m:
    sizes = dict((k.strip().strip("'"), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
    axes = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
    return math.prod(sizes[a] for a in axes)
  m = _IOTA_GROUPS_RE.search(attrs)
  if m:
    return int(m.group(2))
  m = _LIST_GROUPS_RE.search(attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  return default


def _iota(dims: list[int], perm: list[int] | None) -> "np.ndarray":
  ids = np.arange(math.prod(dims)).reshape(dims)
  return ids.transpose(perm) if perm else ids


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


_IOTA_FULL_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_DEVICE_IDS_RE = re.compile(r"device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\)")


def first_replica_group(attrs: str, num_devices: int) -> list[int]:
  """Device positions (in the mesh's flattened device order) of the replica group that holds device 0.

  Reads XLA's three spellings: iota `[G,S]<=[dims]T(perm)`, explicit `{{0,2},{1,3}}` (an empty `{}` is one group
  of all devices), and mesh-based `mesh['a'=2,'b'=4], device_ids=([4,2]T(1,0)) {'b'}`.
  """
  m = _MESH_GROUPS_RE.search(attrs)
  if m:
    items = [kv.split("=") for kv in m.group(1).split(",")]
    names = [k.strip().strip("'") for k, _ in items]
    sizes = [int(v) for _, v in items]
    ids_m = _DEVICE_IDS_RE.search(attrs)
    ids = (_iota(_ints(ids_m.group(1)), _ints(ids_m.group(2)) if ids_m.group(2) else None).reshape(sizes)
           if ids_m else np.arange(math.prod(sizes)).reshape(sizes))
    grouped = {a.strip().strip("'") for a in m.group(2).split(",") if a.strip()}
    index = tuple(slice(None) if n in grouped else 0 for n in names)
    return sorted(int(x) for x in np.asarray(ids[index]).reshape(-1))
  m = _IOTA_FULL_RE.search(attrs)
  if m:
    groups = _iota(_ints(m.group(3)), _ints(m.group(4)) if m.group(4) else None).reshape(int(m.group(1)),
                                                                                          int(m.group(2)))
    for row in groups:
      if 0 in row:
        return sorted(int(x) for x in row)
  m = re.search(r"replica_groups=\{(.*?)\}(?:,|$)", attrs)
  if m:
    for group in re.findall(r"\{([\d,]*)\}", m.group(0)[len("replica_groups="):]):
      members = _ints(group)
      if 0 in members:
        return sorted(members)
    if not re.findall(r"\{([\d,]*)\}", m.group(0)[len("replica_groups="):]):
      return list(range(num_devices))  # replica_groups={}: one group of every device
  return list(range(num_devices))


def group_axes(members: list[int], mesh_shape: dict[str, int]) -> tuple[str, ...]:
  """Mesh axes along which the members (flattened positions in a mesh of `mesh_shape`, axes in order) differ."""
  names, sizes = list(mesh_shape), list(mesh_shape.values())
  coords = np.array(np.unravel_index(np.asarray(members), sizes)).T
  return tuple(n for i, n in enumerate(names) if len(set(coords[:, i])) > 1)


@dataclasses.dataclass
class CollectiveStats:
  kind: str
  ops: int = 0  # instructions in the program
  executions: float = 0.0  # weighted by loop trip counts
  payload_bytes: float = 0.0  # per device per step: gathered/reduced array (reduce-scatter: its input)
  wire_bytes: float = 0.0  # per device per step sent over links, ring algorithms ((g-1)/g; all-reduce 2x)
  largest: str = ""


def collective_stats(module: Module) -> dict[str, CollectiveStats]:
  stats = {kind: CollectiveStats(kind) for kind in COLLECTIVES}
  for instr, times in module.instructions():
    op = instr.opcode.removesuffix("-start")
    if op == "ragged-all-to-all":
      op = "all-to-all"
    if op not in stats or instr.opcode.endswith("-done"):
      continue
    g = group_size(instr.attrs)
    shapes = instr.shapes
    if instr.opcode.endswith("-start") and len(shapes) >= 2:
      shapes = shapes[len(shapes) // 2:]  # async start returns (operands..., outputs...)
    size = sum(s.bytes for s in shapes)
    if op == "reduce-scatter":
      payload, wire = size * g, size * (g - 1)
    elif op == "all-gather":
      payload, wire = size, size * (g - 1) / max(g, 1)
    elif op == "all-reduce":
      payload, wire = size, 2 * size * (g - 1) / max(g, 1)
    elif op == "all-to-all":
      payload, wire = size, size * (g - 1) / max(g, 1)
    else:  # collective-permute
      payload, wire = size, size
    s = stats[op]
    s.ops += 1
    s.executions += times
    s.payload_bytes += payload * times
    s.wire_bytes += wire * times
    biggest = max(shapes, key=lambda x: x.bytes) if shapes else None
    if biggest is not None and (not s.largest or biggest.bytes > parse_shapes(s.largest)[0].bytes):
      s.largest = str(biggest)
  return stats


@dataclasses.dataclass
class Dot:
  name: str
  computation: str
  result: Shape
  operands: list[Shape]
  flops: float  # per execution
  times: float


def dots(module: Module) -> list[Dot]:
  """Every dot with its operand shapes, FLOPs (2 x result elements x contracted size) and execution count."""
  out = []
  for instr, times in module.instructions(("dot",)):
    operands = [module.symbols.get((instr.computation, n), [None])[0] for n in instr.operands[:2]]
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
    k = 1
    if contracting and operands and operands[0] is not None:
      k = math.prod(operands[0].dims[int(i)] for i in contracting.group(1).split(",") if i)
    result = instr.shapes[0]
    out.append(Dot(instr.name, instr.computation, result, [o for o in operands if o is not None],
                   2.0 * result.size * k, times))
  return out


def dot_flops(module: Module) -> float:
  return sum(d.flops * d.times for d in dots(module))


def format_bytes(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"
