"""Checkpoints: an orbax CheckpointManager over `<workdir>/checkpoints`, one directory per step.

  <workdir>/checkpoints/<step>/
    params/      model params (what evaluation jobs and export read: `restore_params`)
    opt_state/   optimizer state
    meta/        JSON: step, nonfinite_steps, seed, mesh, process count, time
    data_state/  the data iterator's state, one `process_<i>-of-<n>.json` per process
    config/      JSON: the experiment config that wrote it

Saves are asynchronous: device arrays are copied to host before `save` returns (so the caller may donate them to
the next step) and the files are written in the background. Orbax writes a step into a temporary directory and
renames it when complete, so a crash mid-save leaves only a `<step>.orbax-checkpoint-tmp-*` directory, which the next
start moves to `<workdir>/checkpoints_incomplete/`, which keeps the newest `keep_incomplete` of them (older ones are
deleted, and logged: a run preempted mid-save many times would otherwise fill the disk with partial states). A
complete step that cannot be read is moved to `<workdir>/checkpoints_corrupt/` and the previous step is used; those
are never deleted. Complete checkpoints are deleted only by the keep-last-k / keep-every-M policy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as preservation_lib

from tweetjax.train.state import StateLayout, TrainState

CHECKPOINTS = "checkpoints"
INCOMPLETE = "checkpoints_incomplete"
CORRUPT = "checkpoints_corrupt"
_TMP_MARKER = ".orbax-checkpoint-tmp"


class IncompatibleCheckpointError(ValueError):
  """The checkpoint is readable but does not fit the target layout (a config change, not corruption)."""


class NonFiniteStateError(RuntimeError):
  """Refusal to write a checkpoint whose params or optimizer state hold NaN/Inf."""


# ----------------------------------------------------------------------------------------------------------------
# Data iterator state: one JSON file per process (each process owns its shard of the input pipeline).


class DataStateHandler(ocp.CheckpointHandler):
  """Writes the state captured by `iterator.get_state()` (a JSON-able value or bytes) for this process."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    state = args.state
    if isinstance(state, bytes):
      record = {"kind": "bytes", "state": state.decode("utf-8")}
    else:
      record = {"kind": "json", "state": state}
    (directory / _process_file(jax.process_index(), jax.process_count())).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
    path = directory / _process_file(jax.process_index(), jax.process_count())
    if not path.exists():
      # Another process count wrote it. A state shared by all processes (the synthetic stream) still applies.
      files = sorted(directory.glob("process_*.json"))
      records = {f.read_text() for f in files}
      if len(records) != 1:
        raise IncompatibleCheckpointError(
            f"{directory}: data iterator state was written by {len(files)} processes with different states; "
            f"this job has {jax.process_count()} processes and cannot resume the input pipeline exactly")
      path = files[0]
    record = json.loads(path.read_text())
    return record["state"].encode("utf-8") if record["kind"] == "bytes" else record["state"]

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def _process_file(index: int, count: int) -> str:
  return f"process_{index}-of-{count}.json"


# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
  state: TrainState
  data_state: Any
  step: int
  config: dict[str, Any] | None
  meta: dict[str, Any]


def _array_tree_handler() -> ocp.PyTreeCheckpointHandler:
  th = ocp.type_handlers
  # Replica-parallel writing splits every replicated array into per-replica slices, one eager slice op per shard
  # compiled on first use (~10 s for the first save of the tiny model on 8 fake devices). Devices that share host
  # memory gain nothing from it; GPU runs already have it off by default.
  replica_parallel = jax.default_backend() != "cpu"
  registry = th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
      (np.ndarray, th.NumpyHandler()), (jax.Array, th.ArrayHandler(use_replica_parallel=replica_parallel)),
      (str, th.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"params": _array_tree_handler(), "opt_state": _array_tree_handler(),
          "meta": ocp.JsonCheckpointHandler(), "data_state": DataStateHandler(),
          "config": ocp.JsonCheckpointHandler()}


def _tree_restore(abstract: Any) -> ocp.args.PyTreeRestore:
  # A ShapeDtypeStruct without a sharding comes back as a numpy array.
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)
      if getattr(a, "sharding", None) is not None else ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype),
      abstract)
  return ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)


def checkpoints_dir(path: str) -> str:
  """`path` may be a workdir (holding `checkpoints/`) or the checkpoints directory itself; absolute either way."""
  path = os.path.abspath(path)
  candidate = os.path.join(path, CHECKPOINTS)
  return candidate if os.path.isdir(candidate) else path


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class CheckpointManager:
  """Async save, keep-last-k plus keep-every-M, and restore of the newest readable step onto any mesh."""

  def __init__(self, workdir: str, *, every_steps: int = 0, max_to_keep: int = 3, keep_every_steps: int = 0,
               async_save: bool = True, keep_incomplete: int = 3):
    self.workdir = os.path.abspath(workdir)  # orbax refuses relative paths
    self.directory = os.path.join(workdir, CHECKPOINTS)
    self.every_steps = int(every_steps)
    self.keep_incomplete = int(keep_incomplete)
    if self.keep_incomplete < 0:
      raise ValueError(f"config.checkpoint.keep_incomplete={keep_incomplete}: expected >= 0 (0 keeps none)")
    policies = [preservation_lib.LatestN(n=max_to_keep if max_to_keep > 0 else None)]
    if keep_every_steps > 0:
      policies.append(preservation_lib.EveryNSteps(interval_steps=keep_every_steps))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1,  # `should_save` decides; orbax is always asked with force=True.
        preservation_policy=preservation_lib.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=False)  # We move interrupted saves aside instead (see `set_aside_incomplete`).
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())

  @classmethod
  def from_config(cls, workdir: str, config) -> "CheckpointManager":
    c = config.checkpoint
    return cls(workdir, every_steps=int(c.every_steps), max_to_keep=int(c.max_to_keep),
               keep_every_steps=int(c.keep_every_steps), async_save=bool(c.async_save),
               keep_incomplete=int(c.keep_incomplete))

  # -- saving ------------------------------------------------------------------------------------------------------

  def should_save(self, step: int) -> bool:
    """Periodic saves: every `every_steps` steps (orbax's own policy would also save the first step seen)."""
    return self.every_steps > 0 and step % self.every_steps == 0 and step not in self._manager.all_steps()

  def save(self, step: int, state: TrainState, data_state: Any = None, *, config: Any = None,
           force: bool = False, extra_meta: dict[str, Any] | None = None) -> bool:
    """Starts writing `state` as `step` (returns at once; files are written in the background).

    Returns False when the interval says not to save (and not `force`) or the step already exists. Raises
    NonFiniteStateError, writing nothing, if any param or optimizer state value is NaN/Inf.
    """
    if step in self._manager.all_steps():
      return False
    if not force and not self.should_save(step):
      return False
    if not bool(_all_finite((state.params, state.opt_state))):
      raise NonFiniteStateError(f"step {step}: params or optimizer state are not finite; refusing to write a "
                                f"checkpoint (the newest good one is step {self.latest_step()})")
    meta = {"step": int(step), "nonfinite_steps": int(jax.device_get(state.nonfinite_steps)),
            "process_count": jax.process_count(), "device_count": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "time": time.time(), **(extra_meta or {})}
    if config is not None:
      config = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
    args = ocp.args.Composite(
        params=ocp.args.PyTreeSave(state.params), opt_state=ocp.args.PyTreeSave(state.opt_state),
        meta=ocp.args.JsonSave(meta), data_state=DataStateSave({} if data_state is None else data_state),
        config=ocp.args.JsonSave(config or {}))
    started = time.perf_counter()
    saved = self._manager.save(step, args=args, force=True)
    logging.info("checkpoint step %d: %s in %.2fs (blocking part)", step,
                 "save started" if saved else "not saved", time.perf_counter() - started)
    return saved

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- listing and restoring -------------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, layout: StateLayout) -> Restored:
    """Restores `step` placed on `layout`'s shardings (any mesh: orbax reads each shard's slice)."""
    self._manager.wait_until_finished()
    abstract = layout.abstract_state
    _check_compatible(self._manager.item_metadata(step), abstract, os.path.join(self.directory, str(step)))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=_tree_restore(abstract.params), opt_state=_tree_restore(abstract.opt_state),
        meta=ocp.args.JsonRestore(), data_state=DataStateRestore(), config=ocp.args.JsonRestore()))
    meta = dict(restored["meta"])
    if int(meta["step"]) != step:
      raise ValueError(f"checkpoint {step}: meta says step {meta['step']}")
    state = TrainState(step=jax.device_put(np.int32(step), abstract.step.sharding), params=restored["params"],
                       opt_state=restored["opt_state"],
                       nonfinite_steps=jax.device_put(np.int32(meta["nonfinite_steps"]),
                                                      abstract.nonfinite_steps.sharding))
    if not bool(_all_finite((state.params, state.opt_state))):
      raise NonFiniteStateError(f"checkpoint {step} holds non-finite values")
    return Restored(state, restored["data_state"], step, restored["config"] or None, meta)

  def restore_latest(self, layout: StateLayout) -> Restored | None:
    """The newest step that reads back whole; unreadable ones are moved aside. None when there is none."""
    self.set_aside_incomplete()
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(step, layout)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # noqa: BLE001  (any failure to read a complete step means it is damaged)
        logging.error("checkpoint step %d in %s cannot be restored (%s: %s); moving it aside and trying the "
                      "previous one", step, self.directory, type(e).__name__, e)
        self._set_aside(os.path.join(self.directory, str(step)), CORRUPT)
        self._manager.reload()
        continue
      logging.info("restored checkpoint step %d from %s", step, self.directory)
      return restored
    return None

  def set_aside_incomplete(self) -> None:
    """Moves temporary directories of interrupted saves out of the way (kept for a human to inspect)."""
    if not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      if _TMP_MARKER in name:
        logging.warning("%s/%s is an incomplete checkpoint (a save was interrupted); it is not used",
                        self.directory, name)
        self._set_aside(os.path.join(self.directory, name), INCOMPLETE)
    self.prune_incomplete()

  def prune_incomplete(self) -> list[str]:
    """Deletes all but the newest `keep_incomplete` set-aside incomplete checkpoints; returns what was deleted."""
    where = os.path.join(self.workdir, INCOMPLETE)
    removed = []
    if jax.process_index() == 0 and os.path.isdir(where):
      entries = sorted((os.stat(os.path.join(where, name)).st_mtime, name) for name in os.listdir(where))
      for _, name in entries[:max(0, len(entries) - self.keep_incomplete)]:
        shutil.rmtree(os.path.join(where, name), ignore_errors=True)
        removed.append(name)
      if removed:
        logging.warning("removed %d older incomplete checkpoint(s) from %s (checkpoint.keep_incomplete=%d): %s",
                        len(removed), where, self.keep_incomplete, ", ".join(removed))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("tweetjax_prune_incomplete")
    return removed

  def _set_aside(self, path: str, where: str) -> None:
    if jax.process_index() == 0 and os.path.exists(path):
      target_dir = os.path.join(self.workdir, where)
      os.makedirs(target_dir, exist_ok=True)
      target = os.path.join(target_dir, f"{os.path.basename(path)}.{time.strftime('%Y%m%d-%H%M%S')}")
      while os.path.exists(target):
        target += "_"
      shutil.move(path, target)
      os.utime(target)  # mtime = when it was set aside: the order prune_incomplete keeps the newest by
      logging.warning("moved %s to %s", path, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"tweetjax_set_aside_{os.path.basename(path)}")


def _check_compatible(metadata: Any, abstract: TrainState, where: str) -> None:
  for item in ("params", "opt_state"):
    check_tree_matches(metadata[item], getattr(abstract, item), f"{where}/{item}", item)


def check_tree_matches(saved: Any, wanted: Any, where: str, item: str = "params") -> None:
  """Raises IncompatibleCheckpointError naming the leaves (missing, unexpected, changed shape) when the saved tree
  (orbax metadata) does not have the shapes of `wanted` (arrays or ShapeDtypeStructs)."""
  saved = getattr(saved, "tree", saved)
  saved_shapes = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved)}
  wanted = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(wanted)}
  # Orbax stores namedtuple/dataclass nodes as dicts; compare leaf paths by their key names only.
  saved_shapes, wanted = _by_leaf_keys(saved_shapes), _by_leaf_keys(wanted)
  if saved_shapes != wanted:
    missing = ["/".join(k) for k in sorted(set(wanted) - set(saved_shapes))[:5]]
    extra = ["/".join(k) for k in sorted(set(saved_shapes) - set(wanted))[:5]]
    changed = sorted(k for k in set(wanted) & set(saved_shapes) if wanted[k] != saved_shapes[k])[:5]
    raise IncompatibleCheckpointError(
        f"{where} does not match this config's {item}: missing {missing}, unexpected {extra}, shape changed "
        f"{[('/'.join(k), saved_shapes[k], wanted[k]) for k in changed]} (saved shape, this config's shape): was the "
        f"model or optimizer config changed? compare with the checkpoint's config/")


def saved_params(path: str, step: int | None = None) -> tuple[Any, int]:
  """(orbax metadata tree of a checkpoint's params: leaves with .shape and .dtype, its step); reads no arrays."""
  directory = checkpoints_dir(path)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={"params": _array_tree_handler()})
  try:
    step = _existing_step(manager, directory, step)
    saved = manager.item_metadata(step)["params"]
    return getattr(saved, "tree", saved), step
  finally:
    manager.close()


def _existing_step(manager: ocp.CheckpointManager, directory: str, step: int | None) -> int:
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint under {directory}")
  if step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint step {step} under {directory}; there are {manager.all_steps()}")
  return step


def _by_leaf_keys(shapes: dict[str, tuple]) -> dict[str, tuple]:
  import re
  return {tuple(re.findall(r"[A-Za-z_][A-Za-z_0-9]*|\d+", k)): v for k, v in shapes.items()}


def restore_params(path: str, target: StateLayout | Any = None, step: int | None = None) -> Any:
  """Params of a checkpoint, for evaluation jobs and export (the optimizer state is never read).

  path: a workdir or its `checkpoints` directory. target: a StateLayout (params land on its mesh), a pytree of
  ShapeDtypeStructs (with shardings: placed on them; without: numpy arrays), or None (numpy arrays, saved tree).
  step: None = the newest complete step.
  """
  directory = checkpoints_dir(path)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={"params": _array_tree_handler()})
  try:
    step = _existing_step(manager, directory, step)
    if isinstance(target, StateLayout):
      target = target.abstract_state.params
    saved = manager.item_metadata(step)["params"]
    saved = getattr(saved, "tree", saved)
    if target is None:
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved)
    else:
      check_tree_matches(saved, target, os.path.join(directory, str(step), "params"))
    params = manager.restore(step, args=ocp.args.Composite(params=_tree_restore(target)))["params"]
    logging.info("restored params of step %d from %s", step, directory)
    return params
  finally:
    manager.close()
