"""Builds the tweet dataset (TFDS array_record) from Twitter exports, or from the embedded synthetic corpus.

  python tools/build_dataset.py --input=/exports/v2,/exports/tweets.js --output=/data/tweets
  python tools/build_dataset.py --synthetic --output=/data/tweets_synth [--num_tweets=20000]
  python tools/build_dataset.py --engine=beam --input=/exports --output=/data/tweets \
      --beam_options="--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"

Formats, normalization and filters: tweetjax/data/{formats,normalize,builder}.py. Refuses to replace an existing
dataset unless --overwrite; builds into a temp directory renamed into place, so a crash leaves no half dataset.
Prints a progress line and a summary table; the same counts are in <output>/build_stats.json.
--engine=beam runs the same build, with the same result, as an Apache Beam pipeline (tweetjax/data/beam_build.py;
BUILD.md has the Dataflow/Flink/Spark commands).
"""

import sys

from absl import app, flags

from tweetjax import paths
from tweetjax.data import builder, normalize, synthetic

_INPUT = flags.DEFINE_list("input", [], "Export files or directories (searched recursively).")
_OUTPUT = flags.DEFINE_string("output", None, "Dataset directory to create.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset at --output.")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Generate the embedded corpus into <output>/raw and build it.")
_NUM_TWEETS = flags.DEFINE_integer("num_tweets", 20_000, "Size of the --synthetic corpus.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the --synthetic corpus.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Optional SentencePiece model: count tokens per split.")
_ENGINE = flags.DEFINE_enum("engine", "local", ["local", "beam"], "local: one process; beam: a Beam pipeline.")
_BEAM_OPTIONS = flags.DEFINE_string("beam_options", "", "Beam pipeline options for --engine=beam (default: "
                                    "DirectRunner, multi_processing, one worker per core).")
_SPLIT_BYTES = flags.DEFINE_integer("split_bytes", 64 << 20, "--engine=beam: JSONL/CSV files larger than this are "
                                    "read in ranges of this many bytes (0: whole files).")
# normalization
_UNESCAPE_HTML = flags.DEFINE_bool("unescape_html", True, "Unescape HTML entities (&amp; -> &).")
_NFC = flags.DEFINE_bool("nfc", True, "Unicode NFC normalization.")
_URLS = flags.DEFINE_enum("urls", "token", ["token", "keep", "remove"], "URLs -> <url>, kept, or removed.")
_MENTIONS = flags.DEFINE_enum("mentions", "token", ["token", "keep"], "@handles -> @user, or kept.")
_SCRUB_PII = flags.DEFINE_bool("scrub_pii", True, "E-mails -> <email>, phone numbers -> <phone>.")
_COLLAPSE = flags.DEFINE_bool("collapse_whitespace", True, "Collapse whitespace runs to one space.")
# filters
_KEEP_RETWEETS = flags.DEFINE_bool("keep_retweets", False, "Keep retweets (dropped by default).")
_DEDUP_EXACT = flags.DEFINE_bool("dedup_exact", True, "Drop exact duplicates (after normalization).")
_DEDUP_NEAR = flags.DEFINE_bool("dedup_near", True, "Drop near-duplicates (MinHash LSH).")
_NEAR_THRESHOLD = flags.DEFINE_float("near_threshold", 0.7, "Estimated Jaccard (5-char shingles) of a near-dup.")
_LANGS = flags.DEFINE_list("langs", [], "Keep only these `lang` codes (empty: all).")
_MIN_CHARS = flags.DEFINE_integer("min_chars", 2, "Drop texts shorter than this after normalization.")
_MAX_CHARS = flags.DEFINE_integer("max_chars", 10_000, "Drop texts longer than this after normalization.")
_JOIN_THREADS = flags.DEFINE_bool("join_threads", False, "Join each conversation into one <sep>-joined document.")
_VALIDATION_FRACTION = flags.DEFINE_float("validation_fraction", 0.02, "Share of ids hashed to validation.")


def _progress(stats) -> None:
  dropped = sum(stats.get(k, 0) for k in builder.FILTER_REASONS)
  skipped = sum(stats.get(k, 0) for k in builder.formats.SKIP_REASONS)
  sys.stderr.write(f"\rread {stats.get('read', 0):,}  skipped {skipped:,}  dropped {dropped:,}   ")
  sys.stderr.flush()


def main(argv):
  del argv
  paths.resolve_path_flags(_INPUT, _OUTPUT, _TOKENIZER)  # relative to where the command started
  if not _INPUT.value and not _SYNTHETIC.value:
    raise app.UsageError("give --input=<files or dirs> or --synthetic")
  config = builder.BuildConfig(
      normalize=normalize.NormalizeConfig(unescape_html=_UNESCAPE_HTML.value, nfc=_NFC.value, urls=_URLS.value,
                                          scrub_pii=_SCRUB_PII.value, mentions=_MENTIONS.value,
                                          collapse_whitespace=_COLLAPSE.value),
      keep_retweets=_KEEP_RETWEETS.value, dedup_exact=_DEDUP_EXACT.value, dedup_near=_DEDUP_NEAR.value,
      near_threshold=_NEAR_THRESHOLD.value, langs=tuple(_LANGS.value), min_chars=_MIN_CHARS.value,
      max_chars=_MAX_CHARS.value, join_threads=_JOIN_THREADS.value,
      validation_fraction=_VALIDATION_FRACTION.value)
  generate = None
  if _SYNTHETIC.value:
    generate = lambda raw: synthetic.generate(raw, _NUM_TWEETS.value, _SEED.value)
  try:
    result = builder.build(_INPUT.value, _OUTPUT.value, config, overwrite=_OVERWRITE.value,
                           tokenizer_path=_TOKENIZER.value, generate=generate, progress=_progress,
                           engine=_ENGINE.value, beam_options=_BEAM_OPTIONS.value, split_bytes=_SPLIT_BYTES.value)
  except builder.DatasetExistsError as e:
    sys.stderr.write(f"refusing to build: {e}\n")
    sys.exit(1)
  sys.stderr.write("\n")
  print(builder.format_table(result))
  print(f"wrote {_OUTPUT.value} ({result['seconds']} s); counts in {_OUTPUT.value}/{builder.STATS_FILE}")


if __name__ == "__main__":
  app.run(main)
