"""A Hugging Face Llama model as a tweetjax experiment (big_vision-style config argument).

  --config=experiments/hf.py:/models/llama            # an HF directory: its config.json
  --config=experiments/hf.py:/runs/llama_import       # a directory written by tools/convert_hf.py --mode=import
  --config=experiments/hf.py:/models/llama,vocab_multiple=256

The architecture comes from the HF config (vocab padded up to a multiple of `vocab_multiple`, default 128); mesh,
data, optimizer and train settings are the defaults of tweetjax.config.base_config: override them on the command
line (`--config.mesh.fsdp=8 --config.data.source=tweets ...`), identically for the import and for training.
"""

from tweetjax.convert.hf_config import config_from_hf


def get_config(arg=None):
  return config_from_hf(arg)
