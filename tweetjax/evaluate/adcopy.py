"""Ad-copy job: generate ad text for an audience/product prompt and check it.

For each prompt of adcopy.jsonl:
  reference likelihood  log p(reference copy | prompt) of the human references, per token (headline:
                        `reference/nll_per_token`, lower is better) and as perplexity;
  generation            `num_generations` samples with the KV-cache sampler (config.eval temperature/top-k/top-p,
                        max_new_tokens): distinct-1/2 over all generations, mean length in words and tokens;
  safety                the flagging job's probe (trained on flagging_train.jsonl with this checkpoint) applied to
                        every generation: the fraction flagged for any label, and per label;
  fine-tuned format     with sft/adcopy_eval.jsonl (tools/evaluate.py --build_eval_sets): the NLL per token of
                        its held-out ad texts in the fine-tuning chat format, this checkpoint's and its base
                        model's (`sft/nll_per_token`, `sft/base_nll_per_token`, `sft/nll_gain`;
                        tweetjax/evaluate/finetuned.py).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from tweetjax.evaluate import eval_sets, finetuned, flagging
from tweetjax.evaluate import metrics as metrics_lib
from tweetjax.evaluate.common import EvalContext, normalize_texts
from tweetjax.model.decode import SamplingConfig, Sampler, generate_text


def sampling_config(ctx: EvalContext) -> SamplingConfig:
  cfg = ctx.eval_config
  return SamplingConfig(max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                        top_k=int(cfg.top_k), top_p=float(cfg.top_p), eos_id=ctx.tokenizer.eos_id)


def run(ctx: EvalContext, num_generations: int = 2) -> tuple[dict[str, float], dict[str, Any]]:
  prompts = eval_sets.read_jsonl(os.path.join(eval_sets.data_dir_of(ctx.config), "adcopy.jsonl"), "adcopy")
  norm = lambda texts: normalize_texts(ctx.config, texts)
  prompt_texts = norm([p["prompt"] for p in prompts])
  contexts = [t for t, p in zip(prompt_texts, prompts) for _ in p["references"]]
  references = norm([r for p in prompts for r in p["references"]])
  ll, counts = ctx.loglikelihood(contexts, references)
  nll_per_token = float(-ll.sum() / counts.sum())

  sampler = ctx.cached("sampler", lambda: Sampler(ctx.experiment.model, ctx.experiment.mesh, ctx.experiment.rules,
                                                  pad_id=ctx.tokenizer.pad_id))
  requests = [t for t in prompt_texts for _ in range(num_generations)]
  generations = generate_text(sampler, ctx.params, ctx.tokenizer, requests, sampling_config(ctx),
                              jax.random.key(int(ctx.config.seed)))
  probe, names = flagging.train_probe(ctx)
  flagged_NxC = probe.predict(ctx.embed([g if g.strip() else "." for g in generations]))
  lengths_tokens = [len(ids) for ids in ctx.tokenizer.encode_batch(generations)]
  results = {"reference/nll_per_token": nll_per_token, "reference/perplexity": float(np.exp(nll_per_token)),
             "generation/distinct_1": metrics_lib.distinct_n(generations, 1),
             "generation/distinct_2": metrics_lib.distinct_n(generations, 2),
             "generation/mean_words": float(np.mean([len(g.split()) for g in generations])),
             "generation/mean_tokens": float(np.mean(lengths_tokens)),
             "safety/flagged_rate": float(flagged_NxC.any(axis=1).mean())}
  for c, name in enumerate(names):
    results[f"safety/{name}_rate"] = float(flagged_NxC[:, c].mean())
  results.update(finetuned.adcopy_scores(ctx))
  details = {"prompts": len(prompts), "references": len(references),
             "samples": [{"prompt": p, "copy": g} for p, g in list(zip(requests, generations))[:6]]}
  return results, details
