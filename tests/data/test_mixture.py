"""Token-weighted mixtures of datasets in the loader: shares, determinism, resume, process independence."""

import json
import pathlib

import numpy as np
import pytest

from tweetjax.data import builder, mixture, pipeline, synthetic

from tests.helpers import assert_batches_equal, next_batches

FIX = pathlib.Path(__file__).parent / "fixtures"
TOK = str(FIX / "tokenizer.model")
WEIGHTS = {"tweets": 0.7, "threads": 0.3}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  d = tmp_path_factory.mktemp("mix")
  synthetic.generate(d / "raw", num_tweets=3000, seed=5)
  builder.build([str(d / "raw")], d / "tweets", builder.BuildConfig(validation_fraction=0.1))
  builder.build([str(d / "raw")], d / "threads", builder.BuildConfig(validation_fraction=0.1, join_threads=True))
  return [mixture.Source(name, str(d / name), w) for name, w in WEIGHTS.items()]


def _iterator(sources, **kw):
  args = dict(split="train", shuffle=True, shuffle_seed=11, num_epochs=None, pack_window=256, sources=sources)
  return pipeline.PackedBatchIterator("", TOK, 64, 8, **{**args, **kw})


def test_parse_and_errors():
  assert mixture.parse("a=/d/x:0.7, /d/y:0.3") == [mixture.Source("a", "/d/x", 0.7), mixture.Source("y", "/d/y", 0.3)]
  for bad in ("/d/x", "a=/d/x:0", "a=/d/x:heavy", "a=/d/x:1,a=/d/y:1"):
    with pytest.raises(ValueError, match="config.data.mixture"):
      mixture.parse(bad)
  assert mixture.parse("") == []


def test_token_shares_match_weights(sources):
  it = _iterator(sources)
  next_batches(it, 120)  # ~6 windows of 256 documents
  shares = it.token_shares()
  for name, w in WEIGHTS.items():
    assert abs(shares[name] - w) < 0.03, shares  # stated tolerance: 3 points of token share
  # thread documents are longer, so they are drawn less often than their token weight
  lengths = [mixture.mean_tokens(it._texts(i, range(mixture.MEAN_SAMPLE)), it.tokenizer) for i in range(2)]
  assert lengths[1] > 1.1 * lengths[0] and mixture.proportions(list(WEIGHTS.values()), lengths)[1] < 0.28


def test_deterministic_and_resumable(sources):
  full = next_batches(_iterator(sources), 14)
  assert_batches_equal(full, next_batches(_iterator(sources), 14))
  it = _iterator(sources)
  next_batches(it, 6)
  state = json.dumps(it.get_state())
  resumed = _iterator(sources)
  resumed.set_state(state)
  assert_batches_equal(full[6:], next_batches(resumed, 8))
  other = next(_iterator(sources, shuffle_seed=12))
  assert (other["inputs"] != full[0]["inputs"]).any()


def test_processes_see_the_same_global_batches(sources):
  one = next_batches(_iterator(sources), 5)
  two = [next_batches(_iterator(sources, local_rows=slice(4 * p, 4 * p + 4)), 5) for p in range(2)]
  assert_batches_equal(one, [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*two)])


def test_make_iterator_reads_config_mixture(sources):
  import jax  # pylint: disable=g-import-not-at-top
  from tweetjax.config import base_config  # pylint: disable=g-import-not-at-top
  config = base_config()
  config.data.update(source="tweets", tokenizer_path=TOK, seq_len=64, global_batch_size=8, shuffle_seed=11,
                     pack_window=256, mixture=",".join(f"{s.name}={s.dataset_dir}:{s.weight}" for s in sources))
  mesh = jax.make_mesh((8, 1, 1, 1), ("data", "fsdp", "expert", "tensor"))
  batch = next(pipeline.make_iterator(config, mesh))
  want = next(_iterator(sources))
  for k, v in batch.items():
    np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)
