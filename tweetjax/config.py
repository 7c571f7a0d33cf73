"""The default experiment config; every file in experiments/ starts from `base_config()` and overrides it.

Configs are ml_collections.ConfigDicts, locked before they are returned so that a mistyped override
(`--config.model.num_layer=4`) fails instead of silently adding a key.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from tweetjax.data.normalize import NormalizeConfig
from tweetjax.model.config import ModelConfig
from tweetjax.parallel.rules import DEFAULT_RULES
from tweetjax.perf.env import DEFAULT_XLA_FLAGS


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Architecture: the fields of tweetjax.model.config.ModelConfig, documented there.
  config.model = ml_collections.ConfigDict(ModelConfig.config_keys())

  # Mesh axis sizes; their product must equal the device count; one axis may be -1 (= all remaining devices).
  # Axes, outermost first: data, stage (pipeline), fsdp, expert, context (sequence), tensor.
  config.mesh = ml_collections.ConfigDict({"data": -1, "stage": 1, "fsdp": 1, "expert": 1, "context": 1,
                                           "tensor": 1})
  # How the mesh maps onto nodes (tweetjax/parallel/mesh.py): inner axes stay inside a node.
  config.topology = ml_collections.ConfigDict()
  config.topology.devices_per_node = 0  # 0: one process per node (its local devices); N: N devices per node
  config.topology.cross_node = "error"  # `tensor` or `context` spanning nodes: "error" before compiling | "warn"
  # Logical axis name -> mesh axes (or None). The only place that decides placement.
  config.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"  # "synthetic": learnable random-token stream; "tweets": the tweet loader; "sft"
  config.data.seq_len = 128
  config.data.global_batch_size = 16
  config.data.dataset_dir = ""  # tools/build_dataset.py output (tweets)
  config.data.tokenizer_path = ""  # tools/train_tokenizer.py output (SentencePiece .model)
  config.data.shuffle_seed = 0  # record order of the tweet loader (each epoch reshuffled)
  config.data.pack_window = 4096  # tweets normalized, tokenized and packed together (larger: denser packing)
  config.data.num_epochs = 0  # 0: repeat the train split forever
  # Weighted datasets "name=dataset_dir:weight,..." (weights: token shares; tweetjax/data/mixture.py); "" = dataset_dir
  config.data.mixture = ""
  # Text normalization applied by the loader: tweetjax.data.normalize.NormalizeConfig documents each option.
  config.data.normalize = ml_collections.ConfigDict(dataclasses.asdict(NormalizeConfig()))

  # --- Supervised fine-tuning data (config.data.source="sft"; tweetjax/data/sft.py documents the formats) ---
  config.data.sft = ml_collections.ConfigDict()
  config.data.sft.train_files = ""  # comma-separated JSONL files/directories: {"prompt", "response"} or {"messages"}
  config.data.sft.validation_files = ""  # "": hold out validation_fraction of train_files (by a hash of the example)
  config.data.sft.validation_fraction = 0.05
  config.data.sft.template = "plain"  # chat template: plain | sep | custom (then the three *_format keys below)
  # custom: how each message is written; "{content}" once, "{bos}"/"{eos}" and config.data.sft.special_tokens map to
  # single token ids. An assistant turn trains on its content and what follows it, not on the text before {content}.
  config.data.sft.system_format = "{content}\n"
  config.data.sft.user_format = "{content}\n"
  config.data.sft.assistant_format = "{content}{eos}"
  config.data.sft.special_tokens = ""  # comma-separated pieces of the formats to emit as single ids (e.g. "<sep>")
  config.data.sft.normalize = True  # message contents get config.data.normalize, as the eval jobs' texts do
  # --- end fine-tuning data ---

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3e-4
  config.optimizer.schedule = "cosine"  # cosine | linear | constant (after linear warmup)
  config.optimizer.warmup_steps = 100
  config.optimizer.decay_steps = 0  # 0: decay over train.steps
  config.optimizer.end_learning_rate_ratio = 0.1
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 1.0  # 0 disables clipping

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1000
  config.train.microbatches = 1  # gradient accumulation inside the jitted step
  # Pipeline (mesh.stage > 1, tweetjax/parallel/pipeline.py): each accumulation microbatch is split again into
  # this many pipeline microbatches (>= mesh.stage); the layers run in pipeline_repeats circular passes over the
  # stages. Bubble: (stages - 1) / (repeats x microbatches + stages - 1).
  config.train.pipeline_microbatches = 1
  config.train.pipeline_repeats = 1
  config.train.z_loss_weight = 1e-4
  config.train.log_every = 10
  # Fine-tuning: a new run starts from these params (fresh optimizer, step 0) instead of a random init: a tweetjax
  # workdir (its newest complete checkpoint, or init_from_step) or a Hugging Face checkpoint directory. Ignored once
  # the workdir has checkpoints of its own (a restarted fine-tune resumes; it never restarts from the base).
  config.train.init_from = ""
  config.train.init_from_step = -1  # checkpoint step of a tweetjax init_from workdir; -1: its newest complete one

  # --- Training loop: checkpoints, preemption, metrics, profiling (tweetjax/train/loop.py) ---
  config.train.nonfinite = "skip"  # NaN/Inf loss or grad norm: "skip" the update (counted) | "stop" the run
  config.train.eval_every = 0  # validation loss every N steps (0: off); synthetic data uses the seed + 1 stream
  config.train.eval_steps = 4  # batches per validation pass
  config.train.profile_steps = ""  # "START,STOP": jax.profiler trace of those steps into <workdir>/profile; "N": N steps
  config.train.compilation_cache_dir = ""  # "": <workdir>/../jax_cache; "none": no persistent compilation cache
  config.train.peak_flops_per_device = 0.0  # MFU denominator; 0: from the device kind (CPU: a measured matmul)
  config.train.preemption_check_every = 1  # steps between the multi-host agreement on a SIGTERM stop
  config.train.tensorboard = True  # event files in <workdir>/tensorboard (metrics.jsonl is always written)

  # --- LoRA (tweetjax/model/lora.py): low-rank adapters; the base weights stay frozen, with no optimizer state ---
  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 0  # 0: no adapters (every weight trains); r > 0: adapters of rank r on config.lora.targets
  config.lora.alpha = 16.0  # adapter outputs are scaled by alpha / rank
  config.lora.dropout = 0.0  # dropout on the adapters' inputs while training
  config.lora.targets = "attention,mlp"  # comma-separated among query,key,value,out,gate,up,down; attention, mlp, all
  # --- end LoRA ---

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 500  # async save every N steps (0: only at the end and on preemption)
  config.checkpoint.max_to_keep = 3  # the newest k checkpoints are kept ...
  config.checkpoint.keep_every_steps = 0  # ... plus every step divisible by M, forever (0: none)
  config.checkpoint.async_save = True  # write in the background; the step loop waits only for device->host copies
  # Interrupted saves set aside in <workdir>/checkpoints_incomplete/: the newest N are kept, older ones deleted.
  config.checkpoint.keep_incomplete = 3
  # --- end training loop ---

  # --- Evaluation jobs and sampling (tweetjax/evaluate, tools/{evaluate,sample}.py) ---
  config.eval = ml_collections.ConfigDict()
  config.eval.data_dir = ""  # eval-set JSONL files (schemas: tweetjax/evaluate/eval_sets.py); "": <dataset_dir>/eval_sets
  config.eval.batch_size = 16  # sequences per forward pass (rounded up to a multiple of the batch shards)
  config.eval.max_len = 256  # longest scored/embedded sequence in tokens; longer contexts lose their oldest tokens
  config.eval.perplexity_max_batches = 0  # perplexity: batches of the validation split to use (0: all of it)
  config.eval.probe_steps = 300  # flagging: full-batch Adam steps of the logistic-regression probe
  config.eval.probe_learning_rate = 0.05
  config.eval.probe_l2 = 1e-3  # L2 penalty on the probe weights
  config.eval.flagging_zero_shot = True  # flagging: also score label prompts zero-shot (2 x labels passes per tweet)
  # flagging: also classify by generation, log p("yes") - log p("no") after the fine-tuning label prompt in the
  # config.data.sft template (tweetjax/evaluate/sft_sets.py), next to the probe on the same split
  config.eval.flagging_generative = True
  config.eval.search_head_steps = 200  # search: InfoNCE steps of a linear head on pooled states (0: raw pooled)
  config.eval.search_head_dim = 64
  config.eval.search_temperature = 0.05
  # personalization: listwise-softmax steps of the ranking head on personalization_train.jsonl (0: no head)
  config.eval.personalization_head_steps = 200
  config.eval.personalization_head_dim = 64
  config.eval.personalization_temperature = 0.05
  config.eval.max_new_tokens = 40  # sampling and ad-copy generation
  config.eval.temperature = 0.8  # 0: greedy
  config.eval.top_k = 0  # 0: off
  config.eval.top_p = 0.95  # 1: off
  config.eval.follow_poll_s = 30.0  # --follow: seconds between looks for new checkpoints
  config.eval.follow_idle_timeout_s = 0.0  # --follow: exit after this long without a new checkpoint (0: never)
  # --- end evaluation ---

  # --- Performance (tweetjax/perf/env.py): XLA flags every tool appends to XLA_FLAGS before JAX starts ---
  # Defaults: GPU latency-hiding scheduler, pipelined and combined collectives (other backends ignore them).
  # A flag already in the XLA_FLAGS environment variable wins over the same flag here.
  config.xla_flags = tuple(DEFAULT_XLA_FLAGS)
  # --- end performance ---
  return config
