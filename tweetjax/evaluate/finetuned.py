"""Scores for fine-tuned checkpoints, next to their base model: the SFT-format parts of the ad-copy and flagging jobs.

Prompts are rendered with the run's chat template (`config.data.sft`, tweetjax/data/sft.py `ChatEncoder`) exactly
as fine-tuning rendered them, and a response is scored on the tokens fine-tuning trained (its content and the
end-of-turn marker after it), so the numbers are the held-out version of the training loss.

The base model is the one fine-tuning started from: with LoRA the checkpoint itself with its adapters zeroed (the
base weights are frozen, so that is exactly the base), otherwise `config.train.init_from` restored onto this mesh.
A run with neither (trained from scratch) reports no base numbers. Base scores do not change between checkpoints,
so a follower computes them once.

  adcopy    sft/nll_per_token (this checkpoint), sft/base_nll_per_token, sft/nll_gain (base - this; > 0 is better)
            of the held-out ad texts of sft/adcopy_eval.jsonl given their audience + product prompts;
  flagging  generative classification: score(label) = log p("yes") - log p("no") after `flagging_prompt(text,
            label)`, positive when > 0; per label precision/recall/F1/AUC and macro averages on flagging_eval.jsonl,
            the probe's split (generative/...), and the base's macro F1/AUC (generative/base_macro_{f1,auc}).
"""

from __future__ import annotations

import collections
import os
from typing import Any, Sequence

import numpy as np

from tweetjax.data import sft
from tweetjax.evaluate import eval_sets, sft_sets
from tweetjax.evaluate.common import EvalContext
from tweetjax.model import lora


def encoder(ctx: EvalContext) -> sft.ChatEncoder:
  return ctx.cached("sft_encoder", lambda: sft.encoder_from_config(ctx.config, ctx.tokenizer))


def base_params(ctx: EvalContext) -> Any | None:
  """The params of the model fine-tuning started from, on this mesh; None when there is none."""
  if ctx.experiment.model_config.lora.rank:
    return ctx.cached("base_params", lambda: lora.zero_adapters(ctx.params))
  if ctx.config.train.get("init_from"):
    from tweetjax.train import init_from  # pylint: disable=g-import-not-at-top
    return ctx.cached("base_params", lambda: init_from.load_params(ctx.config, ctx.experiment))
  return None


def response_nll(ctx: EvalContext, params: Any, examples: Sequence[sft.Messages]) -> float:
  """Mean NLL per trained token of each example's last (assistant) turn given the turns before it."""
  enc = encoder(ctx)
  prefixes, continuations = [], []
  for messages in examples:
    ids, first = enc.prompt_and_response(messages[:-1], messages[-1]["content"])
    prefixes.append(ids[:first])
    continuations.append(ids[first:])
  ll, counts = ctx.scorer.score(params, prefixes, continuations)
  return float(-ll.sum() / counts.sum())


def read_examples(path: str) -> list[sft.Messages]:
  """The examples of an SFT JSONL eval file; any bad line is an error naming file:line (eval files are exact)."""
  if not os.path.exists(path):
    raise eval_sets.EvalSetError(f"{path}: not found (written by tools/evaluate.py --build_eval_sets)")
  try:
    return [messages for messages, _, _ in sft.read_files(path, collections.Counter(), strict=True)]
  except ValueError as e:
    raise eval_sets.EvalSetError(str(e)) from None


def adcopy_scores(ctx: EvalContext) -> dict[str, float]:
  """The fine-tuned ad-copy NLL (and the base's) on sft/adcopy_eval.jsonl; {} when the file does not exist."""
  path = sft_sets.path(eval_sets.data_dir_of(ctx.config), "adcopy_eval.jsonl")
  if not os.path.exists(path):
    return {}
  examples = ctx.cached(f"examples:{path}", lambda: read_examples(path))
  out = {"sft/nll_per_token": response_nll(ctx, ctx.params, examples)}
  base = base_params(ctx)
  if base is not None:
    out["sft/base_nll_per_token"] = ctx.cached("base_adcopy_nll", lambda: response_nll(ctx, base, examples))
    out["sft/nll_gain"] = out["sft/base_nll_per_token"] - out["sft/nll_per_token"]
  return out


def flagging_scores(ctx: EvalContext, params: Any, texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
  """[N, C] log p("yes") - log p("no") after each (tweet, label) prompt, in the fine-tuning format."""
  enc = encoder(ctx)
  prefixes, continuations = [], []
  for name in names:
    for text in texts:
      for answer in sft_sets.ANSWERS:
        ids, first = enc.prompt_and_response([{"role": "user", "content": sft_sets.flagging_prompt(text, name)}],
                                             answer)
        prefixes.append(ids[:first])
        continuations.append(ids[first:])
  ll, _ = ctx.scorer.score(params, prefixes, continuations)
  ll = ll.reshape(len(names), len(texts), 2)
  return (ll[..., 0] - ll[..., 1]).T
