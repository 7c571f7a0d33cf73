"""Evaluation jobs against a training workdir's checkpoints.

  python tools/evaluate.py --config=experiments/tiny.py --workdir=DIR --job=perplexity [--checkpoint_step=N]
  python tools/evaluate.py --config=... --workdir=DIR --job=flagging --follow   # continuous evaluator
  python tools/evaluate.py --config=... --build_eval_sets [--overwrite]          # eval sets from the dataset

Jobs: perplexity, flagging, search, adcopy, personalization (tweetjax/evaluate/<job>.py). Each prints a table and
writes <workdir>/eval/<job>/<step>.json plus TensorBoard scalars under <workdir>/tensorboard/eval/<job>.
--follow evaluates every checkpoint without a result file, then waits for new ones (config.eval.follow_poll_s),
until the final step (config.train.steps) is done or config.eval.follow_idle_timeout_s passes without a new one.
"""

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from tweetjax import paths
from tweetjax.evaluate import common, eval_sets, runner
from tweetjax.perf import env

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_JOB = flags.DEFINE_enum("job", None, list(runner.JOBS), "Evaluation job.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: the newest).")
_FOLLOW = flags.DEFINE_bool("follow", False, "Continuous evaluation of new checkpoints.")
_BUILD = flags.DEFINE_bool("build_eval_sets", False,
                           "Write the eval-set files into config.eval.data_dir from config.data.dataset_dir.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "With --build_eval_sets: replace existing files.")


def main(argv):
  del argv
  config = _CONFIG.value
  paths.resolve_tool_paths(config, _WORKDIR)  # relative to where the command started
  env.setup_environment(config)  # XLA flags and multi-process start-up, before JAX touches a device
  if _BUILD.value:
    out_dir = eval_sets.data_dir_of(config)
    if jax.process_index() == 0:  # one writer; the other processes of a multi-process job wait for the files
      counts = eval_sets.build_eval_sets(str(config.data.dataset_dir), out_dir, seed=int(config.seed),
                                         overwrite=_OVERWRITE.value)
      print(f"eval sets in {out_dir}:")
      for name, count in counts.items():
        print(f"  {name:<24} {count:6d} records")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("tweetjax_eval_sets_built")
    if not _JOB.value:
      return
  if not _JOB.value or not _WORKDIR.value:
    raise app.UsageError("--job and --workdir are required (or only --build_eval_sets)")
  evaluator = runner.Evaluator(config, _WORKDIR.value)
  if _FOLLOW.value:
    if _STEP.value is not None:
      raise app.UsageError("--follow evaluates every checkpoint; do not pass --checkpoint_step")
    steps = runner.follow(evaluator, _JOB.value, poll_s=float(config.eval.follow_poll_s),
                          idle_timeout_s=float(config.eval.follow_idle_timeout_s),
                          last_step=int(config.train.steps),
                          on_result=lambda step, metrics: print(common.format_table(_JOB.value, step, metrics),
                                                                flush=True))
    logging.info("follow %s: evaluated steps %s", _JOB.value, steps)
    return
  step, metrics, _ = evaluator.evaluate(_JOB.value, _STEP.value)
  print(common.format_table(_JOB.value, step, metrics))
  print(f"results: {common.results_path(_WORKDIR.value, _JOB.value, step)}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
