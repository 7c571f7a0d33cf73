"""Flagging job (content moderation): per-label precision, recall, F1 and ROC-AUC of two classifiers.

  probe      class-balanced logistic regression on mean-pooled final hidden states, trained on
             flagging_train.jsonl, evaluated on flagging_eval.jsonl (a positive is logit > 0);
  zero-shot  no training: score(label) = log p(positive prompt) - log p(negative prompt), each prompt being a
             template around the tweet (LABEL_PROMPTS); positive when the score is > 0. On a base model trained
             only on tweets this is near chance; it is meant for larger or instruction-tuned checkpoints.
  generative as a fine-tuned model answers the label prompts of its fine-tuning set (tweetjax/evaluate/finetuned.py):
             log p("yes") - log p("no"), positive when > 0, on the same split as the probe; with the base model's
             macro F1 and AUC next to it when the run has a base (LoRA, or config.train.init_from).
The headline metrics are the macro averages over labels: `probe/macro_auc` and `probe/macro_f1`.
config.eval.flagging_zero_shot=False skips the zero-shot mode (it scores 2 x labels sequences per tweet), and
config.eval.flagging_generative=False the generative one (the same cost, twice with a base).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from tweetjax.evaluate import eval_sets, finetuned
from tweetjax.evaluate import metrics as metrics_lib
from tweetjax.evaluate.common import EvalContext, normalize_texts
from tweetjax.evaluate.probe import LogisticProbe

# (positive template, negative template) per label; "{text}" is replaced by the tweet.
LABEL_PROMPTS = {
    "toxicity": ("{text} this tweet is toxic, insulting and hateful", "{text} this tweet is friendly and polite"),
    "spam": ("{text} this tweet is spam, a scam with links", "{text} this tweet is a normal personal post"),
    "misinformation": ("{text} this tweet is a false conspiracy theory", "{text} this tweet is accurate and true"),
}
_GENERIC_PROMPTS = ("{text} this tweet is {label}", "{text} this tweet is not {label}")


def load_split(ctx: EvalContext, name: str) -> tuple[list[str], list[str], np.ndarray]:
  """(texts normalized like training text, label names, labels int[N, C]) of flagging_<name>.jsonl."""
  records = eval_sets.read_jsonl(os.path.join(eval_sets.data_dir_of(ctx.config), f"flagging_{name}.jsonl"),
                                 "flagging")
  names = sorted(records[0]["labels"])
  labels = np.array([[r["labels"][n] for n in names] for r in records], np.int32)
  return normalize_texts(ctx.config, [r["text"] for r in records]), names, labels


def train_probe(ctx: EvalContext) -> tuple[LogisticProbe, list[str]]:
  """The probe of this checkpoint (trained once per step; the ad-copy job reuses it)."""
  def fit():
    texts, names, labels = load_split(ctx, "train")
    cfg = ctx.eval_config
    probe = LogisticProbe.fit(ctx.embed(texts), labels, steps=int(cfg.probe_steps),
                              learning_rate=float(cfg.probe_learning_rate), l2=float(cfg.probe_l2))
    return probe, names
  return ctx.cached(f"flagging_probe@{ctx.step}", fit)


def zero_shot_scores(ctx: EvalContext, texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
  """[N, C] log-likelihood differences between each label's positive and negative prompt."""
  filled = []
  for name in names:
    pos, neg = LABEL_PROMPTS.get(name, tuple(t.replace("{label}", name) for t in _GENERIC_PROMPTS))
    filled += [pos.format(text=t) for t in texts] + [neg.format(text=t) for t in texts]
  ll, _ = ctx.loglikelihood([""] * len(filled), filled)
  ll = ll.reshape(len(names), 2, len(texts))
  return (ll[:, 0] - ll[:, 1]).T


def _report(prefix: str, names: Sequence[str], labels_NxC: np.ndarray, scores_NxC: np.ndarray) -> dict[str, float]:
  out: dict[str, float] = {}
  for c, name in enumerate(names):
    prf = metrics_lib.precision_recall_f1(labels_NxC[:, c], scores_NxC[:, c] > 0)
    for k, v in prf.items():
      out[f"{prefix}/{name}/{k}"] = v
    out[f"{prefix}/{name}/auc"] = metrics_lib.roc_auc(labels_NxC[:, c], scores_NxC[:, c])
  for k in ("f1", "auc", "precision", "recall"):
    out[f"{prefix}/macro_{k}"] = float(np.nanmean([out[f"{prefix}/{n}/{k}"] for n in names]))
  return out


def run(ctx: EvalContext) -> tuple[dict[str, float], dict[str, Any]]:
  probe, names = train_probe(ctx)
  texts, eval_names, labels = load_split(ctx, "eval")
  if eval_names != names:
    raise eval_sets.EvalSetError(f"flagging_eval.jsonl has labels {eval_names} but flagging_train.jsonl has {names}")
  results = _report("probe", names, labels, probe.logits(ctx.embed(texts)))
  if ctx.eval_config.flagging_zero_shot:
    results.update(_report("zeroshot", names, labels, zero_shot_scores(ctx, texts, names)))
  if ctx.eval_config.get("flagging_generative", False):
    results.update(_report("generative", names, labels, finetuned.flagging_scores(ctx, ctx.params, texts, names)))
    base = finetuned.base_params(ctx)
    if base is not None:
      scores = ctx.cached("base_generative", lambda: finetuned.flagging_scores(ctx, base, texts, names))
      report = _report("generative", names, labels, scores)
      results.update({f"generative/base_macro_{k}": report[f"generative/macro_{k}"] for k in ("f1", "auc")})
  details = {"eval_examples": len(texts), "positives": {n: int(labels[:, c].sum()) for c, n in enumerate(names)}}
  return results, details
