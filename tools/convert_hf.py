"""HF Llama / Mistral / Qwen2 checkpoints <-> tweetjax checkpoints (safetensors only; nothing is unpickled).

Import an HF directory (config.json + *.safetensors, sharded or not) into a workdir you can train/evaluate from:
  python tools/convert_hf.py --mode=import --hf_dir=/models/llama --workdir=/runs/llama \
      [--config=experiments/hf.py:/models/llama --config.mesh.fsdp=8 ...]
  python tools/train.py --config=experiments/hf.py:/runs/llama --workdir=/runs/llama

Export a tweetjax checkpoint (newest step, or --step) to an HF directory of the family it was imported from
(a model trained here: Llama, or Qwen2 with config.model.qkv_bias; --model_type overrides):
  python tools/convert_hf.py --mode=export --workdir=/runs/llama --hf_dir=/exports/llama \
      [--dtype=bfloat16 --max_shard_size=5GB --tokenizer=/path/sp.model --model_type=mistral]
"""

import json
import resource
import time
import tracemalloc

from absl import app, flags, logging
from ml_collections import config_flags

from tweetjax import paths
from tweetjax.convert import hf as hf_convert
from tweetjax.convert import hf_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (optional). Import default: experiments/hf.py:<hf_dir>; export default: the "
    "config saved with the checkpoint.", lock_config=True)
_MODE = flags.DEFINE_enum("mode", None, ["import", "export"], "import: HF -> tweetjax; export: tweetjax -> HF.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF model directory (import: read; export: written, must be new).")
_WORKDIR = flags.DEFINE_string("workdir", None, "tweetjax workdir (import: written, must hold no checkpoints; "
                               "export: read).")
_VOCAB_MULTIPLE = flags.DEFINE_integer("vocab_multiple", hf_config.DEFAULT_VOCAB_MULTIPLE,
                                       "Import: pad the vocab up to a multiple of this (without --config).")
_STEP = flags.DEFINE_integer("step", None, "Export: checkpoint step (default: newest).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float16", "float32"], "Export: weight dtype "
                           "(default: the param dtype).")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Export: largest safetensors shard (5GB, 500MB...).")
_HF_VOCAB = flags.DEFINE_integer("hf_vocab_size", None, "Export: vocab size to write (default: the unpadded size "
                                 "recorded at import, else config.model.vocab_size).")
_MAX_POS = flags.DEFINE_integer("max_position_embeddings", None, "Export: HF max_position_embeddings (default: "
                                "from the imported HF config, else config.data.seq_len).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Export: SentencePiece model to export alongside (default: "
                                 "config.data.tokenizer_path or <workdir>/tokenizer.model when present).")
_MODEL_TYPE = flags.DEFINE_enum("model_type", None, list(hf_config.SUPPORTED_MODEL_TYPES), "Export: HF family "
                                "(default: the imported one, else qwen2 with config.model.qkv_bias, else llama).")
_TRACE_MEMORY = flags.DEFINE_bool("trace_memory", False, "Report the peak of numpy host allocations (tracemalloc).")
flags.mark_flags_as_required(["mode", "hf_dir", "workdir"])


def _max_positions(config):
  if _MAX_POS.value is not None:
    return _MAX_POS.value
  try:
    hf, _, _ = hf_config.find_hf_config(_WORKDIR.value)
    return int(hf.get("max_position_embeddings") or config.data.seq_len)
  except FileNotFoundError:
    return int(config.data.seq_len)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _TRACE_MEMORY.value:
    tracemalloc.start()
  started = time.perf_counter()
  config = _CONFIG.value
  paths.resolve_tool_paths(config, _HF_DIR, _WORKDIR, _TOKENIZER)  # relative to where the command started
  if _MODE.value == "import":
    record = hf_convert.import_hf(_HF_DIR.value, _WORKDIR.value, config, vocab_multiple=_VOCAB_MULTIPLE.value)
    overrides = " ".join(f"--config.model.{k}={v}" for k, v in record["model_overrides"].items())
    print(f"imported {_HF_DIR.value} into {_WORKDIR.value}/checkpoints/0 "
          f"(vocab {record['hf_vocab_size']} -> {record['padded_vocab_size']})")
    print(f"train or evaluate with: --config=experiments/hf.py:{_WORKDIR.value}")
    print(f"model overrides: {overrides}")
  else:
    if config is None:
      config = hf_convert.saved_config(_WORKDIR.value, _STEP.value)
    options = hf_convert.ExportOptions(
        hf_vocab_size=_HF_VOCAB.value, dtype=_DTYPE.value, max_shard_size=_MAX_SHARD_SIZE.value,
        max_position_embeddings=_max_positions(config), tokenizer_path=_TOKENIZER.value,
        model_type=_MODEL_TYPE.value or "")
    hf = hf_convert.export_checkpoint(_WORKDIR.value, _HF_DIR.value, config, step=_STEP.value, options=options)
    print(f"exported {_WORKDIR.value} to {_HF_DIR.value}: {json.dumps(hf)}")
  report = {"mode": _MODE.value, "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
  if _TRACE_MEMORY.value:
    report["peak_numpy_host_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
  print(json.dumps(report))
  logging.info("%s", report)


if __name__ == "__main__":
  app.run(main)
