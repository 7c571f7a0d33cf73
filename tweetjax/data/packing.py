"""Packs many short documents into fixed-length rows: the batch contract of the model and the trainer.

Each document is `[BOS] + ids + [EOS]` (`[BOS] + ids` with `add_eos=False`, for documents that carry their own end
markers); its inputs are doc[:-1] and its targets doc[1:], so a row never asks the model to predict across documents. A document with more than L input tokens is cut into consecutive chunks of at
most L (input, target) pairs, each its own segment with positions restarting at 0; nothing is dropped.

Rows come from best-fit-decreasing bin packing over a window of documents (bisect over the sorted remaining
capacities: O(log R) per chunk), then one vectorized numpy scatter writes all tokens. Output, for R rows:
  inputs      int32[R, L]   token ids fed to the model (pad_id on padding)
  targets     int32[R, L]   next-token ids (pad_id on padding)
  segment_ids int32[R, L]   1..n per packed document (chunk) within a row, 0 = padding
  positions   int32[R, L]   position within its segment, from 0; 0 on padding
  weights     float32[R, L] 1.0 where the target counts in the loss, 0.0 on padding (and, with `loss_masks`, on
                            targets whose mask is False: e.g. the prompt of a fine-tuning example)
Dims: N documents, C chunks, T tokens, R rows, L sequence length.
"""

import bisect
import itertools
from typing import Sequence

import numpy as np

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def flatten(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """list of token-id lists -> (flat int32[T], lengths int64[N]) without a per-token Python loop."""
  lengths_N = np.fromiter(map(len, ids), np.int64, len(ids))
  flat_T = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths_N.sum()))
  return flat_T, lengths_N


def best_fit_decreasing(sizes_C: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Assigns items to bins; returns (bin int64[C], offset in bin int64[C], number of bins). Deterministic."""
  order = np.argsort(-sizes_C, kind="stable").tolist()
  sizes = sizes_C.tolist()
  bin_C = np.empty(len(sizes), np.int64)
  offset_C = np.empty(len(sizes), np.int64)
  fill: list[int] = []
  # open bins as sorted keys remaining * 2**32 + bin id: the smallest key >= size * 2**32 is the best fit
  open_keys: list[int] = []
  shift = 1 << 32
  for i in order:
    s = sizes[i]
    j = bisect.bisect_left(open_keys, s * shift)
    if j == len(open_keys):
      b, rem = len(fill), capacity
      fill.append(0)
    else:
      key = open_keys.pop(j)
      b, rem = key & (shift - 1), key >> 32
    bin_C[i] = b
    offset_C[i] = fill[b]
    fill[b] += s
    if rem - s > 0:
      bisect.insort(open_keys, (rem - s) * shift + b)
  return bin_C, offset_C, len(fill)


def pack(ids: Sequence[Sequence[int]] | tuple[np.ndarray, np.ndarray], seq_len: int, bos_id: int, eos_id: int,
         pad_id: int = 0, *, add_eos: bool = True, loss_masks: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Packs documents (token-id lists without BOS/EOS, or `flatten`'s output) into rows; see the module docstring.

  loss_masks: bool[T] aligned with the flattened ids: whether predicting that token counts in the loss (the appended
  EOS always counts). None: every target counts.
  """
  L = seq_len
  ids_T, n_N = ids if isinstance(ids, tuple) else flatten(ids)
  full_len_N = n_N + (2 if add_eos else 1)
  full_start_N = np.cumsum(full_len_N) - full_len_N
  full_T = np.empty(int(full_len_N.sum()), np.int32)
  full_T[full_start_N] = bos_id
  if add_eos:
    full_T[full_start_N + full_len_N - 1] = eos_id
  ids_start_N = np.cumsum(n_N) - n_N
  ids_dest_T = np.repeat(full_start_N + 1 - ids_start_N, n_N) + np.arange(len(ids_T))
  full_T[ids_dest_T] = ids_T
  full_mask_T = None
  if loss_masks is not None:
    if len(loss_masks) != len(ids_T):
      raise ValueError(f"loss_masks has {len(loss_masks)} entries for {len(ids_T)} tokens")
    full_mask_T = np.ones(len(full_T), bool)
    full_mask_T[ids_dest_T] = loss_masks

  # chunks: document d has len - 1 (input, target) pairs, cut every L
  pairs_N = full_len_N - 1
  chunks_N = (pairs_N + L - 1) // L
  doc_C = np.repeat(np.arange(len(n_N)), chunks_N)
  chunk_idx_C = np.arange(len(doc_C)) - np.repeat(np.cumsum(chunks_N) - chunks_N, chunks_N)
  size_C = np.minimum(L, pairs_N[doc_C] - chunk_idx_C * L)
  src_C = full_start_N[doc_C] + chunk_idx_C * L

  row_C, col_C, num_rows = best_fit_decreasing(size_C, L)
  # segment ids in column order within each row: rank of the chunk among its row's chunks
  by_pos = np.lexsort((col_C, row_C))
  row_sorted = row_C[by_pos]
  first = np.r_[True, row_sorted[1:] != row_sorted[:-1]]
  run_start = np.maximum.accumulate(np.where(first, np.arange(len(by_pos)), 0))
  seg_C = np.empty(len(by_pos), np.int32)
  seg_C[by_pos] = np.arange(len(by_pos)) - run_start + 1

  total = int(size_C.sum())
  chunk_start_C = np.cumsum(size_C) - size_C
  within_T = np.arange(total) - np.repeat(chunk_start_C, size_C)
  dest_T = np.repeat(row_C * L + col_C, size_C) + within_T
  src_T = np.repeat(src_C, size_C) + within_T

  shape = (num_rows, L)
  inputs = np.full(num_rows * L, pad_id, np.int32)
  targets = np.full(num_rows * L, pad_id, np.int32)
  segment_ids = np.zeros(num_rows * L, np.int32)
  positions = np.zeros(num_rows * L, np.int32)
  inputs[dest_T] = full_T[src_T]
  targets[dest_T] = full_T[src_T + 1]
  segment_ids[dest_T] = np.repeat(seg_C, size_C)
  positions[dest_T] = within_T
  weights = (segment_ids > 0).astype(np.float32)
  if full_mask_T is not None:
    weights[dest_T] = full_mask_T[src_T + 1]
  return {"inputs": inputs.reshape(shape), "targets": targets.reshape(shape),
          "segment_ids": segment_ids.reshape(shape), "positions": positions.reshape(shape),
          "weights": weights.reshape(shape)}


def efficiency(batch: dict[str, np.ndarray]) -> float:
  """Fraction of positions that carry a real token (non-pad / all)."""
  return float(batch["weights"].mean()) if batch["weights"].size else 0.0


def empty_rows(num_rows: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """All-padding rows (weights 0): fill the last batch of a finite pass so nothing is dropped."""
  z = np.zeros((num_rows, seq_len), np.int32)
  return {"inputs": np.full_like(z, pad_id), "targets": np.full_like(z, pad_id), "segment_ids": z,
          "positions": z.copy(), "weights": np.zeros((num_rows, seq_len), np.float32)}
