"""Every job end to end on `tiny`: the briefly trained checkpoint beats the untrained one by a stated margin; the
scorer equals a hand-written forward pass; the sharded index search equals brute force; --follow picks up new
checkpoints and skips evaluated ones."""

import json
import os
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from tweetjax.evaluate import common, eval_sets, flagging, runner
from tweetjax.evaluate.search import exact_search
from tweetjax.evaluate import metrics as metrics_lib

pytestmark = pytest.mark.slow


def _both(evaluator, setup, job):
  _, untrained, _ = evaluator.evaluate(job, setup.untrained_step)
  _, trained, _ = evaluator.evaluate(job, setup.trained_step)
  return untrained, trained


def test_perplexity(evaluator, setup):
  untrained, trained = _both(evaluator, setup, "perplexity")
  # Untrained is about uniform over the 1024 ids (~7.4 nats); the trained checkpoint is at ~0.9 nats/token.
  assert untrained["loss"] > 6.0 and trained["loss"] < 2.5
  assert trained["bits_per_byte"] < 0.5 * untrained["bits_per_byte"]
  assert trained["bits_per_byte"] == pytest.approx(trained["loss"] * trained["tokens"] / np.log(2) / trained["bytes"])
  record = json.load(open(common.results_path(setup.workdir, "perplexity", setup.trained_step)))
  assert record["metrics"]["bits_per_byte"] == pytest.approx(trained["bits_per_byte"])
  assert record["details"]["whole_split"] and os.listdir(os.path.join(setup.workdir, "tensorboard", "eval",
                                                                     "perplexity"))


def test_flagging_probe(evaluator, setup):
  untrained, trained = _both(evaluator, setup, "flagging")
  # The probe on trained features separates the labels much better (measured ~0.98 vs ~0.79 macro AUC).
  assert trained["probe/macro_auc"] >= untrained["probe/macro_auc"] + 0.1
  assert trained["probe/macro_auc"] > 0.9 and trained["probe/macro_f1"] > 0.5
  for name in ("toxicity", "spam", "misinformation"):
    assert {f"probe/{name}/{k}" for k in ("precision", "recall", "f1", "auc")} <= set(trained)


def test_search(evaluator, setup):
  untrained, trained = _both(evaluator, setup, "search")
  # Contrastive head on trained states: MRR ~0.28 vs ~0.10 untrained.
  assert trained["head/mrr"] >= untrained["head/mrr"] + 0.05
  assert trained["head/recall@10"] >= trained["head/recall@1"]


def test_personalization(evaluator, setup):
  untrained, trained = _both(evaluator, setup, "personalization")
  # Engagement follows topic. Measured: head NDCG@10 0.75 trained vs 0.32
  # untrained, raw pooled states 0.52 vs 0.29, random 0.27. The margin needs the model to have learned topics:
  # after 300 steps of this schedule the head is still at 0.37.
  assert trained["head/ndcg@10"] >= untrained["head/ndcg@10"] + 0.2
  assert trained["embedding/ndcg@10"] >= untrained["embedding/ndcg@10"] + 0.1
  assert trained["head/hit@5"] > untrained["head/hit@5"]
  for results in (untrained, trained):
    for scorer in ("head", "embedding"):
      assert 0.0 < results[f"{scorer}/ndcg@10"] <= 1.0
      assert results[f"{scorer}/hit@1"] <= results[f"{scorer}/hit@5"]
    assert results["head/train_ndcg@10"] > 0.8  # the head does train (a broken fit stays near random, ~0.27)
    # 2 engaged among 20 candidates: a random ranking's expected NDCG@10 is about 0.28.
    assert 0.2 < results["random/ndcg@10"] < 0.36
  train_users = eval_sets.read_jsonl(os.path.join(setup.eval_dir, "personalization_train.jsonl"), "personalization")
  eval_users = eval_sets.read_jsonl(os.path.join(setup.eval_dir, "personalization.jsonl"), "personalization")
  assert len(train_users) == 200 and not {u["user_id"] for u in train_users} & {u["user_id"] for u in eval_users}
  eval_candidates = {c["id"] for u in eval_users for c in u["candidates"]}
  assert not eval_candidates & {c["id"] for u in train_users for c in u["candidates"]}


def test_adcopy(evaluator, setup):
  untrained, trained = _both(evaluator, setup, "adcopy")
  # References are far more likely under the trained model (~1.1 vs ~7.4 nats/token).
  assert trained["reference/nll_per_token"] < untrained["reference/nll_per_token"] - 2.0
  assert 0 < trained["generation/distinct_1"] <= 1 and trained["generation/mean_tokens"] > 0
  assert 0 <= trained["safety/flagged_rate"] <= 1


@pytest.fixture(scope="module")
def trained_ctx(evaluator, setup):
  params, step = common.restore_params(evaluator.experiment, setup.workdir, setup.trained_step)
  return evaluator.context(params, step)


def _manual_loglikelihoods(ctx, pairs, length=64):
  """log p(continuation + EOS | BOS + context) from one plain forward pass over right-padded rows."""
  tok = ctx.tokenizer
  rows = np.zeros((len(pairs), length), np.int32)
  segments = np.zeros((len(pairs), length), np.int32)
  spans = []
  for i, (context, continuation) in enumerate(pairs):
    prefix = [tok.bos_id] + tok.encode(context)
    seq = prefix + tok.encode(continuation) + [tok.eos_id]
    rows[i, :len(seq)], segments[i, :len(seq)] = seq, 1
    spans.append((len(prefix), len(seq)))
  logits = jax.jit(ctx.experiment.model.apply)({"params": jax.device_get(ctx.params)}, rows, None, segments)
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
  return [sum(logp[i, j - 1, rows[i, j]] for j in range(a, b)) for i, (a, b) in enumerate(spans)]


def test_scorer_and_zero_shot_match_a_plain_forward_pass(trained_ctx):
  ctx = trained_ctx
  pairs = [("fellow fans, the match", "was amazing tonight #derby"), ("", "rain again"), ("ok", "x")]
  text = "shut up loser"
  pos, neg = flagging.LABEL_PROMPTS["toxicity"]
  manual = _manual_loglikelihoods(ctx, pairs + [("", pos.format(text=text)), ("", neg.format(text=text))])
  ll, counts = ctx.loglikelihood([c for c, _ in pairs], [t for _, t in pairs])
  np.testing.assert_allclose(ll, manual[:3], rtol=1e-4, atol=1e-4)
  assert counts[1] == len(ctx.tokenizer.encode("rain again")) + 1
  scores = flagging.zero_shot_scores(ctx, [text, "nice pizza"], ["toxicity"])
  assert scores.shape == (2, 1) and scores[0, 0] == pytest.approx(manual[3] - manual[4], rel=1e-4, abs=1e-3)


def test_sharded_exact_search_equals_brute_force(evaluator):
  rng = np.random.default_rng(0)
  index, queries = rng.normal(size=(37, 8)), rng.normal(size=(5, 8))  # 37 rows: padded over 4 batch shards
  relevant = np.array([3, 36, 0, 17, 20])
  scores, ids, ranks = exact_search(queries, index, relevant, 10, evaluator.experiment.mesh)
  brute = queries @ index.T
  np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1)[:, :10])
  np.testing.assert_allclose(scores, -np.sort(-brute, axis=1)[:, :10], rtol=1e-5)
  np.testing.assert_array_equal(ranks, metrics_lib.rank_of_relevant(brute, relevant))


def test_follow_picks_up_new_checkpoints_and_skips_done_ones(evaluator, setup, tmp_path):
  workdir = str(tmp_path / "run")
  source = os.path.join(setup.workdir, "checkpoints")
  os.makedirs(os.path.join(workdir, "checkpoints"))
  shutil.copytree(os.path.join(source, "0"), os.path.join(workdir, "checkpoints", "0"))
  # Step 0 was evaluated by an earlier (restarted) follower: its result file is the memory.
  done = common.write_results(workdir, "perplexity", 0, {"loss": 123.0}, tensorboard=False)
  follower = runner.Evaluator(setup.config, workdir, experiment=evaluator.experiment)
  follower.cache = evaluator.cache  # reuse compiled functions
  polled = threading.Event()

  def sleep(_):
    polled.set()
    threading.Event().wait(0.05)

  result = {}
  thread = threading.Thread(target=lambda: result.update(steps=runner.follow(
      follower, "perplexity", poll_s=0.05, idle_timeout_s=120, last_step=setup.trained_step, sleep=sleep)))
  thread.start()
  assert polled.wait(60)  # the follower looked, found nothing new, and is waiting
  # A trainer finishing a save: written aside, renamed into place.
  shutil.copytree(os.path.join(source, str(setup.trained_step)), os.path.join(workdir, "tmp_save"))
  os.rename(os.path.join(workdir, "tmp_save"), os.path.join(workdir, "checkpoints", str(setup.trained_step)))
  thread.join(300)
  assert not thread.is_alive()
  assert result["steps"] == [setup.trained_step]
  assert json.load(open(done))["metrics"] == {"loss": 123.0}  # not recomputed
  assert common.done_steps(workdir, "perplexity") == {0, setup.trained_step}
  # A restarted follower has nothing left to do.
  assert runner.follow(follower, "perplexity", poll_s=0, last_step=setup.trained_step) == []


def test_two_processes_evaluate_like_one(evaluator, setup, tmp_path):
  """tools/evaluate.py as a 2-process job (4 CPU devices each, tools/launch_local.py): every process builds the same
  host batches and feeds its own shards; results equal the in-process 8-device evaluation (1e-5 relative)."""
  from tests.evaluate.conftest import eval_overrides
  from tests.helpers import REPO, process_env

  workdir = tmp_path / "run"
  shutil.copytree(os.path.join(setup.workdir, "checkpoints"), workdir / "checkpoints")
  flags = [f"--config.{k}={v}" for k, v in eval_overrides(setup.dataset_dir, setup.eval_dir).items()]
  for job, keys in (("search", ("raw/mrr", "head/mrr", "head/recall@10")),
                    ("adcopy", ("reference/nll_per_token",))):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "launch_local.py"), "--num_processes=2",
         "--devices_per_process=4", "--timeout_s=400", "--", os.path.join(REPO, "tools", "evaluate.py"),
         "--config=" + os.path.join(REPO, "experiments", "tiny.py"), f"--workdir={workdir}", f"--job={job}",
         f"--checkpoint_step={setup.trained_step}"] + flags,
        cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert proc.stdout.count(f"{job} @ step {setup.trained_step}") == 2  # both processes ran it
    got = json.load(open(common.results_path(str(workdir), job, setup.trained_step)))["metrics"]
    _, expected, _ = evaluator.evaluate(job, setup.trained_step, write=False)
    for key in keys:
      assert got[key] == pytest.approx(expected[key], rel=1e-5), key
