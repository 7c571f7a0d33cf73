"""Product fine-tuning sets: the eval-set builder's data as SFT JSONL (tweetjax/data/sft.py), each with a held-out split.

Written by `tools/evaluate.py --build_eval_sets` (`eval_sets.build_eval_sets`) into `<eval data_dir>/sft/`, one
{"prompt", "response"} object per line (plus the fields named below, ignored by the loader):
  adcopy_train / adcopy_eval       audience + product -> ad text: `adcopy_prompt(audience, product)` -> a tweet of
                                   that audience mentioning the product (one of its `topic_keywords`); train tweets /
                                   validation tweets (the same tweets the ad-copy job's references come from).
                                   Fields: id, audience, product.
  flagging_train / flagging_eval   flagging as generation: `flagging_prompt(text, label)` -> "yes" | "no", one line
                                   per (tweet, label); from flagging_train.jsonl (balanced: every positive and as
                                   many negatives per label) / flagging_eval.jsonl (all of it: the probe's eval
                                   split). Fields: id, label.
  reply_train / reply_eval         reply generation: `reply_prompt(parent)` -> the reply, for every reply whose
                                   parent is in the dataset; split by the reply's split. Fields: id, parent_id.
A set the dataset yields no records for (no replies, no audience labels...) is not written (logged).
The eval jobs build their prompts with the same functions (tweetjax/evaluate/finetuned.py), so a model fine-tuned
on these files is scored in the format it learned.
"""

from __future__ import annotations

import collections
import os
import random
from typing import Any

from absl import logging

from tweetjax.evaluate import eval_sets

DIR = "sft"
FILES = tuple(f"{task}_{split}.jsonl" for task in ("adcopy", "flagging", "reply") for split in ("train", "eval"))
ANSWERS = ("yes", "no")  # positive, negative answer of a flagging prompt
LABEL_PHRASES = {"toxicity": "toxic", "spam": "spam", "misinformation": "misinformation"}


def adcopy_prompt(audience: str, product: str) -> str:
  return f"write an ad about {product} for {audience}"


def flagging_prompt(text: str, label: str) -> str:
  return f"is this tweet {LABEL_PHRASES.get(label, label)}? {text}"


def reply_prompt(text: str) -> str:
  return f"reply to this tweet: {text}"


def topic_keywords(examples: list[dict[str, Any]], min_count: int = 3, min_share: float = 0.5) -> set[str]:
  """Content words (no hashtags) seen at least `min_count` times, at least `min_share` of them in one topic: the
  words that say what a tweet is about, i.e. what an ad can be for."""
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for ex in examples:
    if ex.get("topic"):
      for w in eval_sets.content_words(ex["text"]):
        if not w.startswith("#"):
          counts[w][ex["topic"]] += 1
  return {w for w, c in counts.items() if sum(c.values()) >= min_count and max(c.values()) >= min_share * sum(c.values())}


def _adcopy(examples: list[dict[str, Any]], keywords: set[str], rng: random.Random, limit: int
            ) -> list[dict[str, Any]]:
  out = []
  for ex in examples:
    if (ex.get("audience") in eval_sets.AUDIENCE_PHRASES and ex["audience"] != "general" and ex.get("topic")
        and not ex.get("reply_to_id")):  # a reply speaks to its parent, not to an audience
      words = [w for w in eval_sets.content_words(ex["text"]) if w in keywords]
      if words:
        product = rng.choice(words)
        out.append({"prompt": adcopy_prompt(ex["audience"], product), "response": ex["text"], "id": ex["id"],
                    "audience": ex["audience"], "product": product})
  return out[:limit]


def _flagging(records: list[dict[str, Any]], rng: random.Random, balance: bool) -> list[dict[str, Any]]:
  out = []
  for label in sorted(records[0]["labels"]) if records else []:
    chosen = records
    if balance:
      positives = [r for r in records if r["labels"][label]]
      negatives = [r for r in records if not r["labels"][label]]
      chosen = positives + rng.sample(negatives, min(len(negatives), max(len(positives), 1)))
      rng.shuffle(chosen)
    out += [{"prompt": flagging_prompt(r["text"], label), "response": ANSWERS[1 - r["labels"][label]],
             "id": r["id"], "label": label} for r in chosen]
  return out


def _replies(examples: list[dict[str, Any]], text_by_id: dict[str, str], limit: int) -> list[dict[str, Any]]:
  return [{"prompt": reply_prompt(text_by_id[ex["reply_to_id"]]), "response": ex["text"], "id": ex["id"],
           "parent_id": ex["reply_to_id"]}
          for ex in examples if ex.get("reply_to_id") in text_by_id][:limit]


def make_sft_sets(train: list[dict[str, Any]], validation: list[dict[str, Any]],
                  flagging_train: list[dict[str, Any]], flagging_eval: list[dict[str, Any]], seed: int = 0, *,
                  max_examples: int = 20_000) -> dict[str, list[dict[str, Any]]]:
  """File name -> records, from dataset examples and the flagging eval-set records (see the module docstring)."""
  rng = random.Random(f"{seed}/sft")
  text_by_id = {ex["id"]: ex["text"] for ex in train + validation}
  keywords = topic_keywords(train)
  out = {"adcopy_train.jsonl": _adcopy(train, keywords, rng, max_examples),
         "adcopy_eval.jsonl": _adcopy(validation, keywords, rng, max_examples),
         "flagging_train.jsonl": _flagging(flagging_train, rng, balance=True)[:max_examples],
         "flagging_eval.jsonl": _flagging(flagging_eval, rng, balance=False)[:max_examples],
         "reply_train.jsonl": _replies(train, text_by_id, max_examples),
         "reply_eval.jsonl": _replies(validation, text_by_id, max_examples)}
  empty = sorted(name for name, records in out.items() if not records)
  if empty:  # the eval sets stand without them: a dataset without replies, say, still gets everything else
    logging.warning("the dataset yields no fine-tuning records for %s (they need labeled tweets: audience, topic, "
                    "flagging labels; and replies whose parent is in the dataset): not written", empty)
  return {name: records for name, records in out.items() if records}


def path(data_dir: str, name: str) -> str:
  return os.path.join(data_dir, DIR, name)
