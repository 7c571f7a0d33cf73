"""Long threads: whole Twitter conversations packed into 32,768-token rows, the sequence split over `context`.

Model: the Llama 3.1 8B shape (experiments/llama3_8b.py: 32 layers, d_model 4096, 32 / 8 heads of 128, SwiGLU
14,336, vocab 128,256, RoPE theta 500,000 with Llama 3.1's frequency scaling for long contexts).
Data: the tweet dataset built with conversations joined into one document each, packed 32k tokens to a row:

  python tools/build_dataset.py --input=<exports> --output=/data/tweets_threads --join_threads
  python tools/train.py --config=experiments/long_context.py --workdir=/tmp/long \\
      --config.data.dataset_dir=/data/tweets_threads --config.data.tokenizer_path=<tokenizer.model>

Layout (64 GPUs, 8 per node), outermost first: data -1 x fsdp 8 x context 8. context=8 fills a node: every GPU
holds 4,096 tokens of each row (an early and a late chunk of 2,048: the load-balanced causal split) and ring
attention passes K/V blocks around the node; fsdp spans the nodes; the weights are FSDP-sharded over fsdp x
context (64 ways). 64 rows (2M tokens) per step in 8 microbatches of one row per batch shard; full remat keeps one
4,096 x 4,096 layer input per layer and device (benchmarks/RESULTS.md).

  python tools/dryrun.py --config=experiments/long_context.py --mesh=fsdp=8,context=8
"""

import os

from tweetjax.sweep.spec import load_config

_LLAMA3_8B = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3_8b.py")


def get_config(arg=None):
  del arg
  config = load_config(_LLAMA3_8B)
  config.unlock()
  config.model.update(remat_policy="full", context_attention="ring")
  config.mesh.update(data=-1, fsdp=8, context=8)
  config.data.source = "tweets"
  config.data.seq_len = 32_768
  config.data.global_batch_size = 64
  config.data.pack_window = 16_384  # records packed together: joined threads are long, rows are 32k tokens
  config.train.microbatches = 8
  config.train.steps = 20_000
  config.lock()
  return config
