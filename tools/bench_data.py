"""Data throughput: normalize + tokenize + pack, in tweets per second on ONE core, and packing efficiency.

  python tools/bench_data.py                       # synthetic tweets, tokenizer trained on the fly
  python tools/bench_data.py --dataset_dir=/data/tweets --tokenizer=/data/tweets/tokenizer.model
"""

import os
import tempfile
import time

from absl import app, flags

from tweetjax.data import normalize, packing, synthetic, tokenizer

_DATASET_DIR = flags.DEFINE_string("dataset_dir", None, "Built dataset (train split); default: synthetic texts.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model; default: train a small one here.")
_NUM_TWEETS = flags.DEFINE_integer("num_tweets", 50_000, "Tweets to process.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Packed sequence length.")
_WINDOW = flags.DEFINE_integer("pack_window", 4096, "Documents per packing window (the loader's default).")


def main(argv):
  del argv
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}) if hasattr(os, "sched_setaffinity") else None
  if _DATASET_DIR.value:
    from tweetjax.data import pipeline  # pylint: disable=g-import-not-at-top
    src = pipeline.TweetSource(_DATASET_DIR.value, "train")
    texts = src.texts(range(min(len(src), _NUM_TWEETS.value)))
  else:
    tweets, _ = synthetic.make_tweets(_NUM_TWEETS.value, seed=0)
    texts = [t["text"] for t in tweets]
  tok_path = _TOKENIZER.value
  if not tok_path:
    tok_path = tokenizer.train(normalize.normalize_batch(texts[:20_000]),
                               os.path.join(tempfile.mkdtemp(), "bench"), 8000)
  tok = tokenizer.Tokenizer(tok_path)
  W = _WINDOW.value
  times = {"normalize": 0.0, "tokenize": 0.0, "pack": 0.0}
  real = total = 0
  for i in range(0, len(texts), W):
    t0 = time.perf_counter()
    norm = normalize.normalize_batch(texts[i:i + W])
    t1 = time.perf_counter()
    ids = tok.encode_batch(norm)
    t2 = time.perf_counter()
    rows = packing.pack(ids, _SEQ_LEN.value, tok.bos_id, tok.eos_id, tok.pad_id)
    t3 = time.perf_counter()
    times["normalize"] += t1 - t0
    times["tokenize"] += t2 - t1
    times["pack"] += t3 - t2
    real += int(rows["weights"].sum())
    total += rows["weights"].size
  n, secs = len(texts), sum(times.values())
  print(f"tweets: {n:,}  vocab: {tok.vocab_size}  seq_len: {_SEQ_LEN.value}  window: {W}  (1 core)")
  for k, v in times.items():
    print(f"  {k:<10} {n / v:>12,.0f} tweets/s")
  print(f"normalize+tokenize+pack: {n / secs:,.0f} tweets/s/core   ({real / n:.1f} tokens/tweet incl. BOS)")
  print(f"packing efficiency: {real / total:.4%}")


if __name__ == "__main__":
  app.run(main)
