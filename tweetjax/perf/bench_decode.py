"""Measurements behind `tools/bench.py --sections=decode`: tweetjax's KV-cache sampler and its Hugging Face peer
(`LlamaForCausalLM.generate(use_cache=True)`) on the same weights, prompts and shape.

Each function measures in the current process and returns a plain dict; tools/bench.py runs them in separate
subprocesses (JAX and PyTorch each get the machine to themselves). The tweetjax worker writes the weights it
decoded with as a Hugging Face directory (tweetjax/convert/hf.py), which the PyTorch worker loads: the same
numbers on both sides. EOS is disabled, so every row generates exactly `new_tokens` tokens; compilation / the first
call are excluded (one warm-up call); the best of `repeats` calls is reported.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

SAMPLINGS = ("greedy", "top_p")
TOP_P = 0.9  # the sampled mode: temperature 1, nucleus 0.9, no top-k (the same on both sides)


def decode_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
  """[BOS] + random ids (>= 4: no special tokens), `prompt_len` tokens per row."""
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(4, vocab_size, prompt_len - 1).tolist() for _ in range(batch)]


def _best_of(fn, repeats: int) -> tuple[float, Any]:
  out = fn()  # warm-up: compiles (JAX) / allocates (PyTorch)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return best, out


def tweetjax_decode_rate(config: ml_collections.ConfigDict, *, batch: int, prompt_len: int, new_tokens: int,
                         repeats: int, weights: str = "", sampling: str = "greedy",
                         export_dir: str = "") -> dict[str, Any]:
  """tokens/s of Sampler.generate on random-init params of `config` (seed config.seed); `weights` is the
  sampler's weight format ("" = the params as they are). With `export_dir`, the params go there as a Hugging Face
  model and the prompts as prompts.json, for `torch_decode_rate`."""
  import jax  # pylint: disable=g-import-not-at-top
  from tweetjax.model.decode import SamplingConfig, Sampler  # pylint: disable=g-import-not-at-top
  from tweetjax.train.experiment import build_experiment  # pylint: disable=g-import-not-at-top

  experiment = build_experiment(config)
  params = experiment.init_state().params
  prompts = decode_prompts(batch, prompt_len, int(config.model.vocab_size))
  if export_dir:
    from tweetjax.convert.hf import ExportOptions, export_hf  # pylint: disable=g-import-not-at-top
    export_hf(params, experiment.model_config, export_dir,
              ExportOptions(max_position_embeddings=max(4096, prompt_len + new_tokens)))
    with open(os.path.join(export_dir, "prompts.json"), "w") as f:
      json.dump(prompts, f)
  sampler = Sampler(experiment.model, experiment.mesh, experiment.rules, weights=weights or None)
  prepared = sampler.prepare(params)
  top_p = TOP_P if sampling == "top_p" else 1.0
  spec = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0 if sampling == "greedy" else 1.0, top_p=top_p,
                        eos_id=-1)
  rng = jax.random.key(0)
  seconds, out = _best_of(lambda: sampler.generate(prepared, prompts, spec, rng), repeats)
  tokens = sum(len(row) for row in out.tokens)
  return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "weights": sampler.weights,
          "compute_dtype": str(sampler.model.cfg.compute_dtype), "generated": out.tokens,
          "device_kind": experiment.mesh.devices.flat[0].device_kind}


def torch_decode_rate(hf_dir: str, *, new_tokens: int, repeats: int, dtype: str = "float32",
                      sampling: str = "greedy") -> dict[str, Any]:
  """tokens/s of Hugging Face `generate` (KV cache, eager PyTorch, all cores) on the exported model and prompts."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch_dtype).eval()
  with open(os.path.join(hf_dir, "prompts.json")) as f:
    prompts = torch.tensor(json.load(f))
  kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True, eos_token_id=None,
                pad_token_id=0, attention_mask=torch.ones_like(prompts))
  if sampling == "greedy":
    kwargs.update(do_sample=False)
  else:
    kwargs.update(do_sample=True, temperature=1.0, top_p=TOP_P, top_k=0)

  def run():
    with torch.inference_mode():
      return model.generate(prompts, **kwargs)

  seconds, out = _best_of(run, repeats)
  generated = out[:, prompts.shape[1]:]
  tokens = int(generated.numel())
  return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "dtype": dtype,
          "generated": generated.tolist(), "torch": torch.__version__, "transformers": transformers.__version__,
          "threads": torch.get_num_threads()}
