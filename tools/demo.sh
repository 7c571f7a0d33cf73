#!/usr/bin/env bash
# The main job end to end on the embedded synthetic tweet corpus:
#   build dataset -> train tokenizer -> train `tiny` on a fake 8-device CPU mesh (data=2, fsdp=2, tensor=2)
#   -> perplexity eval -> three sampled tweets -> flagging report.
# Re-running reuses what is already there (dataset, tokenizer, finished checkpoint). Usage: tools/demo.sh [WORKDIR]
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
WORK="${1:-$REPO/workdirs/demo}"
DATA="$WORK/dataset"
TOKENIZER="$DATA/tokenizer.model"
RUN="$WORK/train"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS=cpu
mkdir -p "$WORK"

step() { printf '\n=== %s ===\n' "$*"; }

step "1/6 build the tweet dataset (synthetic exports in every format, with corrupt records) -> $DATA"
if [ -d "$DATA/tweetjax_tweets" ]; then
  echo "dataset exists; reusing it"
else
  python tools/build_dataset.py --synthetic --num_tweets=20000 --output="$DATA"
fi

step "2/6 train the SentencePiece tokenizer -> $TOKENIZER"
if [ -f "$TOKENIZER" ]; then
  echo "tokenizer exists; reusing it"
else
  python tools/train_tokenizer.py --dataset_dir="$DATA" --vocab_size=1024
fi

COMMON=(--config=experiments/tiny.py --workdir="$RUN"
        --config.data.source=tweets --config.data.dataset_dir="$DATA" --config.data.tokenizer_path="$TOKENIZER")

step "3/6 train tiny for 100 steps on the fake 8-device mesh (data=2, fsdp=2, tensor=2)"
python tools/train.py "${COMMON[@]}" --config.train.steps=100 --config.train.log_every=10 \
  --config.checkpoint.every_steps=50 --alsologtostderr

step "4/6 perplexity and bits per byte on the validation split"
python tools/evaluate.py "${COMMON[@]}" --job=perplexity

step "5/6 three sampled tweets (KV-cache decoding)"
python tools/sample.py "${COMMON[@]}" --num_samples=3

step "6/6 flagging report (linear probe on pooled hidden states, zero-shot label prompts)"
if [ ! -f "$DATA/eval_sets/flagging_train.jsonl" ]; then
  python tools/evaluate.py "${COMMON[@]}" --build_eval_sets
fi
python tools/evaluate.py "${COMMON[@]}" --job=flagging

printf '\ndemo done: metrics in %s/metrics.jsonl, eval results in %s/eval/\n' "$RUN" "$RUN"
