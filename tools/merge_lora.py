"""Folds a LoRA run's adapters into its base weights: a plain tweetjax checkpoint, and optionally a HF export.

  python tools/merge_lora.py --workdir=/runs/lora --output_workdir=/runs/lora_merged [--step=N] \
      [--config=<the run's experiment> --config.x=y ...] [--hf_dir=/exports/model --dtype=bfloat16]

Without --config the config saved with the checkpoint is used. The merged workdir is read by tools/evaluate.py,
tools/sample.py, tools/convert_hf.py --mode=export and `config.train.init_from` with the run's config and
`--config.lora.rank=0`; --hf_dir exports it to a Hugging Face directory in the same call.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from tweetjax import paths
from tweetjax.perf import env

_CONFIG = config_flags.DEFINE_config_file("config", None, "The LoRA run's experiment config (default: the config "
                                          "saved with its checkpoint).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The LoRA run's workdir.", required=True)
_OUTPUT = flags.DEFINE_string("output_workdir", None, "New workdir for the merged checkpoint.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_HF_DIR = flags.DEFINE_string("hf_dir", "", "Also export the merged model to this new Hugging Face directory.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float16", "float32"], "HF export weight dtype.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  paths.resolve_tool_paths(_CONFIG.value, _WORKDIR, _OUTPUT, _HF_DIR)  # relative to where the command started
  if _CONFIG.value is not None:
    env.setup_environment(_CONFIG.value)  # its XLA flags, before JAX starts (reading a saved config starts it)
  from tweetjax.convert import hf as hf_convert  # pylint: disable=g-import-not-at-top
  from tweetjax.train import merge_lora  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value or hf_convert.saved_config(_WORKDIR.value, _STEP.value)
  result = merge_lora.merge_checkpoint(config, _WORKDIR.value, _OUTPUT.value, _STEP.value)
  print(f"merged {_WORKDIR.value} step {result['step']} into {_OUTPUT.value}/checkpoints/{result['step']}")
  if _HF_DIR.value:
    # Vocab, family, token ids and context length: from the source's HF record when there is one.
    from tweetjax.convert import hf_config  # pylint: disable=g-import-not-at-top
    max_positions = int(result["config"].data.seq_len)
    try:
      max_positions = int(hf_config.find_hf_config(_OUTPUT.value)[0].get("max_position_embeddings") or max_positions)
    except FileNotFoundError:
      pass
    options = hf_convert.ExportOptions(dtype=_DTYPE.value, max_position_embeddings=max_positions)
    hf = hf_convert.export_checkpoint(_OUTPUT.value, _HF_DIR.value, result["config"], step=result["step"],
                                      options=options)
    print(f"exported to {_HF_DIR.value}: {json.dumps(hf)}")


if __name__ == "__main__":
  app.run(main)
