"""Data throughput: normalize, tokenize and pack, in tweets per CPU-second of one core, and packing efficiency.

  python tools/bench_data.py                       # synthetic tweets, tokenizer trained on the fly
  python tools/bench_data.py --dataset_dir=/data/tweets --tokenizer=/data/tweets/tokenizer.model

Rates are tweets per second of process CPU time (`time.process_time()`, all threads; the process is pinned to one
core), so other load on the machine slows them less than wall time; wall-clock rates and the load average are
printed next to them. Each stage keeps its best of `--repeats` passes over the tweets.
"normalize + tokenize + pack" starts from raw text, as the build does; the loader starts from the stored text, which
the build already normalized, so it only tokenizes and packs (it normalizes again only when `config.data.normalize`
differs from the build's options, see tweetjax/data/pipeline.py).
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
_REPEATS = flags.DEFINE_integer("repeats", 3, "Passes over the tweets; each stage reports its fastest pass.")

STAGES = ("normalize", "tokenize", "pack")


def _one_pass(texts, tok, window, seq_len):
  """Returns ({stage: (cpu seconds, wall seconds)}, real tokens, all positions) of one pass."""
  cpu = dict.fromkeys(STAGES, 0.0)
  wall = dict.fromkeys(STAGES, 0.0)
  real = total = 0
  for i in range(0, len(texts), window):
    stamps = [(time.process_time(), time.perf_counter())]
    norm = normalize.normalize_batch(texts[i:i + window])
    stamps.append((time.process_time(), time.perf_counter()))
    ids = tok.encode_batch(norm)
    stamps.append((time.process_time(), time.perf_counter()))
    rows = packing.pack(ids, seq_len, tok.bos_id, tok.eos_id, tok.pad_id)
    stamps.append((time.process_time(), time.perf_counter()))
    for k, stage in enumerate(STAGES):
      cpu[stage] += stamps[k + 1][0] - stamps[k][0]
      wall[stage] += stamps[k + 1][1] - stamps[k][1]
    real += int(rows["weights"].sum())
    total += rows["weights"].size
  return {s: (cpu[s], wall[s]) for s in STAGES}, real, total


def main(argv):
  del argv
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  stored = ""
  if _DATASET_DIR.value:
    from tweetjax.data import builder, pipeline  # pylint: disable=g-import-not-at-top
    src = pipeline.TweetSource(_DATASET_DIR.value, "train")
    texts = src.texts(range(min(len(src), _NUM_TWEETS.value)))
    built = builder.stored_normalization(_DATASET_DIR.value)
    stored = ("normalize ran on stored text, which the build normalized with the default options: the loader "
              "skips it" if built == normalize.NormalizeConfig() else "normalize ran on stored text; the loader "
              "runs it too (the build used other options, or did not record them)")
  else:
    tweets, _ = synthetic.make_tweets(_NUM_TWEETS.value, seed=0)
    texts = [t["text"] for t in tweets]
  tok_path = _TOKENIZER.value
  if not tok_path:
    tok_path = tokenizer.train(normalize.normalize_batch(texts[:20_000]),
                               os.path.join(tempfile.mkdtemp(), "bench"), 8000)
  tok = tokenizer.Tokenizer(tok_path)
  load_before = os.getloadavg()
  best = {s: (float("inf"), float("inf")) for s in STAGES}
  for _ in range(max(1, _REPEATS.value)):
    times, real, total = _one_pass(texts, tok, _WINDOW.value, _SEQ_LEN.value)
    best = {s: min(best[s], times[s]) for s in STAGES}
  load_after = os.getloadavg()

  n = len(texts)
  rate = lambda stages, i: n / sum(best[s][i] for s in stages)
  print(f"tweets: {n:,}  vocab: {tok.vocab_size}  seq_len: {_SEQ_LEN.value}  window: {_WINDOW.value}  "
        f"repeats: {_REPEATS.value} (best pass per stage), 1 core")
  print(f"load average (1/5/15 min): before {'/'.join(f'{x:.1f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.1f}' for x in load_after)}  on {os.cpu_count()} cores")
  print(f"{'':34}{'tweets/CPU-s':>14}{'tweets/wall-s':>15}")
  for name, stages in (("normalize", ("normalize",)), ("tokenize", ("tokenize",)), ("pack", ("pack",)),
                       ("normalize + tokenize + pack", STAGES), ("loader: tokenize + pack", ("tokenize", "pack"))):
    print(f"  {name:<32}{rate(stages, 0):>14,.0f}{rate(stages, 1):>15,.0f}")
  if stored:
    print(stored)
  print(f"tokens/tweet: {real / n:.1f} incl. BOS   packing efficiency: {real / total:.4%} (real tokens / positions)")


if __name__ == "__main__":
  app.run(main)
