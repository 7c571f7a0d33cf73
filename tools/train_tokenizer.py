"""Trains the SentencePiece tokenizer on the train split of a built tweet dataset.

  python tools/train_tokenizer.py --dataset_dir=/data/tweets --output=/data/tweets/tokenizer --vocab_size=8000

Writes <output>.model and <output>.vocab. Ids: pad=0, bos=1, eos=2, unk=3, then `<url> @user <sep> <email>
<phone>`; byte_fallback on (see tweetjax/data/tokenizer.py). The text is already normalized by the build.
"""

from absl import app, flags

from tweetjax import paths
from tweetjax.data import pipeline, tokenizer

_DATASET_DIR = flags.DEFINE_string("dataset_dir", None, "Built dataset directory (tools/build_dataset.py).",
                                   required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Model prefix; defaults to <dataset_dir>/tokenizer.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "Upper bound on the vocabulary size.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece model type.")
_MAX_DOCS = flags.DEFINE_integer("max_docs", 2_000_000, "Train on at most this many documents (in file order).")


def main(argv):
  del argv
  paths.resolve_path_flags(_DATASET_DIR, _OUTPUT)  # relative to where the command started
  src = pipeline.TweetSource(_DATASET_DIR.value, "train")
  n = min(len(src), _MAX_DOCS.value)
  texts = (t for i in range(0, n, 8192) for t in src.texts(range(i, min(n, i + 8192))))
  prefix = _OUTPUT.value or f"{_DATASET_DIR.value.rstrip('/')}/tokenizer"
  path = tokenizer.train(texts, prefix, _VOCAB_SIZE.value, _MODEL_TYPE.value)
  tok = tokenizer.Tokenizer(path)
  print(f"wrote {path}: vocab_size={tok.vocab_size} (trained on {n:,} documents)")


if __name__ == "__main__":
  app.run(main)
