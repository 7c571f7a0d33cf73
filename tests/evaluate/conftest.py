"""One small synthetic tweet dataset, its eval sets, and a tiny model checkpointed untrained (step 0) and briefly
trained (step TRAIN_STEPS), built once per test session and shared by every evaluation test (and by every
pytest-xdist worker: the first to take the lock builds it, the others reuse it)."""

import dataclasses
import fcntl
import os
import pathlib
import shutil

import pytest

from tests.helpers import load_config

TOKENIZER = str(pathlib.Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tokenizer.model")
# 500 steps at 6e-3: tiny learns which nouns share a topic between steps 300 and 400 of this schedule (the
# personalization job's signal; loss ~0.74). At 3e-3 or 300 steps it has not; at 1e-2 it does not train well.
TRAIN_STEPS = 500
LEARNING_RATE = 6e-3
NUM_TWEETS = 2500


@dataclasses.dataclass
class Setup:
  config: object
  workdir: str
  dataset_dir: str
  eval_dir: str
  trained_step: int = TRAIN_STEPS
  untrained_step: int = 0


def eval_overrides(dataset_dir: str, eval_dir: str) -> dict[str, object]:
  """tiny's config keys the evaluation tests change (in-process configs and tool command lines alike)."""
  return {
      "data.source": "tweets", "data.dataset_dir": dataset_dir, "data.tokenizer_path": TOKENIZER,
      "train.steps": TRAIN_STEPS, "optimizer.learning_rate": LEARNING_RATE, "optimizer.warmup_steps": 10,
      "eval.data_dir": eval_dir, "eval.batch_size": 32, "eval.max_len": 128, "eval.probe_steps": 200,
      # Zero-shot flagging is checked directly (test_jobs.py); it triples the job's forward passes. Generative
      # flagging is for fine-tuned checkpoints (test_finetune.py).
      "eval.flagging_zero_shot": False, "eval.flagging_generative": False,
      "eval.search_head_steps": 150, "eval.personalization_head_steps": 150, "eval.max_new_tokens": 24,
  }


def eval_config(dataset_dir: str, eval_dir: str):
  config = load_config("tiny")
  for key, value in eval_overrides(dataset_dir, eval_dir).items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def make_setup(root: pathlib.Path) -> Setup:
  from tweetjax.data import builder, pipeline, synthetic
  from tweetjax.evaluate import eval_sets
  from tweetjax.train.checkpoint import CheckpointManager
  from tweetjax.train.experiment import build_experiment

  dataset_dir = str(root / "tweets")
  builder.build([], dataset_dir, builder.BuildConfig(validation_fraction=0.15),
                generate=lambda raw: synthetic.generate(raw, num_tweets=NUM_TWEETS, seed=11))
  eval_dir = str(root / "eval_sets")
  eval_sets.build_eval_sets(dataset_dir, eval_dir, seed=0, max_flagging_train=800, max_search_queries=120,
                            max_search_train=500, num_users=40)
  config = eval_config(dataset_dir, eval_dir)
  workdir = str(root / "workdir")
  experiment = build_experiment(config)
  state = experiment.init_state()
  batches = pipeline.make_iterator(config, experiment.mesh, "train")
  train_step = experiment.train_step()
  with CheckpointManager(workdir, async_save=False) as manager:
    manager.save(0, state, force=True)
    for _ in range(TRAIN_STEPS):
      state, metrics = train_step(state, next(batches))
    manager.save(TRAIN_STEPS, state, force=True)
  print(f"trained tiny model: loss {float(metrics['loss']):.3f} after {TRAIN_STEPS} steps")
  return Setup(config, workdir, dataset_dir, eval_dir)


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
  own = tmp_path_factory.mktemp("evaluate")
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    return make_setup(own)
  # Every xdist worker of this session sees the same parent directory. Building takes minutes on 2 cores, so one
  # worker builds (into a temporary name, renamed when complete: a worker that dies mid-build leaves nothing the
  # others would trust) while the others wait on the lock. Each worker evaluates in its own copy of the workdir, so
  # result files and TensorBoard event files never collide; the dataset and eval sets are only read.
  shared = tmp_path_factory.getbasetemp().parent / "evaluate_shared"
  shared.mkdir(exist_ok=True)
  with open(shared / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    built = shared / "built"
    if not built.is_dir():
      partial = shared / f"partial-{os.getpid()}"
      partial.mkdir()
      make_setup(partial)
      os.rename(partial, built)
  shutil.copytree(built / "workdir" / "checkpoints", own / "workdir" / "checkpoints")
  return Setup(eval_config(str(built / "tweets"), str(built / "eval_sets")), str(own / "workdir"),
               str(built / "tweets"), str(built / "eval_sets"))


@pytest.fixture(scope="session")
def evaluator(setup):
  from tweetjax.evaluate.runner import Evaluator
  return Evaluator(setup.config, setup.workdir)
