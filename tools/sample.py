"""Samples tweets from a checkpoint with the KV-cache decoder.

  python tools/sample.py --config=experiments/tiny.py --workdir=DIR --prompt="hot take:" --num_samples=3 \
      [--checkpoint_step=N] [--temperature=0.8 --top_k=0 --top_p=0.95 --max_new_tokens=40] [--greedy]

--prompt may repeat (one batch, prompts of different lengths are left-padded). Defaults come from config.eval.
--chat writes each prompt as a user turn in the fine-tuning chat template (config.data.sft, tweetjax/data/sft.py),
as a fine-tuned model saw its prompts, and the reply ends at the template's end-of-turn marker.
"""

import dataclasses

import jax
from absl import app, flags
from ml_collections import config_flags

from tweetjax import paths
from tweetjax.evaluate import common
from tweetjax.model.decode import SamplingConfig, Sampler, generate_text
from tweetjax.perf import env
from tweetjax.train.experiment import build_experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", [""], "Prompt text (repeatable); empty: unconditional tweets.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 3, "Completions per prompt.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: the newest).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Softmax temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (0: off).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass (1: off).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate at most (stops earlier at EOS).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NO_CACHE = flags.DEFINE_bool("no_cache", False, "Recompute the whole sequence every step (slow; for checks).")
_CHAT = flags.DEFINE_bool("chat", False, "Prompts are user turns in the config.data.sft chat template.")


def main(argv):
  del argv
  config = _CONFIG.value
  paths.resolve_tool_paths(config, _WORKDIR)  # relative to where the command started
  env.setup_environment(config)  # XLA flags and multi-process start-up, before JAX touches a device
  pick = lambda flag, default: default if flag.value is None else flag.value
  tokenizer = common.load_tokenizer(config)
  sampling = SamplingConfig(max_new_tokens=int(pick(_MAX_NEW, config.eval.max_new_tokens)),
                            temperature=float(pick(_TEMPERATURE, config.eval.temperature)),
                            top_k=int(pick(_TOP_K, config.eval.top_k)), top_p=float(pick(_TOP_P, config.eval.top_p)),
                            eos_id=tokenizer.eos_id)
  experiment = build_experiment(config)
  params, step = common.restore_params(experiment, _WORKDIR.value, _STEP.value)
  sampler = Sampler(experiment.model, experiment.mesh, experiment.rules, pad_id=tokenizer.pad_id)
  prompts = common.normalize_texts(config, [p for p in _PROMPT.value for _ in range(_NUM_SAMPLES.value)])
  if _CHAT.value:
    from tweetjax.data import sft  # pylint: disable=g-import-not-at-top
    encoder = sft.encoder_from_config(config, tokenizer)
    sampling = dataclasses.replace(sampling, vocab_size=tokenizer.vocab_size)
    output = sampler.generate(params, [encoder.prompt_ids([{"role": "user", "content": p}]) for p in prompts],
                              sampling, jax.random.key(_SEED.value), use_cache=not _NO_CACHE.value)
    completions = [tokenizer.decode([t for t in row if t != sampling.eos_id]) for row in output.tokens]
  else:
    completions = generate_text(sampler, params, tokenizer, prompts, sampling, jax.random.key(_SEED.value),
                                use_cache=not _NO_CACHE.value)
  print(f"step {step}, {sampling}")
  for i, (prompt, completion) in enumerate(zip(prompts, completions)):
    print(f"[{i}] {prompt}{' ' if prompt else ''}{completion}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
