"""Perplexity job: token-level loss, perplexity and bits per byte on the validation split of the tweet dataset.

Batches come from the tweet loader (`pipeline.iterate_packed_batches`: the training normalization, tokenizer and
packing, one pass, last batch padded) and go through `experiment.eval_step()`, the same loss as training.
Every predicted token counts, the EOS that ends each tweet included.

bits/byte = total nats / ln 2 / total UTF-8 bytes of the (normalized) text: unlike perplexity it does not depend on
the tokenizer, so runs with different vocabularies compare. With config.eval.perplexity_max_batches > 0 only part
of the split is read, and the bytes are estimated from the split's bytes per token.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from absl import logging

from tweetjax.evaluate import metrics as metrics_lib
from tweetjax.evaluate.common import EvalContext, normalize_texts
from tweetjax.parallel.rules import batch_sharding, host_to_global


def run(ctx: EvalContext) -> tuple[dict[str, float], dict[str, Any]]:
  from tweetjax.data import pipeline  # pylint: disable=g-import-not-at-top  (grain, tfds)
  config = ctx.config
  dataset_dir = str(config.data.dataset_dir)
  if not dataset_dir:
    raise ValueError("perplexity needs config.data.dataset_dir (a dataset built by tools/build_dataset.py)")
  options = config.data.get("normalize", None)
  options = options.to_dict() if hasattr(options, "to_dict") else options
  batches = pipeline.iterate_packed_batches(
      dataset_dir, ctx.tokenizer, int(config.data.seq_len), int(config.data.global_batch_size),
      split="validation", normalize_config=options, pack_window=int(config.data.get("pack_window", 4096)))
  eval_step = ctx.cached("eval_step", ctx.experiment.eval_step)
  max_batches = int(config.eval.perplexity_max_batches)
  nats, tokens, num_batches = 0.0, 0.0, 0
  rows = batch_sharding(ctx.experiment.mesh)
  for batch in batches:  # every process reads the same global batches (one pass over a small split)
    sums = jax.device_get(eval_step(ctx.params, {k: host_to_global(v, rows) for k, v in batch.items()}))
    nats += float(sums["ce_sum"])
    tokens += float(sums["tokens"])
    num_batches += 1
    if max_batches and num_batches >= max_batches:
      break
  if not tokens:
    raise ValueError(f"the validation split of {dataset_dir} has no tokens")

  texts = normalize_texts(config, [ex["text"] for ex in pipeline.load_examples(dataset_dir, "validation")])
  split_bytes = metrics_lib.utf8_bytes(texts)
  split_tokens = sum(len(ids) + 1 for ids in ctx.tokenizer.encode_batch(texts))  # + EOS per tweet
  whole_split = not max_batches or tokens >= split_tokens
  if whole_split and int(tokens) != split_tokens:
    logging.warning("perplexity: evaluated %d tokens but the split has %d", int(tokens), split_tokens)
  evaluated_bytes = split_bytes if whole_split else tokens * split_bytes / split_tokens
  loss = nats / tokens
  results = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
             "bits_per_byte": metrics_lib.bits_per_byte(nats, evaluated_bytes),
             "bits_per_token": loss / math.log(2), "tokens": tokens, "bytes": float(evaluated_bytes),
             "bytes_per_token": split_bytes / split_tokens}
  details = {"batches": num_batches, "whole_split": bool(whole_split), "documents": len(texts)}
  return results, details
