"""Fine-tuned models in the product jobs: the eval-set builder's SFT sets (held-out splits), a LoRA fine-tune of the
trained tiny fixture through the training loop, and the ad-copy / flagging jobs reporting it against its base."""

import collections
import json
import os

import ml_collections
import pytest

from tweetjax.data import sft
from tweetjax.evaluate import eval_sets, sft_sets
from tweetjax.evaluate.runner import Evaluator
from tweetjax.train import loop

pytestmark = pytest.mark.slow
FT_STEPS = 60


def _read(setup, name):
  return [json.loads(line) for line in open(sft_sets.path(setup.eval_dir, name))]


def test_product_sets_hold_out_the_validation_split(setup):
  from tweetjax.data import pipeline
  validation = {ex["id"] for ex in pipeline.load_examples(setup.dataset_dir, "validation")}
  for task in ("adcopy", "reply"):
    train, held_out = _read(setup, f"{task}_train.jsonl"), _read(setup, f"{task}_eval.jsonl")
    assert train and held_out and all(r["id"] in validation for r in held_out)
    assert not {r["id"] for r in train} & validation
  for r in _read(setup, "adcopy_train.jsonl"):
    assert r["product"] in r["response"].lower() and r["prompt"] == sft_sets.adcopy_prompt(r["audience"], r["product"])
  # Flagging: the probe's splits, one line per (tweet, label); train balanced, eval all of flagging_eval.jsonl.
  train, held_out = _read(setup, "flagging_train.jsonl"), _read(setup, "flagging_eval.jsonl")
  probe_eval = eval_sets.read_jsonl(os.path.join(setup.eval_dir, "flagging_eval.jsonl"), "flagging")
  assert len(held_out) == 3 * len(probe_eval)
  for label in eval_sets.FLAG_LABELS:
    answers = collections.Counter(r["response"] for r in train if r["label"] == label)
    assert answers["yes"] == answers["no"] > 10
  stats = collections.Counter()
  assert len(sft.read_files(sft_sets.path(setup.eval_dir, "reply_train.jsonl"), stats)) == len(
      _read(setup, "reply_train.jsonl")) and stats["read"] == len(_read(setup, "reply_train.jsonl"))


@pytest.fixture(scope="module")
def lora_run(setup, tmp_path_factory):
  """tiny, trained 500 steps on tweets, LoRA fine-tuned FT_STEPS steps on the ad-copy and flagging SFT sets."""
  config = ml_collections.ConfigDict(setup.config.to_dict())
  config.data.source = "sft"
  config.data.sft.train_files = ",".join(sft_sets.path(setup.eval_dir, f"{t}_train.jsonl") for t in ("adcopy", "flagging"))
  config.data.sft.validation_files = sft_sets.path(setup.eval_dir, "adcopy_eval.jsonl")
  config.train.update(steps=FT_STEPS, init_from=setup.workdir, init_from_step=setup.trained_step, tensorboard=False,
                      log_every=FT_STEPS)
  config.lora.update(rank=8, alpha=16.0, dropout=0.05)
  config.optimizer.update(learning_rate=1e-2, warmup_steps=5)
  config.checkpoint.every_steps = 0
  config.eval.update(flagging_generative=True, max_new_tokens=8)
  workdir = str(tmp_path_factory.mktemp("lora_sft"))
  loop.train(config, workdir)
  return config, workdir


def test_fine_tuned_beats_its_base(lora_run):
  config, workdir = lora_run
  lora_evaluator = Evaluator(config, workdir)
  _, adcopy, _ = lora_evaluator.evaluate("adcopy", write=False)
  _, flagging, _ = lora_evaluator.evaluate("flagging", write=False)
  # Held-out ad texts given their audience + product prompt: measured 0.846 vs 1.062 nats/token after 60 steps.
  assert adcopy["sft/nll_gain"] == pytest.approx(adcopy["sft/base_nll_per_token"] - adcopy["sft/nll_per_token"])
  assert adcopy["sft/nll_gain"] > 0.15
  # Generative classification on the probe's split: measured macro AUC 0.641 vs 0.430 for the base (the probe on the
  # same states: 0.976); 60 steps are far from what flagging needs (150 full fine-tuning steps: 0.89).
  assert flagging["generative/macro_auc"] > flagging["generative/base_macro_auc"] + 0.1
  assert {"probe/macro_auc", "generative/toxicity/f1", "generative/base_macro_f1"} <= set(flagging)
