"""Preemption: SIGTERM asks for a checkpoint at the next agreed step boundary and a clean exit.

A scheduler signals processes at slightly different times, yet every process must stop after the same step (the
checkpoint is a collective). Each process records the signal locally; every `check_every` steps all processes
exchange their flags (one tiny allgather) and stop together if any was signalled.
"""

from __future__ import annotations

import signal
import threading

import numpy as np
import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  def __init__(self, check_every: int = 1, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.check_every = max(int(check_every), 1)
    self._requested = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    else:
      logging.warning("not on the main thread: cannot install signal handlers; preemption is not watched")

  def _handle(self, signum, frame) -> None:
    del frame
    if not self._requested.is_set():
      logging.warning("received signal %d: will checkpoint at the next step boundary and exit", signum)
    self._requested.set()

  def request(self) -> None:
    """Asks for a stop as a signal would (for programmatic use)."""
    self._requested.set()

  @property
  def requested_locally(self) -> bool:
    return self._requested.is_set()

  def should_stop(self, step: int) -> bool:
    """Whether all processes stop after `step`. Collective on multi-host runs: call it at every step everywhere."""
    if jax.process_count() == 1:
      return self._requested.is_set()
    if step % self.check_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self._requested.is_set()))
    return bool(np.any(flags))

  def close(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
